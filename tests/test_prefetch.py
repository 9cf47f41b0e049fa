"""Steps built ahead by a background thread (``data.prefetch``, gemma3vl.data.prefetch): the same steps and losses as
without, checkpoints at the position of the steps trained on, the producer's errors at the step that would have
consumed its batch, and no thread left behind. Tiny model on the CPU; nothing here measures time."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from gemma3vl.data.prefetch import PrefetchFeed
from gemma3vl.errors import Gemma3VLError
from gemma3vl.train.checkpoint import STATE_FILE, latest_checkpoint
from gemma3vl.train.config import build_config
from gemma3vl.train.run import QuietLogger, build_trainer, prepare_tiny_inputs
from gemma3vl.train.trainer import Trainer, TrainingStopped

FAST = ["train.seq_length=128", "train.global_batch_size=2", "train.micro_batch_size=1", "train.steps=4",
        "train.eval_every=0", "checkpoint.every=2", "checkpoint.keep_last=5", "logging.progress=false",
        "logging.tensorboard=false"]
DEADLINE_S = 60  # only ever reached when something is broken


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "gemma3vl-prefetch"]


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.005)


# ---------------------------------------------------------------------------------------------- the class alone
class CountingFeed:
    """Step n is ``[n]``; its position is ``{"after": n}``. ``fail_at``: step that raises instead."""

    def __init__(self, fail_at: int | None = None, gate: threading.Event | None = None):
        self.built = 0
        self.fail_at = fail_at
        self.gate = gate
        self.error = RuntimeError("a bug in the data pipeline")

    def next_step(self):
        if self.gate is not None:
            assert self.gate.wait(DEADLINE_S)
        if self.built + 1 == self.fail_at:
            raise self.error
        self.built += 1
        return [self.built]

    def state_dict(self):
        return {"after": self.built, "nested": {"list": [self.built]}}


def test_same_steps_and_the_position_of_the_steps_handed_out():
    feed = CountingFeed()
    with PrefetchFeed(feed, depth=3) as prefetch:
        assert prefetch.state_dict() == {"after": 0, "nested": {"list": [0]}}
        for n in range(1, 6):
            wait_for(lambda: feed.built >= n + 2, "the thread builds ahead")
            assert prefetch.next_step() == [n]
            assert feed.built > n  # the feed itself is ahead ...
            assert prefetch.state_dict() == {"after": n, "nested": {"list": [n]}}  # ... the position is not
        wait_for(lambda: feed.built == 5 + 3 + 1, "a full queue, and one more step waiting to be queued")
        time.sleep(0.02)
        assert feed.built == 9  # bounded: nothing more is built until a step is taken
    assert not prefetch.alive and not prefetch_threads()
    with pytest.raises(Gemma3VLError, match="closed"):
        prefetch.next_step()


def test_an_error_is_raised_by_the_step_that_would_have_received_it_and_after():
    feed = CountingFeed(fail_at=3)
    with PrefetchFeed(feed, depth=2) as prefetch:
        assert prefetch.next_step() == [1]
        assert prefetch.next_step() == [2]
        for _ in range(2):
            with pytest.raises(RuntimeError) as raised:
                prefetch.next_step()
            assert raised.value is feed.error
        assert prefetch.state_dict()["after"] == 2
        wait_for(lambda: not prefetch.alive, "the thread ends after an error")


def test_close_ends_a_thread_blocked_on_a_full_queue_and_never_waits_long_on_a_busy_one():
    feed = CountingFeed()
    prefetch = PrefetchFeed(feed, depth=1)
    wait_for(lambda: feed.built == 2, "one step queued and one waiting")
    prefetch.close()
    assert not prefetch.alive

    gate = threading.Event()  # the thread is inside next_step (reading a slow disk, say) when the run ends
    busy = PrefetchFeed(CountingFeed(gate=gate), depth=1, join_timeout=0.01)
    busy.close()  # returns without the step
    assert busy.alive and busy._thread.daemon  # (a daemon: it cannot keep the process alive)
    gate.set()
    busy._thread.join(DEADLINE_S)
    assert not busy.alive  # it finished the step it was building and ended, building nothing more


def test_depth_must_be_positive():
    with pytest.raises(Gemma3VLError, match="at least 1"):
        PrefetchFeed(CountingFeed(), depth=0)


@pytest.mark.parametrize("text, message", [
    ("data:\n  prefetch: -1\n", "data.prefetch=-1 must be >= 0"),
    ("data:\n  prefetch: 1.5\n", "data.prefetch=1.5: expected an integer"),
    ("data:\n  prefetch: true\n", "data.prefetch=True: expected an integer"),
    ("data:\n  prefetch: [2]\n", r"data.prefetch=\[2\]: expected an integer"),
])
def test_the_setting_is_checked(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(Gemma3VLError, match=message):
        build_config("tiny_sft", str(path))


def test_the_setting_parses():
    assert build_config("tiny_sft").data.prefetch == 2
    assert build_config("tiny_sft", overrides=["data.prefetch=0"]).data.prefetch == 0
    with pytest.raises(Gemma3VLError, match="expected an integer"):
        build_config("tiny_sft", overrides=["data.prefetch=two"])


# ---------------------------------------------------------------------------------------------- in the trainer
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The tiny model and drawn data, written once; every run below reads them."""
    root = tmp_path_factory.mktemp("inputs")
    cfg = build_config("tiny_sft", overrides=[f"out={root}"])
    prepare_tiny_inputs(cfg, root)
    return Path(cfg.model.path), Path(cfg.data.path)


