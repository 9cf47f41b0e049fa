"""Jobs of N ranks on the CPU without paying torchrun's start-up: every rank is forked from one server process that
has imported torch, transformers and gemma3vl once (the standard library's forkserver, with those modules
preloaded), instead of a fresh interpreter importing them again.

On a 2-core machine torchrun spends 10-17 s of each job importing torch in its agent and in every worker, and the
layout tests run dozens of jobs. What a worker sees is what torchrun gives it: the command line
(``gemma3vl.cli.main(argv)`` is the ``gemma3vl`` command), the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, one intra-op thread), its
own standard output and error, and a job that fails as a whole when one rank fails (the others are stopped, as
torchrun stops them). What this does not exercise, torchrun's own agent (rendezvous, restarts, signal forwarding),
is tested with the real ``torchrun`` command: test_multinode.py, and in test_parallel_layouts.py the SIGTERM, the
world-size and one layout test.

Single commands too (``run``, ``start``): ``gemma3vl ...`` or an example script in a process of its own, as a user
runs it, for the tests that run, kill and resume whole trainings.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

# What a training rank imports (the forked ranks find them imported).
PRELOAD = [
    "torch", "torch._dynamo", "torch.distributed", "torch.distributed.tensor", "torch.distributed.checkpoint",
    "matplotlib.figure",
    "transformers", "transformers.models.gemma3", "transformers.models.siglip",
    "gemma3vl.cli", "gemma3vl.train.run", "gemma3vl.train.trainer", "gemma3vl.api", "launch_ranks",
]
STOP_GRACE_S = 5.0


def forkserver() -> Any:
    """The multiprocessing context whose processes are forked from the preloaded server (started at first use)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn: Callable[..., None], args: tuple, nprocs: int) -> None:
    """``torch.multiprocessing.spawn(fn, args, nprocs)`` with the ranks forked from the preloaded server: ``fn(rank,
    *args)`` in each; a rank's exception is raised here with its traceback, as ``spawn`` raises it."""
    import torch.multiprocessing as mp

    forkserver()
    mp.start_processes(fn, args=args, nprocs=nprocs, start_method="forkserver")


def start(argv: Sequence[str], stdout: str, stderr: str, *, env: dict[str, str] | None = None,
          script: str | None = None, code: str | None = None, threads: int | None = None,
          prepare: tuple[Callable[..., None], tuple] | None = None) -> Any:
    """``python -m gemma3vl ARGV`` (or ``python SCRIPT ARGV``, or ``python -c CODE``) started, forked from the
    preloaded server, its output appended to the files ``stdout`` and ``stderr``; ``env`` added to its environment;
    ``threads``: torch's intra-op threads (the machine's cores if None); ``prepare``: ``(function, args)`` called in
    the child first. Returns the ``multiprocessing.Process`` (pid, exitcode: negative when killed by a signal)."""
    process = forkserver().Process(target=_child, args=(list(argv), dict(env or {}), stdout, stderr, script, code,
                                                        threads, prepare))
    process.start()
    return process


def run(argv: Sequence[str], *, timeout: float, script: str | None = None) -> subprocess.CompletedProcess:
    """``python -m gemma3vl ARGV`` (or ``python SCRIPT ARGV``), one process, to its end: what ``subprocess.run``
    with ``capture_output=True, text=True`` returns."""
    with tempfile.TemporaryDirectory(prefix="command-") as logs:
        out, err = str(Path(logs) / "out"), str(Path(logs) / "err")
        process = start(argv, out, err, script=script)
        if _wait([process], timeout) is None:
            raise subprocess.TimeoutExpired([script or "gemma3vl", *argv], timeout, _text(out), _text(err))
        return subprocess.CompletedProcess([script or "gemma3vl", *argv], process.exitcode, _text(out), _text(err))


def _child(argv: list[str], env: dict[str, str], stdout: str, stderr: str, script: str | None, code_text: str | None,
           threads: int | None, prepare: tuple[Callable[..., None], tuple] | None) -> None:
    """In the forked process: the environment, the output files, the command, its exit code."""
    os.environ.update(env)
    for path, fd in ((stdout, 1), (stderr, 2)):
        with open(path, "ab") as file:
            os.dup2(file.fileno(), fd)
    import torch

    if threads is not None:  # OMP_NUM_THREADS in env comes too late to be read: libgomp read it at import
        torch.set_num_threads(threads)
    code = 1
    try:
        if prepare is not None:
            prepare[0](*prepare[1])
        if code_text is not None:
            exec(compile(code_text, "<code>", "exec"), {"__name__": "__main__"})  # noqa: S102 - the test's own code
            code = 0
        elif script is None:
            from gemma3vl.cli import main

            code = main(argv)
        else:
            import runpy

            sys.argv = [script, *argv]
            runpy.run_path(script, run_name="__main__")
            code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - what an uncaught exception does to a process: a traceback, exit code 1
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def run_job(nproc: int, argv: Sequence[str], *, timeout: float) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node NPROC -m gemma3vl ARGV`` as a finished process: the exit code (1 when
    a rank failed, whose exit code is named in ``stderr`` as torchrun names it), the ranks' output one after another.
    ``subprocess.TimeoutExpired`` after ``timeout`` seconds, every rank killed."""
    common = {"WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "ROLE_RANK": "0",
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
              "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TORCHELASTIC_RUN_ID": "forked"}
    with tempfile.TemporaryDirectory(prefix="ranks-") as logs:
        files = [(str(Path(logs) / f"{rank}.out"), str(Path(logs) / f"{rank}.err")) for rank in range(nproc)]
        ranks = [start(argv, *files[rank], env={**common, "RANK": str(rank), "LOCAL_RANK": str(rank)}, threads=1)
                 for rank in range(nproc)]
        failed = _wait(ranks, timeout)
        stdout = "".join(_text(out) for out, _ in files)
        stderr = "".join(_text(err) for _, err in files)
    if failed is None:
        raise subprocess.TimeoutExpired(["gemma3vl", *argv], timeout, stdout, stderr)
    code = 0
    if failed:
        code = 1
        stderr += "".join(f"[launch_ranks] rank {i} exited with code {rank.exitcode}\n"
                          for i, rank in enumerate(ranks) if rank.exitcode)
    return subprocess.CompletedProcess(["gemma3vl", *argv], code, stdout, stderr)


def _text(path: str) -> str:
    return Path(path).read_text(errors="replace") if Path(path).is_file() else ""


def _wait(ranks: list, timeout: float) -> bool | None:
    """Wait for every rank; when one fails, stop the others (SIGTERM, then SIGKILL after a grace) as torchrun does.
    True when one failed, False when all succeeded, None on timeout (all killed)."""
    deadline = time.monotonic() + timeout
    while any(rank.is_alive() for rank in ranks):
        if any(rank.exitcode for rank in ranks):
            _stop(ranks)
            return True
        if time.monotonic() > deadline:
            for rank in ranks:
                rank.kill()
                rank.join()
            return None
        time.sleep(0.02)
    return any(rank.exitcode for rank in ranks)


def _stop(ranks: list) -> None:
    for rank in ranks:
        if rank.is_alive():
            os.kill(rank.pid, signal.SIGTERM)
    end = time.monotonic() + STOP_GRACE_S
    for rank in ranks:
        rank.join(max(0.0, end - time.monotonic()))
        if rank.is_alive():
            rank.kill()
            rank.join()
