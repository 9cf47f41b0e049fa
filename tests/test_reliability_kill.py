"""SIGKILL at random and at chosen moments during an export, an import, a save of a model in memory
(``save_native``, ``export_model``) and a training-checkpoint save.

The real work runs in a child process (``gemma3vl.cli.main``: the code ``python -m gemma3vl`` runs; for the API
calls, a few lines of Python) that is killed with SIGKILL after a seeded random delay, or just after it reaches a
chosen phase. The child slows its own writes down with sleeps (hooks installed in the child only; the code
under test is unchanged), so that the kills land mid-write without the tests being slow. Forking each run from
one process that has already imported torch and gemma3vl keeps the import time out of every run.

What must hold after each kill: what a reader finds under the output's name is complete (the previous export,
import or save or the new one, file for file; complete training checkpoints only), a rerun cleans up after the
killed one and succeeds, and training resumed after a kill mid-save gives the per-step losses of an
uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gemma3vl import bridge
from gemma3vl.bridge.checkpoint import HFCheckpoint, open_checkpoint
from gemma3vl.errors import Gemma3VLError
from gemma3vl.train.metrics import read_metrics

import launch_ranks
from kill_hooks import install_hooks


class ForkServer:
    """Runs ``gemma3vl`` commands (or Python code) in processes forked from the preloaded server of
    launch_ranks.py, which a test can kill at a moment of its choosing. A job's hooks (kill_hooks.py) slow its
    writes and append the phases it reaches to an events file."""

    def __init__(self, directory: Path, setup: str = ""):
        self.directory = directory
        self.setup = setup  # Python run before each job's code: its names are the code's
        self.jobs = 0
        self.process = None

    def start(self, argv: list[str] | str, hooks: str | None = None, pause: float = 0.0) -> tuple[int, Path]:
        """``argv``: a ``gemma3vl`` command line, or (a string) Python code for the child to run."""
        self.jobs += 1
        events = self.directory / f"events-{self.jobs}.txt"
        log = str(self.directory / f"log-{self.jobs}.txt")
        code = f"{self.setup}\n{argv}" if isinstance(argv, str) else None
        self.process = launch_ranks.start([] if code else [str(a) for a in argv], log, log, code=code, threads=1,
                                          prepare=(install_hooks, (hooks, str(events), pause)) if hooks else None)
        return self.process.pid, events

    def wait(self) -> int:
        """The job's exit code (negative: killed by that signal)."""
        self.process.join()
        return self.process.exitcode

    def log(self) -> str:
        return (self.directory / f"log-{self.jobs}.txt").read_text()

    def run(self, argv: list[str] | str, hooks: str | None = None, pause: float = 0.0) -> int:
        self.start(argv, hooks, pause)
        code = self.wait()
        assert code == 0, self.log()[-3000:]
        return code

    def kill_after(self, argv: list[str] | str, hooks: str, pause: float, event: str, delay: float) -> list[str]:
        """Start ``argv``, SIGKILL it ``delay`` seconds after it reaches a phase starting with ``event``;
        returns the phases it reached (the last ones tell where the kill landed)."""
        pid, events = self.start(argv, hooks, pause)
        deadline = time.monotonic() + 120
        while not any(line.startswith(event) for line in _lines(events)):
            assert time.monotonic() < deadline and self.process.is_alive(), \
                f"never reached {event!r}: {self.log()[-3000:]}"
            time.sleep(0.002)
        time.sleep(delay)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it had finished: a kill "after the end" is a valid moment too
        code = self.wait()
        if code >= 0:
            assert code == 0, self.log()[-3000:]
        return _lines(events) + (["killed"] if code < 0 else ["finished"])


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def fork_server(tmp_path):
    """A factory: ``fork_server(setup="")``, whose jobs run the Python code ``setup`` first (its names are the
    jobs' code's)."""
    return lambda setup="": ForkServer(tmp_path, setup)


