"""Shared fixtures: tiny random models built by transformers (the oracle) and saved as HF checkpoints."""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
MAX_WORKERS = 4  # pytest-xdist's -n auto: many tests start processes of their own (ranks, CLIs, servers)
# the cores this process may run on (a container's cpuset, not the host's count)
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:  # an xdist worker: the cores are shared among the workers, and the processes their tests start
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, CORES // _WORKERS)))

import pytest
import torch

import gemma3vl.infer.runtime  # noqa: F401, E402
import gemma3vl.train.run  # noqa: F401, E402
from gemma3vl.tiny import tiny_hf_config

# (The two imports above: these modules bind infer.loading.load_model when first imported; imported here, before
# any test puts a "no model may be loaded" stand-in in its place, they never keep the stand-in past that test.)

if _WORKERS > 1 and os.environ["OMP_NUM_THREADS"].isdigit():  # (torch may have read it before it was set here)
    torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))


@pytest.hookimpl(optionalhook=True)  # (pytest-xdist's hook: without xdist, `-p no:xdist`, it is never called)
def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): one worker per core, at most ``MAX_WORKERS``."""
    return max(1, min(CORES, MAX_WORKERS))


def build_reference(raw: dict, seed: int = 0):
    """A transformers Gemma 3 model with every weight random — RMSNorm offsets and the projector too,
    which transformers initialises to zero and which would otherwise hide bugs."""
    from transformers import Gemma3Config, Gemma3ForCausalLM, Gemma3ForConditionalGeneration, Gemma3TextConfig

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if raw["model_type"] == "gemma3":
            model = Gemma3ForConditionalGeneration(Gemma3Config(**raw))
        else:
            model = Gemma3ForCausalLM(Gemma3TextConfig(**raw))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "mm_input_projection" in name:
                param.normal_(0.0, 0.3)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.05)
            else:
                param.normal_(0.0, 0.08)
    return model.eval()


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: (text_only=False, dtype=float32, **text_overrides) -> (directory, reference model)."""

    def make(text_only: bool = False, dtype=torch.float32, seed: int = 0, **text_overrides):
        raw = tiny_hf_config(text_only=text_only, **text_overrides)
        reference = build_reference(raw, seed).to(dtype)
        directory = tmp_path / f"hf-{len(list(tmp_path.iterdir()))}"
        reference.save_pretrained(directory)
        reference.config._attn_implementation = "sdpa"
        return directory, reference

    return make


def assert_merged_equals_peft(merged_dir, base_dir, adapter_dir, *, changed_by: float = 1e-4) -> None:
    """The oracle for a merged checkpoint: transformers' logits of ``merged_dir`` (float32, CPU, on verify's synthetic
    image+text batch) equal those of peft's ``PeftModel`` over transformers' ``base_dir`` with ``adapter_dir``, to
    1e-5 of their scale; and differ from the base's by more than ``changed_by`` of it (the adapter did something)."""
    from peft import PeftModel

    from gemma3vl import verify
    from gemma3vl.infer.loading import load_model

    config = load_model(merged_dir, device="cpu", dtype="float32")[1]
    batch = verify.synthetic_batch(config)
    cpu = torch.device("cpu")
    merged = verify.load_reference(merged_dir, config, torch.float32, cpu)
    base = verify.load_reference(base_dir, config, torch.float32, cpu)
    with torch.no_grad():
        untouched = verify.reference_logits(base, batch, config)
        expected = verify.reference_logits(PeftModel.from_pretrained(base, str(adapter_dir)).eval(), batch, config)
        got = verify.reference_logits(merged, batch, config)
    valid = batch["attention_mask"].bool()
    scale = expected[valid].abs().max()
    assert (expected - got)[valid].abs().max() <= 1e-5 * scale
    assert (expected - untouched)[valid].abs().max() > changed_by * scale


@pytest.fixture(scope="module")
def tiny_decoding(tmp_path_factory):
    """A tiny random checkpoint's model (float32, CPU) and its tokenizer (Gemma's byte fallback included)."""
    from gemma3vl.infer.loading import load_model
    from gemma3vl.infer.prompt import load_processor, tokenizer_of
    from gemma3vl.tiny import write_tiny_checkpoint

    directory = write_tiny_checkpoint(tmp_path_factory.mktemp("decoding") / "tiny")
    model, config = load_model(directory, device="cpu", dtype=torch.float32)
    return model, tokenizer_of(load_processor(directory, config))


@pytest.fixture
def failing_compiler(monkeypatch):
    """Pretend the device compiles decode steps (a CPU never does) and make every compiled call fail as a broken
    inductor would: ``RuntimeError: no triton``. Returns the list of compiled calls attempted."""
    import gemma3vl.infer.decode as decode

    calls = []

    def compiled(model, cache, tokens, positions):
        calls.append(tokens.shape[0])
        raise RuntimeError("no triton")

    monkeypatch.setattr(decode, "compiles_on", lambda device: True)
    monkeypatch.setattr(decode, "compiled_decode_step", lambda: compiled)
    return calls


@pytest.fixture
def generate_calls(monkeypatch):
    """The keyword arguments of every ``generate_result`` call from here on (what ``generate``, the chat and the
    CLI pass down), each call still made."""
    import gemma3vl.infer.generate as generation

    calls: list[dict] = []
    real = generation.generate_result

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "generate_result", recording)
    return calls


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    """A tiny random checkpoint loaded for inference (float32, CPU), one per test module; served, it is named
    ``tiny-gemma3`` (its directory). A module may define its own ``runtime`` instead."""
    from gemma3vl.infer.runtime import InferenceRuntime
    from gemma3vl.tiny import write_tiny_checkpoint

    directory = write_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny-gemma3")
    return InferenceRuntime.load(directory, device="cpu", dtype="float32")


@pytest.fixture
def client(server):
    """The official ``openai`` client for the module's live ``server`` fixture."""
    import openai

    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=60, max_retries=0) as c:
        yield c
