"""HF <-> native checkpoint bridge: one declarative table (mapping.py), lossless in both directions,
streamed tensor by tensor.

Layouts (layouts.py): ``hub`` and ``transformers5`` (vision-language), ``memory`` and ``memory4``
(transformers 5 / 4.52-4.57 in-memory names: read; written on request), ``text`` (text-only), ``textmodel`` (a bare
``Gemma3TextModel`` save). See convert.py
for the native directory and its manifest.
"""

from gemma3vl.bridge.convert import export_checkpoint, import_checkpoint
from gemma3vl.bridge.from_model import export_model, save_native
from gemma3vl.bridge.layouts import LAYOUTS, Layout, detect_layout
from gemma3vl.bridge.loading import has_untied_head, is_native_dir, load_weights, read_config
from gemma3vl.bridge.mapping import build_mappings, hf_tensor_specs, native_tensor_specs
from gemma3vl.bridge.random_checkpoint import write_random_hf_checkpoint

__all__ = [
    "LAYOUTS",
    "Layout",
    "build_mappings",
    "detect_layout",
    "export_checkpoint",
    "export_model",
    "has_untied_head",
    "hf_tensor_specs",
    "import_checkpoint",
    "is_native_dir",
    "load_weights",
    "native_tensor_specs",
    "read_config",
    "save_native",
    "write_random_hf_checkpoint",
]
