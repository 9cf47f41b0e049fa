"""Refuse a DCP checkpoint whose metadata would run code when unpickled.

``torch.distributed.checkpoint`` stores its ``.metadata`` file with pickle and reads it back with
``pickle.load``, which can execute anything a crafted file asks for. Before handing a checkpoint to DCP we
unpickle its metadata ourselves with an allow-list of the classes DCP writes (its metadata dataclasses,
``torch.Size``, dtypes, layouts, paths). The same bytes are then safe for DCP's own load: pickle resolves
nothing but the globals the stream names, and we have seen them all.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from gemma3vl.errors import Gemma3VLError

_ALLOWED_MODULE_PREFIXES = ("torch.distributed.checkpoint.",)
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = (module, name) in _ALLOWED or module.startswith(_ALLOWED_MODULE_PREFIXES)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            allowed = True
        if not allowed:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in checkpoint metadata")
        return super().find_class(module, name)


def check_metadata(checkpoint: Path) -> None:
    """Raise a clear error unless every ``*.metadata`` file of ``checkpoint`` holds only allowed globals."""
    files = sorted(checkpoint.glob("*.metadata")) + sorted(checkpoint.glob(".metadata"))
    if not files:
        raise Gemma3VLError(f"{checkpoint}: no DCP .metadata file")
    for path in files:
        try:
            with open(path, "rb") as handle:
                _MetadataUnpickler(handle).load()
        except Exception as exc:  # any failure means we will not let pickle.load near it
            raise Gemma3VLError(f"{path}: refused, not plain DCP metadata ({exc})") from None
