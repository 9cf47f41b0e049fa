"""Training checkpoints with ``torch.distributed.checkpoint`` (DCP): reshardable, written atomically.

A checkpoint directory ``OUT/checkpoints/step-00000010/`` holds the DCP files of the trainable weights
(frozen ones come from the base model and are not repeated), the optimizer state keyed by parameter name,
the RNG states, and ``trainer_state.json`` (step, scheduler, data position). It is written under a
temporary name and renamed only when complete; ``COMPLETE`` inside marks it, and loading refuses a
directory without it. The last ``keep_last`` complete checkpoints are kept; older ones are renamed to a
hidden temporary name before they are deleted, so a process killed at any moment (tests kill it with SIGKILL
mid-save) leaves complete checkpoints and hidden leftovers, never a ``COMPLETE`` directory with files missing.

Under ``torchrun`` every rank writes its own shards into the same staging directory (DCP collects them into
one checkpoint that loads into any other layout: DTensors are resharded on load); rank 0 alone writes
``trainer_state.json`` and the marker, renames and prunes, and the others wait for it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from gemma3vl.errors import Gemma3VLError
from gemma3vl.train.safe_metadata import check_metadata

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
PREFIX = "step-"
# The optimizer state flattened to one entry per parameter name ("state.text.layers.3.attn.o.weight.exp_avg",
# "param_groups.<name>.lr"): pipeline stages each hold some of the parameters, and a nested state dict (one
# param_groups list per rank) would keep only one rank's list. Flat, every layout writes and reads the same keys.
_OPTIONS = StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=True)


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _rng_tensors() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_main() -> bool:
    return not _distributed() or dist.get_rank() == 0


def _staging_tag() -> int:
    """The pid in the staging name; rank 0's on every rank, so that all ranks write one directory."""
    if not _distributed():
        return os.getpid()
    tag = [os.getpid()]
    dist.broadcast_object_list(tag, src=0)
    return int(tag[0])


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _retire(checkpoint: Path) -> None:
    """Delete a checkpoint so that a kill part-way never leaves a ``COMPLETE`` directory with files missing:
    it is first renamed to a hidden temporary name (one atomic step; the next prune removes what is left)."""
    hidden = checkpoint.parent / f".{checkpoint.name}.tmp-retired-{os.getpid()}"
    os.replace(checkpoint, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    data_state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    staging = root / f".{checkpoint_name(step)}.tmp-{_staging_tag()}"
    if _is_main():
        shutil.rmtree(staging, ignore_errors=True)
    _barrier()  # nobody writes into the staging directory before it is clean
    model_state, optim_state = get_state_dict(model, optimizer, options=_OPTIONS)
    trainer_state = {
        "step": step,
        "scheduler": scheduler.state_dict(),
        "data": data_state,
        "python_rng": _jsonable(random.getstate()),
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is not initialised": single process is fine
            dcp.save({"model": model_state, "optim": optim_state, "rng": _rng_tensors()}, checkpoint_id=str(staging))
        if _is_main():  # dcp.save has returned on rank 0 only once every rank's shards are written
            (staging / STATE_FILE).write_text(json.dumps(trainer_state))
            (staging / COMPLETE).write_text(f"step {step}\n")
            _fsync_tree(staging)
    except (OSError, CheckpointException) as exc:  # (a full disk inside dcp.save arrives as the latter)
        shutil.rmtree(staging, ignore_errors=True)
        reason = exc if isinstance(exc, OSError) else _dcp_failure(exc)
        raise Gemma3VLError(
            f"{root}: cannot write the checkpoint of step {step} ({reason}); earlier checkpoints are untouched"
        ) from None
    if _is_main():
        if final.exists():  # e.g. resumed from an earlier step: retire the old one before it is deleted
            _retire(final)
        os.replace(staging, final)
        _fsync_dir(root)
        _prune(root, keep_last)
    _barrier()  # the checkpoint is complete for every rank before any goes on (or resumes from it)
    return final


def _dcp_failure(exc: BaseException) -> str:
    """What failed inside DCP, on one line. DCP wraps each rank's error (a full disk's ``OSError`` too) in a
    ``CheckpointException``, a ``BaseException`` whose text is whole tracebacks; a Ctrl-C inside it stays one."""
    failures = [pair[0] for pair in getattr(exc, "failures", {}).values() if isinstance(pair, tuple) and pair]
    if any(isinstance(failure, KeyboardInterrupt) for failure in failures):
        raise KeyboardInterrupt from None
    first = failures[0] if failures else exc
    text = " ".join(str(first).split())
    return text if isinstance(first, OSError) else f"{type(first).__name__}: {text}" if text else type(first).__name__


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _tupled(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tupled(v) for v in value)
    return value


def _prune(root: Path, keep_last: int) -> None:
    complete = list_checkpoints(root)
    for old in complete[: max(len(complete) - max(keep_last, 1), 0)]:
        _retire(old)
    for stale in root.glob(f".{PREFIX}*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    complete = list_checkpoints(root)
    return complete[-1] if complete else None


def agreed_checkpoint(root: Path, path: Path | None) -> Path | None:
    """Under ``torchrun``, the checkpoint rank 0 chose (``path`` on rank 0), on every rank, once every rank has
    checked that it sees it complete (collective). Each rank listing ``root`` for itself could pick another step
    where a node's view of the shared filesystem lags (a cached directory listing) and then run other steps than
    its peers. A checkpoint under ``root`` is sent by its name, so nodes may mount the filesystem at different
    paths. One process: ``path`` as it is."""
    if not _distributed():
        return path
    chosen: list[Any] = [None]
    if path is not None:
        chosen = [("name", path.name) if path.parent == root else ("path", str(path))]
    dist.broadcast_object_list(chosen, src=0)
    path = None if chosen[0] is None else root / chosen[0][1] if chosen[0][0] == "name" else Path(chosen[0][1])
    seen: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(seen, path is None or (path / COMPLETE).is_file())
    blind = [rank for rank, ok in enumerate(seen) if not ok]
    if blind:
        raise Gemma3VLError(
            f"{path}: rank 0 resumes from this checkpoint, but rank(s) {', '.join(map(str, blind[:16]))} do not see it "
            f"complete (no {COMPLETE} marker there): the run's --out must be one directory shared by every node")
    return path


def _check_same_trainable(path: Path, model_state: dict[str, Any]) -> None:
    """The checkpoint must hold exactly this model's trainable weights. DCP reports weights it lacks but ignores
    ones this model does not train (e.g. DoRA magnitudes when resuming with peft.method=lora), whose optimizer
    state then no longer fits the optimizer: say so here instead of failing deep inside the first step. One
    process only: a pipeline stage holds only its own share of the weights."""
    if _distributed():
        return
    try:
        saved = {key[len("model."):] for key in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
                 if key.startswith("model.")}
    except Exception:
        return  # unreadable metadata: dcp.load below reports it
    extra, missing = sorted(saved - set(model_state)), sorted(set(model_state) - saved)
    if extra or missing:
        detail = "; ".join(part for part in (
            f"{len(extra)} trained weight(s) this model does not train, e.g. {extra[0]}" if extra else "",
            f"no {len(missing)} weight(s) this model trains, e.g. {missing[0]}" if missing else "") if part)
        raise Gemma3VLError(
            f"{path}: the checkpoint holds {detail}. Resume with the settings the run was started with "
            f"(peft.*, train.freeze_*: see train_config.json beside the checkpoints)")


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG; returns the trainer state (step, data position)."""
    if not (path / COMPLETE).is_file():
        raise Gemma3VLError(f"{path}: not a complete training checkpoint (no {COMPLETE} marker)")
    try:
        trainer_state = json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Gemma3VLError(f"{path / STATE_FILE}: unreadable ({exc})") from None
    if not isinstance(trainer_state, dict) or not {"step", "scheduler", "python_rng", "data"} <= set(trainer_state):
        raise Gemma3VLError(f"{path / STATE_FILE}: not a trainer state (expected an object with step, scheduler, "
                            f"data and python_rng)")
    check_metadata(path)
    model_state, optim_state = get_state_dict(model, optimizer, options=_OPTIONS)
    _check_same_trainable(path, model_state)
    state = {"model": model_state, "optim": optim_state, "rng": _rng_tensors()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dcp.load(state, checkpoint_id=str(path))
        except CheckpointException as exc:  # (a truncated or corrupt shard file: DCP wraps what reading it raised)
            raise Gemma3VLError(f"{path}: cannot load the checkpoint ({_dcp_failure(exc)}); its files are damaged "
                                f"or incomplete: resume from another checkpoint (--resume PATH)") from None
        except Exception as exc:
            raise Gemma3VLError(f"{path}: cannot load the checkpoint into this model/optimizer ({exc})") from None
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
        options=StateDictOptions(ignore_frozen_params=True, strict=False, flatten_optimizer_state_dict=True),
    )
    scheduler.load_state_dict(trainer_state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    random.setstate(_tupled(trainer_state["python_rng"]))
    return trainer_state
