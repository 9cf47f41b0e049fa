"""HF <-> native checkpoint bridge: one declarative table (mapping.py), lossless in both directions,
streamed tensor by tensor.

Layouts (layouts.py): ``hub`` and ``transformers5`` (vision-language), ``memory`` and ``memory4``
(transformers 5 / 4.52-4.57 in-memory names: read; written on request), ``text`` (text-only), ``textmodel`` (a bare
``Gemma3TextModel`` save). See convert.py
for the native directory and its manifest.
"""

import importlib
from typing import Any

# Each public name and the module that holds it: imported when first used, so that importing one light module of
# the package (fsutil, for the command line's --max-shard-size) does not import torch.
_WHERE = {
    "export_checkpoint": "convert", "import_checkpoint": "convert",
    "export_model": "from_model", "save_native": "from_model",
    "LAYOUTS": "layouts", "Layout": "layouts", "detect_layout": "layouts",
    "has_untied_head": "loading", "is_native_dir": "loading", "load_weights": "loading", "read_config": "loading",
    "build_mappings": "mapping", "hf_tensor_specs": "mapping", "native_tensor_specs": "mapping",
    "write_random_hf_checkpoint": "random_checkpoint",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"gemma3vl.bridge.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'gemma3vl.bridge' has no attribute {name!r}")
