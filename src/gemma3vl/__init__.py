"""gemma3vl: Gemma 3 vision-language models converted, fine-tuned, served and verified against transformers.

The Python API (``gemma3vl.api``; docs/python.md): ``load`` a checkpoint and ``generate`` / ``chat`` / ``stream``
with it; ``convert_import``, ``convert_export``, ``merge_adapter``, ``fine_tune``, ``verify_checkpoint`` and
``evaluate`` do what the commands ``convert import``, ``convert export``, ``convert merge``, ``train``, ``verify``
and ``eval`` do (``gemma3vl.train`` and ``gemma3vl.verify`` are the modules behind two of them). Importing
``gemma3vl`` alone loads none of them, so the command line starts fast: each is imported when first used.
"""

from importlib import metadata

from gemma3vl.errors import Gemma3VLError

try:
    __version__ = metadata.version("gemma3vl")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "unknown"

_API = ("load", "Model", "Answer", "convert_import", "convert_export", "merge_adapter", "fine_tune",
        "verify_checkpoint", "evaluate")
__all__ = ["Gemma3VLError", "__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from gemma3vl import api

        return getattr(api, name)
    raise AttributeError(f"module 'gemma3vl' has no attribute {name!r}")