def digest(directory: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``directory``."""
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))


# ------------------------------------------------------------------------------------------------ export
def killed_runs(fork_server, argv, trials, previous: Path | None, out: Path):
    """For each (hooks, event, delay) trial: OUT reset to a copy of ``previous`` (removed if None), then ``argv``
    run and killed ``delay`` seconds after the child reaches ``event``; yields the trial and the phases the child
    reached."""
    for hooks, event, delay in trials:
        shutil.rmtree(out, ignore_errors=True)
        if previous is not None:
            shutil.copytree(previous, out)
        yield hooks, event, delay, fork_server.kill_after(argv, hooks, 0.003, event, delay)


def test_export_killed_at_random_moments_leaves_the_old_or_the_new_output(tmp_path, fork_server):
    """Each kill leaves OUT exactly the previous export or exactly the new one (never missing where the
    filesystem can swap directories, never a mixture); a rerun of the real CLI removes the leftovers, says
    so, and writes the same files as an export that was never interrupted; the input is never touched."""
    from gemma3vl.tiny import write_tiny_checkpoint

    fork_server = fork_server()
    hf = write_tiny_checkpoint(tmp_path / "hf", max_shard_bytes=450_000)
    native = bridge.import_checkpoint(hf, tmp_path / "native", progress=False)
    native_digest = digest(native)
    out = tmp_path / "out"
    # The previous output differs from the new one in every file, so a mixture of the two would show.
    bridge.export_checkpoint(native, tmp_path / "previous", layout="transformers5", progress=False)
    previous = digest(tmp_path / "previous")
    fork_server.run(["convert", "export", native, tmp_path / "reference"])
    new = digest(tmp_path / "reference")
    assert set(previous.values()).isdisjoint(new.values()) or previous.keys() != new.keys()
    argv = ["convert", "export", native, out, "--overwrite"]
    # With a 3 ms sleep before each of the 93 tensors, the writes alone last 0.28 s after the first "write"
    # phase, and more under load: delays below that land before the end, wherever the machine's speed puts them.
    duration = 0.28
    rng = random.Random(0)
    trials = [("export-two-renames", "renamed", 0.01),  # between the two renames: OUT is missing
              ("export", "swapped", 0.01)]  # after the atomic swap, before the old output is deleted
    trials += [("export-two-renames", "write", rng.uniform(0, duration)) for _ in range(2)]
    trials += [("export", "write", rng.uniform(0, duration)) for _ in range(5)]
    landed = []
    for hooks, event, delay, phases in killed_runs(fork_server, argv, trials, tmp_path / "previous", out):
        landed.append(phases[-2] if phases[-1] == "killed" else "after the end")
        if out.exists():
            assert digest(out) in (previous, new), (phases[-3:], sorted(digest(out)))
        else:  # killed between "OUT aside" and "new into place": the previous output is kept aside...
            assert hooks == "export-two-renames", phases[-3:]
            (aside,) = [p for p in out.parent.glob(f".{out.name}.old-*")]
            assert digest(aside) == previous
            # ...and the next write to OUT puts it back first (here one that refuses to overwrite it)
            with pytest.raises(Gemma3VLError, match="exists and is not empty"):
                bridge.export_checkpoint(native, out, progress=False)
            assert digest(out) == previous and not list(out.parent.glob(f".{out.name}.old-*"))
    assert "after the end" not in landed and sum(name.startswith("write") for name in landed) >= 3, landed
    assert "renamed" in landed and "swapped" in landed, landed

    left = leftovers(out)
    fork_server.run(argv)  # the rerun, undisturbed
    for name in left:
        assert f"removed {name}, left by process" in fork_server.log()
    logs = "".join(p.read_text() for p in tmp_path.glob("log-*.txt"))
    assert logs.count(", which was killed while writing") >= len(trials) - 1, landed
    assert digest(out) == new and leftovers(out) == []
    assert digest(native) == native_digest
    with HFCheckpoint(out) as checkpoint:  # and it opens as a checkpoint, every header checked
        assert len(checkpoint.planned_native()) > 0


def test_import_killed_at_random_moments_leaves_the_old_or_the_new_output(tmp_path, fork_server):
    """`convert import` shares the staged write with export: each kill leaves OUT the previous import or the
    new one, and the undisturbed rerun cleans up and writes what an uninterrupted import writes."""
    from gemma3vl.tiny import write_tiny_checkpoint

    fork_server = fork_server()
    hf = write_tiny_checkpoint(tmp_path / "hf", max_shard_bytes=450_000)
    hf_digest = digest(hf)
    fork_server.run(["convert", "import", hf, tmp_path / "reference"])
    new = digest(tmp_path / "reference")
    # The previous output: an import with another shard size, so every weight file differs.
    fork_server.run(["convert", "import", hf, tmp_path / "previous", "--max-shard-size", "200KB"])
    previous = digest(tmp_path / "previous")
    assert previous != new
    out = tmp_path / "out"
    argv = ["convert", "import", hf, out, "--overwrite"]
    rng = random.Random(1)
    trials = [("export", "swapped", 0.01)] + [("export", "write", rng.uniform(0, 0.28)) for _ in range(3)]
    landed = []
    for _, _, _, phases in killed_runs(fork_server, argv, trials, tmp_path / "previous", out):
        landed.append(phases[-2] if phases[-1] == "killed" else "after the end")
        assert digest(out) in (previous, new), (phases[-3:], sorted(digest(out)))
    assert "after the end" not in landed and "swapped" in landed, landed
    fork_server.run(argv)
    assert digest(out) == new and leftovers(out) == []
    assert digest(hf) == hf_digest


# ------------------------------------------------------------------------------------------------ save_native
# The children's model: the tiny checkpoint HF, loaded once by the fork server (its forked children inherit it).
SAVE_SETUP = """
import torch
from gemma3vl import bridge
from gemma3vl.model import Gemma3Model
HF = {hf!r}
model = Gemma3Model(bridge.read_config(HF))  # load_model's steps, on the CPU (on "meta" the first costs seconds)
bridge.load_weights(HF, model, device="cpu", dtype=torch.float32)
"""


def save_script(call: str, out: Path, shift: float = 0.0, **kwargs) -> str:
    """Child code: every weight of SAVE_SETUP's model shifted by ``shift``, then ``bridge.<call>(model, HF, out,
    **kwargs)`` (``save_native`` or ``export_model``)."""
    arguments = "".join(f", {key}={value!r}" for key, value in kwargs.items())
    return (f"with torch.no_grad():\n    for parameter in model.parameters():\n        parameter.add_({shift!r})\n"
            f"bridge.{call}(model, HF, {str(out)!r}{arguments})\n")


def loaded(directory: Path) -> dict[str, bytes]:
    """What a loader pointed at ``directory`` finds (every header checked, as ``load_model`` reads it): native
    tensor name -> the bytes of its value."""
    with open_checkpoint(directory) as checkpoint:
        return {m.native: checkpoint.read_native(m).contiguous().numpy().tobytes() for m in checkpoint.mappings}


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_save_native_killed_at_chosen_moments_leaves_the_old_or_the_new_directory(tmp_path, fork_server):
    """`bridge.save_native` (a model in memory to a native directory) killed in each phase of its write: in the
    shards, before the index, before the manifest, before and after the move into place (the atomic swap or,
    on the fallback, between its two renames); into a fresh OUT and over a previous save. A loader pointed at
    OUT finds the previous directory or the new one, tensor for tensor (nothing only on a fresh save, or
    between the fallback's renames, whose next write puts the previous one back); what the kills leave is a
    hidden ``.OUT.tmp-PID`` (``.OUT.old-PID``) that the next save removes, saying so; the rerun writes what an
    uninterrupted save writes."""
    from gemma3vl.tiny import write_tiny_checkpoint

    hf = write_tiny_checkpoint(tmp_path / "hf", max_shard_bytes=450_000)
    fork_server = fork_server(SAVE_SETUP.format(hf=str(hf)))
    fork_server.run(save_script("save_native", tmp_path / "reference", max_shard_bytes=450_000))
    # The previous directory: every weight shifted by 1, in other shards, so a mixture of the two would show.
    fork_server.run(save_script("save_native", tmp_path / "previous", 1.0, max_shard_bytes=200_000))
    new, previous = digest(tmp_path / "reference"), digest(tmp_path / "previous")
    new_weights, previous_weights = loaded(tmp_path / "reference"), loaded(tmp_path / "previous")
    assert new_weights == loaded(hf)  # an uninterrupted save gives back the model's weights, bit for bit
    assert all(previous_weights[name] != value for name, value in new_weights.items())
    shards = lambda files: {files[name] for name in files if name.endswith(".safetensors")}  # noqa: E731
    assert shards(previous).isdisjoint(shards(new)) and len(shards(previous)) > len(shards(new)) > 1
    out = tmp_path / "out"
    argv = save_script("save_native", out, max_shard_bytes=450_000, overwrite=True)
    # 73 tensors with a 3 ms sleep before each: the shards alone last 0.22 s after the first "write" phase.
    duration = 0.2
    rng = random.Random(2)
    fresh = [("native", "write", rng.uniform(0, duration)),
             ("native", "manifest", 0.01),  # shards, index and side files written, not the manifest
             ("native", "rename", 0.01),  # complete and fsynced in .OUT.tmp-PID, not yet renamed to OUT
             ("native", "renamed", 0.01)]  # renamed, the parent directory not yet fsynced
    over = [("native", "write", rng.uniform(0, duration)) for _ in range(3)]
    over += [("native", "index", 0.01),  # every shard written, not the index
             ("native", "manifest", 0.01),
             ("native", "swap", 0.01),  # complete, before the atomic swap
             ("native-two-renames", "renamed", 0.01),  # between the two renames: OUT is missing
             ("native", "swapped", 0.01),  # after the swap, before the previous directory is deleted
             ("native-two-renames", "write", rng.uniform(0, duration))]
    landed = []
    for trials, before in ((fresh, None), (over, tmp_path / "previous")):
        for hooks, event, delay, phases in killed_runs(fork_server, argv, trials, before, out):
            landed.append(phases[-2] if phases[-1] == "killed" else "after the end")
            left = leftovers(out)
            assert all(re.fullmatch(r"\.out\.(tmp|old)-\d+", name) for name in left), (phases[-3:], left)
            if out.exists():
                assert digest(out) in ((previous, new) if before else (new,)), (phases[-3:], sorted(digest(out)))
                assert loaded(out) == (previous_weights if digest(out) == previous else new_weights)
                continue
            with pytest.raises(Gemma3VLError, match="no such directory"):  # nothing there, never half a one
                loaded(out)
            if before is None:  # a fresh save killed before its rename into place
                assert "renamed" not in phases and left, (phases[-3:], left)
                continue
            # killed between "OUT aside" and "new into place": the previous directory is kept aside...
            assert hooks == "native-two-renames" and phases[-2] == "renamed", phases[-3:]
            (aside,) = out.parent.glob(f".{out.name}.old-*")
            assert digest(aside) == previous
            # ...and the next write to OUT puts it back first (here a save that refuses to overwrite it)
            fork_server.start(save_script("save_native", out, max_shard_bytes=450_000))
            assert fork_server.wait() != 0
            assert "restored the previous output" in fork_server.log()
            assert "exists and is not empty (pass overwrite=True" in fork_server.log()
            assert digest(out) == previous and leftovers(out) == []
    assert "after the end" not in landed and sum(name.startswith("write") for name in landed) >= 4, landed
    for moment in ("index", "manifest", "swap", "swapped", "renamed"):
        assert moment in landed, landed
    assert any(name.startswith("rename .out.tmp-") for name in landed), landed

    left = leftovers(out)
    fork_server.run(argv)  # the rerun, undisturbed
    assert left and all(f"removed {name}, left by process" in fork_server.log() for name in left), left
    logs = "".join(p.read_text() for p in tmp_path.glob("log-*.txt"))
    assert logs.count(", which was killed while writing") >= len(fresh) + len(over) - 1, landed
    assert digest(out) == new and leftovers(out) == []
    assert loaded(out) == new_weights
    assert hidden(tmp_path) == []


def test_export_model_killed_while_saving_its_native_copy_keeps_the_previous_export(tmp_path, fork_server):
    """`export_model` (what training's final export to OUT/hf runs) first saves the model with `save_native`
    into a hidden ``.OUT.native-PID``. Kills there (in its shards, before its manifest, just after its rename
    into place, before the export starts) leave OUT the previous export, file for file; the next export (any
    write to OUT: ``staged_output`` removes them too) removes both kinds of leftover (``..OUT.native-PID.tmp-PID``
    and ``.OUT.native-PID``), saying so, and writes what an uninterrupted one writes."""
    from gemma3vl.tiny import write_tiny_checkpoint

    hf = write_tiny_checkpoint(tmp_path / "hf", max_shard_bytes=450_000)
    fork_server = fork_server(SAVE_SETUP.format(hf=str(hf)))
    fork_server.run(save_script("export_model", tmp_path / "reference"))
    fork_server.run(save_script("export_model", tmp_path / "previous", 1.0))
    new, previous = digest(tmp_path / "reference"), digest(tmp_path / "previous")
    assert new == digest(hf) and previous != new
    out = tmp_path / "out"
    argv = save_script("export_model", out, overwrite=True)
    rng = random.Random(3)
    trials = [("native", "write", rng.uniform(0, 0.2)) for _ in range(2)]
    trials += [("native", "manifest", 0.01), ("native", "renamed", 0.01)]
    landed = []
    for _, _, _, phases in killed_runs(fork_server, argv, trials, tmp_path / "previous", out):
        landed.append(phases[-2] if phases[-1] == "killed" else "after the end")
        assert digest(out) == previous, (phases[-3:], sorted(digest(out)))
        # what the kill left: the native copy's staging directory, or the whole copy once renamed into place
        expected = [".out.native-PID"] if phases[-2] == "renamed" else ["..out.native-PID.tmp-PID"]
        assert [re.sub(r"-\d+", "-PID", name) for name in hidden(tmp_path)] == expected, phases[-3:]
    assert "after the end" not in landed and "manifest" in landed and "renamed" in landed, landed
    assert sum(name.startswith("write") for name in landed) == 2, landed

    fork_server.run(argv)
    logs = "".join(p.read_text() for p in tmp_path.glob("log-*.txt"))
    assert logs.count("the native copy of an export by process") == len(trials), landed
    assert digest(out) == new and hidden(tmp_path) == []


def test_a_killed_exports_native_copy_is_removed_by_the_next_convert_export(tmp_path, caplog):
    """A native copy a killed ``export_model`` left beside OUT (a whole model) goes at the next write to OUT of any
    kind (here ``convert export``), not only at the next ``export_model``; a running process's copy stays."""
    from gemma3vl.tiny import write_tiny_checkpoint

    native = bridge.import_checkpoint(write_tiny_checkpoint(tmp_path / "hf"), tmp_path / "native", progress=False)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)  # a process that has ended
    left = [tmp_path / f".out.native-{dead}", tmp_path / f"..out.native-{dead}.tmp-{dead}"]
    running = tmp_path / f".out.native-{os.getppid()}"  # a live process's (pytest's parent), not ours
    for directory in (*left, running):
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(b"x" * 1000)
    bridge.export_checkpoint(native, tmp_path / "out", progress=False)
    assert not any(path.exists() for path in left) and running.is_dir()
    assert caplog.text.count("the native copy of an export by process") == 2


# ------------------------------------------------------------------------------------------------ training
FAST = ["train.seq_length=128", "train.global_batch_size=2", "train.micro_batch_size=1", "train.eval_every=0",
        "data.eval_accuracy_samples=0", "logging.progress=false", "checkpoint.every=1", "checkpoint.keep_last=1"]


def train_argv(out: Path, *extra: str) -> list:
    return ["train", "--recipe", "tiny_sft", "--out", out, "train.steps=3", *FAST, *extra]


def assert_complete_checkpoints_are_whole(root: Path) -> list[str]:
    """Every directory that looks like a checkpoint (``step-N`` with ``COMPLETE``) has all its files: its
    trainer state for step N, metadata that passes the pickle allow-list, and every byte range the DCP
    metadata points at. Returns their names."""
    from torch.distributed.checkpoint import FileSystemReader

    from gemma3vl.train.checkpoint import list_checkpoints
    from gemma3vl.train.safe_metadata import check_metadata

    names = []
    for path in list_checkpoints(root):
        assert json.loads((path / "trainer_state.json").read_text())["step"] == int(path.name.split("-")[1])
        check_metadata(path)
        for info in FileSystemReader(str(path)).read_metadata().storage_data.values():
            assert (path / info.relative_path).stat().st_size >= info.offset + info.length, (path, info)
        names.append(path.name)
    return names


def test_training_killed_mid_save_resumes_to_the_same_losses(tmp_path, fork_server):
    """Kills land in checkpoint saves (seeded delays across a slowed save: in DCP's write, before its
    metadata, before the marker's fsync, around the rename, in the pruning of the previous checkpoint) and in
    the final export. After each kill every complete-looking checkpoint is whole, and ``--resume`` goes on from
    the newest; the per-step losses and gradient norms of the killed-and-resumed run equal an uninterrupted
    run's, bit for bit on the CPU, and the final export is complete."""
    fork_server = fork_server()
    whole = tmp_path / "whole"
    fork_server.run(train_argv(whole))
    killed = tmp_path / "killed"
    killed.mkdir()
    for name in ("base", "data"):  # both runs read the same model and data bytes
        os.symlink(whole / name, killed / name)
    root = killed / "checkpoints"
    rng = random.Random(1)
    landed = []
    # A slowed save lasts > 0.5 s (0.05 s sleeps around each phase): the sleeps alone put each kill inside it.
    # Step 2's kill lands between the start of DCP's write and the rename; step 3's in the pruning of step 2
    # that follows its rename into place (keep_last=1), while step 2's files are deleted one by one.
    for step, event, window in ((2, "save .step-00000002", (0, 0.35)), (3, "replace .step-00000003", (0.2, 0.28))):
        phases = fork_server.kill_after(train_argv(killed, "--resume"), "train", 0.05, event, rng.uniform(*window))
        assert phases[-1] == "killed", phases
        landed.append(phases[-2])
        complete = assert_complete_checkpoints_are_whole(root)
        assert complete and complete[-1] in (f"step-{step - 1:08d}", f"step-{step:08d}"), (complete, phases)
        assert not (killed / "hf").exists()
    # the last save is done; now kill the final export of OUT/hf part-way through its files
    phases = fork_server.kill_after(train_argv(killed, "--resume"), "export", 0.003, "write", 0.02)
    assert phases[-1] == "killed" and not (killed / "hf").exists(), phases
    assert assert_complete_checkpoints_are_whole(root) == ["step-00000003"]

    fork_server.run(train_argv(killed, "--resume"))
    expected = read_metrics(whole / "metrics.jsonl")
    got = read_metrics(killed / "metrics.jsonl")
    for key in ("loss", "grad_norm"):
        want = {r["step"]: r[key] for r in expected if r.get(key) is not None}
        have = {r["step"]: r[key] for r in got if r.get(key) is not None}
        assert sorted(want) == [1, 2, 3] and have == want, (key, landed)
    assert digest(killed / "hf") == digest(whole / "hf")
    assert leftovers(killed / "hf") == []
    # what killed saves left is hidden (the next save's prune removes it), never taken for a checkpoint
    assert all(p.name.startswith(".step-") and ".tmp-" in p.name for p in root.iterdir() if p.name[0] == "."), landed