def make_trainer(inputs, out: Path, prefetch: int, *extra: str, data: Path | None = None) -> Trainer:
    model, train = inputs
    cfg = build_config("tiny_sft", overrides=[*FAST, f"data.prefetch={prefetch}", f"out={out}", *extra])
    cfg.model.path, cfg.data.path, cfg.data.eval_path = str(model), str(data or train), None
    return build_trainer(cfg, out)[0]


def losses(history) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in history if "loss" in r}


def record_saved_positions(monkeypatch) -> dict[int, dict]:
    """Each checkpoint's data position, by step (what ``Trainer.save`` stores)."""
    saved: dict[int, dict] = {}
    real_save = Trainer.save

    def save(self):
        saved[self.step] = self.feed.state_dict()
        return real_save(self)

    monkeypatch.setattr(Trainer, "save", save)
    return saved


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory):
    """Per-step losses, checkpointed data positions and the data's counts of 4 steps read synchronously
    (data.prefetch=0)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        saved = record_saved_positions(monkeypatch)
        trainer = make_trainer(inputs, tmp_path_factory.mktemp("sync"), 0)
        history = trainer.run(QuietLogger()).history
    return losses(history), saved, trainer.feed.summary().to_dict()


def test_prefetching_trains_on_the_same_steps_while_the_next_ones_are_built(inputs, uninterrupted, tmp_path,
                                                                              monkeypatch):
    """Bit-for-bit losses and positions; and while step k is still in progress the thread has built steps k+1 and
    k+2 (step k waits for them: were they built between steps, it would wait in vain)."""
    expected, expected_saved, expected_summary = uninterrupted
    saved = record_saved_positions(monkeypatch)
    trainer = make_trainer(inputs, tmp_path, 2)
    built = []
    real_next_step = trainer.batcher.next_step

    def next_step():
        step = real_next_step()
        built.append(threading.current_thread().name)
        return step

    trainer.batcher.next_step = next_step
    real_train_step = Trainer.train_step

    def train_step(self):
        record = real_train_step(self)
        wait_for(lambda: len(built) >= self.step + 2, f"steps {self.step + 1} and {self.step + 2} built during step "
                                                      f"{self.step}")
        return record

    monkeypatch.setattr(Trainer, "train_step", train_step)
    history = trainer.run(QuietLogger()).history
    assert losses(history) == expected  # bit for bit on the CPU
    assert set(built) == {"gemma3vl-prefetch"}
    # Checkpoints hold the position after the steps trained on, though steps 3-4 (at step 2) and 5-6 (at step 4)
    # had been built by then.
    assert sorted(saved) == [2, 4] and saved == expected_saved
    state = json.loads((latest_checkpoint(tmp_path / "checkpoints") / STATE_FILE).read_text())
    assert state["data"]["batcher"] == expected_saved[4]
    assert trainer.batcher.state_dict() != expected_saved[4]  # (the batcher itself had read ahead)
    assert not prefetch_threads()
    with pytest.raises(Gemma3VLError, match="closed"):
        trainer.train_step()  # after the run: no step from a read-ahead feed
    # the data's counts are those of the steps trained on (data_summary.json), not of the steps read ahead
    assert trainer.feed.summary().to_dict() == expected_summary
    assert trainer.batcher.summary().records > expected_summary["records"]


def test_stopped_after_steps_were_built_resumes_to_the_same_losses(inputs, uninterrupted, tmp_path, monkeypatch):
    """SIGTERM at step 2 while steps 3 and 4 are already built: the checkpoint holds step 2's position, and the
    resumed run (prefetching too) trains steps 3 and 4 on exactly their data. Saving the position of a built but
    unused step would skip it on resume: other losses."""
    expected, _, _ = uninterrupted
    trainer = make_trainer(inputs, tmp_path, 2, "checkpoint.every=0")
    real_next_step = trainer.batcher.next_step
    built = []
    trainer.batcher.next_step = lambda: built.append(1) or real_next_step()
    real_train_step = Trainer.train_step

    def step_then_signal(self):
        record = real_train_step(self)
        if self.step == 2:
            wait_for(lambda: len(built) >= 4, "steps 3 and 4 built")
            os.kill(os.getpid(), signal.SIGTERM)
        return record

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    with pytest.raises(TrainingStopped, match="stopped at step 2 of 4"):
        trainer.run(QuietLogger())
    assert not prefetch_threads()
    monkeypatch.setattr(Trainer, "train_step", real_train_step)
    resumed = make_trainer(inputs, tmp_path, 2)
    resumed.resume(None)
    assert resumed.step == 2
    assert losses(resumed.run(QuietLogger()).history) == {step: expected[step] for step in (3, 4)}
    assert not prefetch_threads()


def bad_data(tmp_path: Path) -> Path:
    """Text records, the 40th of which has no assistant turn."""
    lines = [{"messages": [{"role": "user", "content": f"Say {n}."}, {"role": "assistant", "content": f"{n}."}]}
             for n in range(60)]
    lines[39] = {"messages": [{"role": "user", "content": "Say nothing."}]}
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_a_bad_record_stops_the_run_at_the_step_that_reads_it(inputs, tmp_path):
    """``data.on_bad_record=error``: the same error, after the same steps, with the thread reading ahead."""
    data = bad_data(tmp_path)
    stopped = {}
    for prefetch in (0, 2):
        trainer = make_trainer(inputs, tmp_path / str(prefetch), prefetch, "data.on_bad_record=error",
                               "data.shuffle=false", "train.steps=20", "checkpoint.every=0", data=data)
        with pytest.raises(Gemma3VLError, match=rf"^{data}:40: ") as raised:
            trainer.run(QuietLogger())
        stopped[prefetch] = (trainer.step, str(raised.value))
        assert not prefetch_threads()
    assert stopped[0][0] >= 1  # (the bad record is not in the first step)
    assert stopped[2] == stopped[0]


def test_an_error_in_the_thread_reaches_the_step_that_would_have_consumed_its_batch(inputs, tmp_path):
    trainer = make_trainer(inputs, tmp_path, 2, "train.steps=6")
    real_next_step = trainer.batcher.next_step
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("a bug while building step 4")
        return real_next_step()

    trainer.batcher.next_step = failing
    with pytest.raises(RuntimeError, match="a bug while building step 4"):
        trainer.run(QuietLogger())
    assert trainer.step == 3
    assert not prefetch_threads()
