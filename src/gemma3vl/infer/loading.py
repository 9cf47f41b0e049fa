"""Build a model on the right device and dtype and stream a checkpoint's weights into it."""

from __future__ import annotations

from pathlib import Path

import torch

from gemma3vl import bridge
from gemma3vl.config import Gemma3Config
from gemma3vl.errors import Gemma3VLError
from gemma3vl.model import Gemma3Model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str | None, flag: str = "--device") -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; anything else is an error naming ``flag``."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise Gemma3VLError(f"{flag} {name!r} is not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):  # mps, meta, xpu ...: torch knows the name, this toolkit runs on neither
        raise Gemma3VLError(f"{flag} {name!r} is not a device gemma3vl runs on (auto, cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Gemma3VLError(f"{flag} {name} was asked for, but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise Gemma3VLError(f"{flag} {name}: there is no such CUDA device ({count} visible: cuda:0 to cuda:{count - 1})")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise Gemma3VLError(f"unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def load_model(
    model_dir: str | Path, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> tuple[Gemma3Model, Gemma3Config]:
    """Our model with the weights of ``model_dir`` (an HF checkpoint directory or a native one)."""
    device = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, device)
    config = bridge.read_config(model_dir)
    with torch.device("meta"):
        model = Gemma3Model(config)
    if bridge.has_untied_head(model_dir):
        with torch.device("meta"):
            model.text.add_untied_head()
    model = model.to(dtype).to_empty(device=device)
    bridge.load_weights(model_dir, model, device=device, dtype=dtype)
    return model.eval(), config
