"""Reading configs and streaming weights from either kind of checkpoint directory into a model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from gemma3vl.bridge.checkpoint import FORMAT, MANIFEST, NATIVE_LM_HEAD, HFCheckpoint, open_checkpoint, read_manifest
from gemma3vl.config import Gemma3Config
from gemma3vl.errors import Gemma3VLError


def is_native_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by import_checkpoint (it has a gemma3vl manifest)."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def read_config(model_dir: str | Path) -> Gemma3Config:
    """The config of an HF directory (its config.json) or a native one (the config.json kept in its manifest)."""
    model_dir = Path(model_dir)
    if is_native_dir(model_dir):
        manifest = read_manifest(model_dir)
        return Gemma3Config.from_hf_dict(json.loads(manifest["config_json"]), where=f"{model_dir / MANIFEST}: config_json")
    return Gemma3Config.from_file(model_dir / "config.json")


def has_untied_head(model_dir: str | Path) -> bool:
    """Whether the checkpoint stores an output matrix of its own (so the model needs a separate lm_head)."""
    with open_checkpoint(model_dir) as checkpoint:
        return any(m.native == NATIVE_LM_HEAD for m in checkpoint.mappings)


def load_weights(
    model_dir: str | Path,
    model: nn.Module,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Stream every tensor of ``model_dir`` (HF: mapped on the fly; native: as stored) into ``model``, whose
    state_dict keys are the native names.

    Strict: a model tensor the checkpoint lacks, a checkpoint tensor the model lacks, or a shape mismatch is
    an error, raised before anything is copied. Values are cast to the parameter's dtype. ``device`` /
    ``dtype``, when given, are where and in what dtype the parameters end up: parameters elsewhere (e.g. on
    the meta device) are replaced by new ones there first. Tied parameters stay tied."""
    device = _concrete(torch.device(device)) if device is not None else None
    targets = model.state_dict(keep_vars=True)
    aliases: dict[int, list[str]] = {}  # one tensor, several names (tied weights)
    for name, tensor in targets.items():
        aliases.setdefault(id(tensor), []).append(name)
    with open_checkpoint(model_dir) as checkpoint:
        by_name = {m.native: m for m in checkpoint.mappings}
        check_fits(model_dir, targets, by_name, checkpoint)
        if device is not None or dtype is not None:
            targets = _place_parameters(model, targets, aliases, device, dtype)
        with torch.no_grad():
            for name, m in by_name.items():
                target = targets[name]
                source = checkpoint.read_native(m)
                target.copy_(source.to(device=target.device, dtype=target.dtype, non_blocking=False))
                del source


def check_fits(model_dir, targets: dict[str, torch.Tensor], by_name, checkpoint) -> None:
    """Every checkpoint tensor has a place in ``targets`` (name -> tensor, global shapes), every target is
    in the checkpoint (tied names: one of them), and the shapes agree; all problems in one error."""
    aliases: dict[int, list[str]] = {}
    for name, tensor in targets.items():
        aliases.setdefault(id(tensor), []).append(name)
    problems = []
    for name in sorted(set(by_name) - set(targets)):
        problems.append(f"checkpoint tensor {name!r} has no place in the model")
    for names in aliases.values():
        if not any(n in by_name for n in names):
            problems.append(f"model tensor {names[0]!r} is not in the checkpoint")
    for name, m in by_name.items():
        if name in targets:
            want = tuple(targets[name].shape)
            got = m.native_shape
            if want != got:
                stored = m.hf if isinstance(checkpoint, HFCheckpoint) else (name,)
                where = f"{', '.join(stored)} in {checkpoint.files.path_of(stored[0])}"
                problems.append(f"{name} (from {where}): checkpoint shape {list(got)}, model shape {list(want)}")
    if problems:
        raise Gemma3VLError(
            f"{model_dir}: the checkpoint does not fit the model ({len(problems)} problem(s)):\n  "
            + "\n  ".join(problems[:20])
        )


def _concrete(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:N`` (the current one), so a parameter already there is not replaced for nothing."""
    if device.type != "cpu" and device.type != "meta" and device.index is None:
        module = getattr(torch, device.type, None)
        if module is not None and hasattr(module, "current_device"):
            return torch.device(device.type, module.current_device())
    return device


def _place_parameters(model: nn.Module, targets, aliases, device, dtype):
    """Replace parameters/buffers not already on ``device`` in ``dtype`` by empty ones that are (once per
    shared tensor, so ties survive); return the refreshed name -> tensor map."""
    modules = dict(model.named_modules())
    replaced: dict[int, torch.Tensor] = {}
    for names in aliases.values():
        old = targets[names[0]]
        want_device = device or (old.device if old.device.type != "meta" else torch.device("cpu"))
        want_dtype = dtype if dtype is not None and old.is_floating_point() else old.dtype
        if old.device == want_device and old.dtype == want_dtype:
            continue
        new_data = torch.empty(old.shape, device=want_device, dtype=want_dtype)
        for name in names:
            owner, _, attr = name.rpartition(".")
            module = modules[owner]
            if isinstance(old, nn.Parameter):
                if id(old) not in replaced:
                    replaced[id(old)] = nn.Parameter(new_data, requires_grad=old.requires_grad)
                module._parameters[attr] = replaced[id(old)]
            else:
                replaced.setdefault(id(old), new_data)
                module._buffers[attr] = replaced[id(old)]
    return model.state_dict(keep_vars=True)
