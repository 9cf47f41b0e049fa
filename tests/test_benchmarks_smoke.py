"""The GPU benchmark scripts, rehearsed on the CPU with tiny models.

``benchmarks/run_all_gpu.sh`` with ``TINY=1`` runs ``train_step.py --tiny``, ``packing_gain.py --tiny`` and
``generate.py --tiny`` in their own processes exactly as a GPU session runs them (sizes and step counts aside),
then the combined table. Here: they exit 0, each prints its table last, the JSON they write is complete, and both
sides of each comparison got the same weights. Timings are never asserted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def load_benchmark(name: str, module_name: str):
    """A script of benchmarks/ as a module, registered under ``module_name``."""
    spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


# generate.py does ``from train_step import ...``: it finds this very module.
train_step = load_benchmark("train_step", "train_step")
generate_bench = load_benchmark("generate", "benchmark_generate")
packing_gain = load_benchmark("packing_gain", "benchmark_packing_gain")


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    if not (shutil.which("bash") and shutil.which("timeout")):
        pytest.skip("run_all_gpu.sh needs bash and coreutils' timeout")
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, TINY="1", OUT=str(out), PYTHON=sys.executable,
               PARTS="train,packing,long,27b,generate,verify")  # the order the log slicing below expects
    proc = subprocess.run(["bash", str(BENCHMARKS / "run_all_gpu.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    return proc, out


def last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


def test_rehearsal_exits_zero_and_prints_the_combined_table_last(rehearsal):
    proc, out = rehearsal
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = dict(line.split("\t")[:2] for line in (out / "steps.tsv").read_text().splitlines())
    assert steps["train_step tiny SFT"] == "ok", steps
    assert steps["train_step tiny LoRA"] == "ok", steps
    assert steps["packing gain tiny"] == "ok", steps
    assert steps["train_step tiny long"] == "ok", steps
    assert steps["train_step 27b LoRA"].startswith("skipped")
    assert steps["generate tiny"] == "ok", steps
    assert steps["gpu_verify tiny"].startswith("skipped")
    tail = proc.stdout[proc.stdout.rindex("## Results"):]
    assert "| benchmark | variant | result | peak memory | note |" in tail
    assert last_line(proc.stdout).startswith("| generate tiny | greedy tokens")
    assert (out / "summary.md").read_text().strip() == proc.stdout[proc.stdout.index("## Steps"):].strip()


def test_each_script_prints_its_table_last(rehearsal):
    _, out = rehearsal
    log = (out / "run_all.log").read_text()
    train_part = log[log.index("=== train_step tiny SFT"):log.index("=== train_step tiny LoRA")]
    lora_part = log[log.index("=== train_step tiny LoRA"):log.index("=== packing gain tiny")]
    packing_part = log[log.index("=== packing gain tiny"):log.index("=== train_step tiny long")]
    long_part = log[log.index("=== train_step tiny long"):log.index("=== train_step 27b")]
    generate_part = log[log.index("=== generate tiny"):log.index("=== gpu_verify tiny")]
    assert "| impl | path | recipe | weights | seq | steps/s | tokens/s | MFU |" in train_part
    assert last_line(train_part).startswith("| transformers | - | gemma3_vl_4b_sft | bf16 |")
    assert "| ours | plain | gemma3_vl_4b_sft |" in train_part
    assert last_line(lora_part).startswith("| transformers | - | gemma3_vl_4b_peft | bf16 |")
    assert "| ours | plain |" not in lora_part
    assert "| layout | impl | rows | micro-batches | padding | useful tok/s | target tok/s |" in packing_part
    assert last_line(packing_part).startswith("| padded | transformers | 12 | 6 |")
    assert last_line(long_part).startswith("| transformers | - | gemma3_vl_4b_sft | bf16 | 128 |")
    assert "| impl | batch | TTFT | decode ms/step |" in generate_part
    compiled = json.loads((out / "generate-tiny.json").read_text())["compile_available"]
    assert last_line(generate_part).startswith("| ours (compile=True) | 8 |" if compiled else "| transformers | 8 |")


def test_train_step_runs_every_variant_on_the_same_weights(rehearsal):
    _, out = rehearsal
    data = json.loads((out / "train_step-tiny.json").read_text())
    lora = json.loads((out / "train_step-tiny-peft.json").read_text())
    results = data["results"] + lora["results"]
    labels = [(r["impl"], r["path"], r["mode"], r["weights"]) for r in results]
    assert labels == [("ours", "fast", "sft", "bf16"), ("ours", "plain", "sft", "bf16"),
                      ("transformers", "", "sft", "bf16"), ("ours", "fast", "peft", "bf16"),
                      ("transformers", "", "peft", "bf16")]
    for r in results:
        assert r["status"] == "ok", r
        assert r["steps_per_s"] > 0 and r["tokens_per_s"] > 0 and len(r["step_times_s"]) == 1
        assert r["flops_per_step"] > 0 and r["mfu"] is None  # no peak FLOP/s known for a CPU
    # Same random weights and batch: the first step's loss agrees (bf16 rounding aside), and the LoRA targets too.
    first = [r["first_loss"] for r in results]
    assert max(first) - min(first) < 0.02 * abs(first[0]), first
    by = {(r["impl"], r["path"], r["mode"]): r for r in results}
    for mode in ("sft", "peft"):
        assert by[("ours", "fast", mode)]["trainable_params"] == by[("transformers", "", mode)]["trainable_params"]
        assert "AC selective" in by[("ours", "fast", mode)]["settings"]  # the rehearsal forces checkpointing on
    sft = {(c["mode"], c["seq"]): c for c in data["comparisons"]}[("sft", 64)]
    assert sft["speedup_vs_transformers"] > 0 and abs(sft["loss_difference"]) < 1e-3 * sft["loss_plain"]
    peft = {(c["mode"], c["seq"]): c for c in lora["comparisons"]}[("peft", 64)]
    assert peft["speedup_vs_transformers"] > 0 and peft.get("loss_difference") is None  # no plain path run
    for r in results:  # --profile: ours' extra step's top operators (the transformers rows are not profiled)
        if r["impl"] == "ours":
            assert r["profile"] and all(row["calls"] > 0 and row["cpu_ms"] >= 0 for row in r["profile"])
            assert any("mm" in row["name"] or "linear" in row["name"] for row in r["profile"])
        else:
            assert r["profile"] == []
    flex = data["flex_check"]
    assert flex["agree"] is True and set(flex["layers"]) == {"sliding_attention", "full_attention"}
    assert not flex["backward"]  # on a CPU FlexAttention runs forward only
    assert len(data["summary_rows"]) == len(data["results"]) + len(data["comparisons"]) + 1
    assert "flex_check" not in lora or lora["flex_check"] is None

    long = json.loads((out / "train_step-tiny-long.json").read_text())
    assert [(r["impl"], r["mode"], r["seq"], r["status"]) for r in long["results"]] == [
        ("ours", "sft", 96, "ok"), ("transformers", "sft", 96, "ok"), ("ours", "sft", 128, "ok"),
        ("transformers", "sft", 128, "ok")]
    assert all("gradient checkpointing" not in r["settings"] for r in long["results"] if r["impl"] == "transformers")


def test_packing_gain_times_the_same_conversations_in_each_layout(rehearsal):
    _, out = rehearsal
    data = json.loads((out / "packing_gain-tiny.json").read_text())
    results = data["results"]
    assert [(r["layout"], r["impl"], r["path"], r["status"]) for r in results] == [
        ("packed", "ours", "fast", "ok"), ("padded", "ours", "fast", "ok"), ("transformers", "transformers", "", "ok")]
    lengths = data["conversation_lengths"]
    assert len(lengths) == 12 and all(16 <= n <= 64 for n in lengths)
    packed, padded = data["layouts"]
    assert packed["row_shapes"] == [[1, 128]] and all(shape[0] == 2 for shape in padded["row_shapes"])
    for r in results:
        assert r["useful_tokens"] == sum(lengths) and r["target_tokens"] == packed["target_tokens"] > 0
        assert r["padding_fraction"] == pytest.approx(1 - r["useful_tokens"] / r["slots"])
        assert r["tokens_per_s"] == pytest.approx(r["useful_tokens"] / r["step_s"])
        assert r["target_tokens_per_s"] == pytest.approx(r["target_tokens"] / r["step_s"])
        assert len(r["step_times_s"]) == 1 and r["flops_per_step"] > 0
    # Same weights, same conversations: packed rows (segment mask) and padded rows, ours and transformers, give
    # the same first-step loss up to bf16 rounding.
    first = [r["first_loss"] for r in results]
    assert max(first) - min(first) < 1e-3 * abs(first[0]), first
    assert set(data["gains"]) == {"packed_vs_padded", "packed_vs_transformers", "first_loss_spread"}
    assert len(data["summary_rows"]) == len(results) + 3


def test_packing_gain_layouts_hold_the_same_conversations():
    config = train_step.Gemma3Config.from_hf_dict(train_step.hf_config_dict("4b", tiny=True))
    lengths = packing_gain.conversation_lengths(9, 16, 64, seed=3)
    assert lengths == packing_gain.conversation_lengths(9, 16, 64, seed=3)
    assert lengths != packing_gain.conversation_lengths(9, 16, 64, seed=4)
    samples = packing_gain.conversations(config, lengths, seed=3)
    assert [len(s) for s in samples] == lengths
    for s in samples:  # labels on the answer only: never on <bos>, the prompt or the image block
        answer = (s.labels != -100).nonzero().flatten()
        assert len(answer) > 0 and int(answer[0]) > int((s.input_ids == config.eoi_token_id).nonzero()[0])
        assert torch.equal(s.labels[answer], s.input_ids[answer])
    packed = packing_gain.packed_layout(samples, config, 128)
    padded = packing_gain.padded_layout(samples, config, 2)
    rounded = packing_gain.padded_layout(samples, config, 2, multiple=16)
    assert all(tuple(b.input_ids.shape) == (1, 128) for b in packed.batches)
    assert [tuple(b.input_ids.shape) for b in padded.batches] == [
        (len(lengths[i:i + 2]), max(lengths[i:i + 2])) for i in range(0, 9, 2)]
    assert all(b.input_ids.shape[1] % 16 == 0 for b in rounded.batches) and rounded.slots >= padded.slots
    expected_targets = sum(int((s.labels[1:] != -100).sum()) for s in samples)

    def conversations_of(layout):
        found = []
        for batch in layout.batches:
            for row in range(batch.input_ids.shape[0]):
                segments = batch.info.segment_ids[row]
                for segment in segments.unique().tolist():
                    if segment:
                        found.append(tuple(batch.input_ids[row, segments == segment].tolist()))
        return sorted(found)

    for layout in (packed, padded, rounded):
        assert layout.useful_tokens == sum(lengths) and layout.target_tokens == expected_targets
        assert layout.slots == sum(b.input_ids.numel() for b in layout.batches)
        assert conversations_of(layout) == sorted(tuple(s.input_ids.tolist()) for s in samples)
        assert sum(int(b.pixel_values.shape[0]) for b in layout.batches) == len(samples)
    assert packed.rows < padded.rows == len(samples)


def test_packing_gain_transformers_inputs_unshift_the_labels():
    """transformers shifts labels itself: the padded micro-batch must give it each conversation's own labels."""
    config = train_step.Gemma3Config.from_hf_dict(train_step.hf_config_dict("4b", tiny=True))
    samples = packing_gain.conversations(config, [20, 33, 27], seed=0)
    batch = packing_gain.padded_layout(samples, config, 3).batches[0]
    inputs = packing_gain.transformers_inputs(batch, config.image_token_id, torch.bfloat16, torch.device("cpu"))
    for row, s in enumerate(samples):
        n = len(s)
        assert torch.equal(inputs["labels"][row, :n], s.labels)
        assert bool((inputs["labels"][row, n:] == -100).all()) and int(inputs["attention_mask"][row].sum()) == n
        assert int(inputs["token_type_ids"][row].sum()) == config.mm_tokens_per_image
    packed = packing_gain.packed_layout(samples, config, 128).batches[0]
    with pytest.raises(packing_gain.Gemma3VLError, match="padded batches"):
        packing_gain.transformers_inputs(packed, config.image_token_id, torch.bfloat16, torch.device("cpu"))


def test_packing_gain_frees_each_layouts_model_before_the_next(monkeypatch, tmp_path):
    """A layout's model, optimizer and batches are gone when ``run_layout`` returns (on the H200 of 2026-11-28 the
    packed layout's 32 GiB stayed allocated through the padded one's run)."""
    import gc
    import weakref

    built = []
    real_prepare = packing_gain.prepare_ours

    def tracking_prepare(*args, **kwargs):
        model = real_prepare(*args, **kwargs)
        built.append(weakref.ref(model))
        return model

    monkeypatch.setattr(packing_gain, "prepare_ours", tracking_prepare)
    alive_at_free = []

    def checking_free(device):  # what run_layout calls before it measures the memory left over
        gc.collect()
        alive_at_free.append([ref() is not None for ref in built])

    monkeypatch.setattr(packing_gain, "free_memory", checking_free)
    raw = train_step.hf_config_dict("4b", tiny=True)
    config = train_step.Gemma3Config.from_hf_dict(raw)
    samples = packing_gain.conversations(config, [40, 60, 50], seed=0)
    layout = packing_gain.packed_layout(samples, config, 128)
    args = Namespace(model_name="tiny", seed=0, out=str(tmp_path), warmup=0, steps=1, ac="auto", cpu_offload=False)
    result = packing_gain.run_layout("packed", layout, raw, config, torch.device("cpu"), args)
    assert result.status == "ok", result.status
    assert len(built) == 1 and alive_at_free == [[False]]


def test_packing_gain_rejects_conversations_longer_than_a_row(tmp_path, capsys):
    with pytest.raises(SystemExit):
        packing_gain.main(["--tiny", "--device", "cpu", "--max-len", "200", "--out", str(tmp_path)])
    assert "every conversation must fit in a packed row" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        packing_gain.main(["--tiny", "--device", "cpu", "--layouts", "packed,sorted", "--out", str(tmp_path)])
    assert "--layouts" in capsys.readouterr().err


def test_flex_check_compares_gradients_where_the_model_has_them():
    """The backward half of the GPU flex check, on the CPU with a stand-in for flex: SDPA with the dense mask, but
    padding rows (no key allowed) giving 0, as FlexAttention does. The check must call that agreement: padding rows
    carry no loss in training, so their gradients are outside the comparison (the H200 run of 2026-11-28 compared
    them and reported a 5% 'disagreement' that was the check's own)."""
    from gemma3vl.model.attention import attend, dense_mask

    def padding_rows_zero(q, k, v, info, window, scale):
        live = (info.segment_ids != 0)[:, None, :, None]
        return attend(q, k, v, dense_mask(info, info, window), scale) * live

    raw = train_step.hf_config_dict("4b", tiny=True)
    config = train_step.Gemma3Config.from_hf_dict(raw)
    report = train_step.flex_check(config, 256, torch.device("cpu"), 0, backward=True, low=torch.bfloat16,
                                   candidate=padding_rows_zero)
    assert report["backward"] and report["agree"], report
    for layer in report["layers"].values():
        assert set(layer) == {"out", "dq", "dk", "dv"}
        assert layer["dq"]["flex_vs_fp32"] <= 2 * layer["dq"]["sdpa_vs_fp32"] + 1e-3

    def wrong_window(q, k, v, info, window, scale):  # a real mistake must still be caught
        return attend(q, k, v, dense_mask(info, info, None if window else 8), scale)

    report = train_step.flex_check(config, 256, torch.device("cpu"), 0, backward=True, low=torch.bfloat16,
                                   candidate=wrong_window)
    assert not report["agree"]


def test_a_slow_step_prints_where_it_is(tmp_path):
    """BENCH_STACKS_AFTER_S (set by run_all_gpu.sh a little under each step's timeout) makes a benchmark print
    every thread's Python stack once that many seconds have passed, so a hang on the GPU says where it hangs."""
    env = dict(os.environ, BENCH_STACKS_AFTER_S="0.5")
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "train_step.py"), "--tiny", "--device", "cpu", "--only", "ours",
         "--mode", "sft", "--ours-paths", "plain", "--seq", "64", "--warmup", "0", "--steps", "1",
         "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-1000:], proc.stderr[:3000])
    assert "most recent call last" in proc.stderr and "train_step.py" in proc.stderr
    assert "built in" in proc.stderr  # progress lines (say) go to stderr


def test_generate_runs_its_parts_in_the_order_asked(tmp_path):
    code = generate_bench.main(["--tiny", "--device", "cpu", "--repeats", "1", "--new-tokens", "3",
                                "--warmup-tokens", "1", "--batches", "1", "--order", "compiled,transformers,eager,long",
                                "--out", str(tmp_path)])
    assert code == 0
    data = json.loads((tmp_path / "generate-tiny.json").read_text())
    impls = [r["impl"] for r in data["rows"]]
    long_rows = ["ours, 48-token prompt, prefill sdpa, at once"] * 2  # on a CPU both prefills are SDPA's
    if data["compile_available"]:
        assert impls == ["ours (compile=True)", "transformers", "ours", *long_rows]
        assert data["compiled_vs_eager"]["batch 1"] is not None
    else:
        assert impls == ["transformers", "ours", *long_rows]
    assert data["long_prefill_flex_vs_sdpa"]["equal"] is True
    assert [r["new_tokens"] for r in data["rows"][-2:]] == [8, 8]
    assert data["engine"] == {}  # not in --order
    with pytest.raises(SystemExit):
        generate_bench.main(["--tiny", "--device", "cpu", "--order", "eager,eager", "--out", str(tmp_path)])


def test_checkpointing_auto_asks_the_planner_for_the_card():
    """On a GPU, ``--ac auto`` takes the least recomputation the planner says fits 90% of the card."""
    from gemma3vl.parallel.plan import load_config

    cuda = torch.device("cuda")
    four, big = load_config("4b"), load_config("27b")
    h200 = 143_771 * 2**20

    def chosen(seq, config=four, card=h200, mode="sft"):
        return train_step.fast_settings(seq, cuda, "auto", config=config, card=card, mode=mode)["activation_checkpoint"]

    assert chosen(4096) == "none"
    assert chosen(16384) == "selective"
    assert chosen(131072) == "full"
    assert chosen(4096, config=big, mode="peft") == "selective"  # 27B LoRA: no checkpointing needs ~200 GiB
    assert chosen(4096, card=64 * 2**30) == "selective"  # a smaller card needs more recomputation
    assert chosen(4096, card=40 * 2**30) == "full"
    # Without the card's size: by length; an explicit --ac always wins.
    assert train_step.fast_settings(4096, cuda, "auto")["activation_checkpoint"] == "none"
    assert train_step.fast_settings(131072, cuda, "auto")["activation_checkpoint"] == "full"
    assert train_step.fast_settings(4096, cuda, "full", config=four, card=h200)["activation_checkpoint"] == "full"


def test_generate_gives_exactly_n_tokens_on_both_sides(rehearsal):
    _, out = rehearsal
    data = json.loads((out / "generate-tiny.json").read_text())
    expected = [("ours", 1), ("ours", 8), ("transformers", 1), ("transformers", 8)]
    if data["compile_available"]:  # generate(compile=True): timed last (on a CPU it runs eagerly)
        expected += [("ours (compile=True)", 1), ("ours (compile=True)", 8)]
    assert [(r["impl"], r["batch"]) for r in data["rows"]] == expected
    for r in data["rows"]:
        assert r["status"] == "ok", r
        assert r["new_tokens"] == 8 and r["ttft_ms"] > 0 and r["tokens_per_s_total"] > 0
    for batch in ("batch 1", "batch 8"):
        match = data["greedy_agreement"][batch]
        assert match is not None and match["rows"] == int(batch.split()[1])


# ------------------------------------------------------------------------------------------------ in process
def test_out_of_memory_is_reported_not_raised(monkeypatch, tmp_path):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(train_step, "run_ours", out_of_memory)
    raw = train_step.hf_config_dict("4b", tiny=True)
    config = train_step.Gemma3Config.from_hf_dict(raw)
    args = Namespace(model_name="tiny", seed=0, out=str(tmp_path), warmup=0, steps=1)
    variant = train_step.Variant("ours", "sft", "bf16")
    result = train_step.run_variant(variant, raw, config, 64, torch.device("cpu"), args)
    assert result.status == "OOM"
    assert train_step.table_row(result)[-1] == "OOM"


def test_sweep_and_filters(tmp_path, capsys):
    code = train_step.main(["--tiny", "--device", "cpu", "--only", "ours", "--mode", "peft", "--ours-paths", "plain",
                            "--seqs", "48,64", "--warmup", "0", "--steps", "1", "--out", str(tmp_path)])
    assert code == 0
    results = json.loads((tmp_path / "train_step-tiny.json").read_text())["results"]
    assert [(r["impl"], r["mode"], r["seq"], r["status"]) for r in results] == [
        ("ours", "peft", 48, "ok"), ("ours", "peft", 64, "ok")]
    assert last_line(capsys.readouterr().out).startswith("| ours | plain | gemma3_vl_4b_peft | bf16 | 64 |")


def test_freeze_vision_freezes_the_same_tower_on_both_sides(tmp_path):
    """``--freeze-vision``: ours (train.freeze_vision) and transformers (its vision_tower) train the same parameters
    (all but the SigLIP tower's), start from the same loss, and the FLOP count takes the tower's forward only."""
    code = train_step.main(["--tiny", "--device", "cpu", "--mode", "sft", "--ours-paths", "plain", "--freeze-vision",
                            "--seq", "48", "--warmup", "0", "--steps", "1", "--out", str(tmp_path)])
    assert code == 0
    ours, theirs = json.loads((tmp_path / "train_step-tiny.json").read_text())["results"]
    config = train_step.Gemma3Config.from_hf_dict(train_step.hf_config_dict("4b", tiny=True))
    with torch.device("meta"):
        tower = sum(p.numel() for p in train_step.Gemma3Model(config).vision.parameters())
    for result in (ours, theirs):
        assert result["status"] == "ok" and "vision frozen" in result["settings"]
        assert result["trainable_params"] == result["total_params"] - tower
    assert ours["first_loss"] == pytest.approx(theirs["first_loss"], rel=1e-3)
    targets = train_step.TrainInputs.make(config, 48, torch.device("cpu"), 0).target_count
    trained = train_step.step_flops(config, 48, 1, "sft", targets=targets)
    frozen = train_step.step_flops(config, 48, 1, "sft", targets=targets, vision_trained=False)
    assert ours["flops_per_step"] == theirs["flops_per_step"] == pytest.approx(frozen) and frozen < trained


def test_a_variant_out_of_memory_is_not_tried_at_longer_lengths(monkeypatch, tmp_path):
    calls = []

    def out_of_memory(variant, config, inputs, *args):
        calls.append(inputs.tokens)
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(train_step, "run_ours", out_of_memory)
    code = train_step.main(["--tiny", "--device", "cpu", "--only", "ours", "--mode", "sft", "--ours-paths", "fast",
                            "--seqs", "48,64,80", "--warmup", "0", "--steps", "1", "--out", str(tmp_path)])
    assert code == 0 and calls == [48]
    results = json.loads((tmp_path / "train_step-tiny.json").read_text())["results"]
    assert [r["status"] for r in results] == ["OOM", "skipped: OOM at 48 tokens", "skipped: OOM at 48 tokens"]


def test_out_of_memory_skips_only_longer_lengths_in_any_order(monkeypatch, tmp_path):
    """Lengths may come longest first (run_all_gpu.sh's long step does, so the most wanted row runs before a
    timeout): an OOM then skips only lengths longer than the shortest that ran out, never shorter ones."""
    calls = []

    def out_of_memory_above_60(variant, config, inputs, *args):
        calls.append(inputs.tokens)
        if inputs.tokens > 60:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return [0.01], 1.0

    monkeypatch.setattr(train_step, "run_ours", out_of_memory_above_60)
    code = train_step.main(["--tiny", "--device", "cpu", "--only", "ours", "--mode", "sft", "--ours-paths", "fast",
                            "--seqs", "96,48,64,80", "--warmup", "0", "--steps", "1", "--out", str(tmp_path)])
    assert code == 0 and calls == [96, 48, 64]
    results = json.loads((tmp_path / "train_step-tiny.json").read_text())["results"]
    assert [(r["seq"], r["status"]) for r in results] == [
        (96, "OOM"), (48, "ok"), (64, "OOM"), (80, "skipped: OOM at 64 tokens")]


def test_step_flops_against_the_anchor_formula():
    """The text part of our FLOP count against ``shared/bench/hf_anchor.py``'s own formula (6 x dense matmul FLOPs +
    12 x q_dim x mean keys, global layers seeing seq/2 keys): the same up to that +1/2 key."""
    config = train_step.Gemma3Config.from_hf_dict(train_step.hf_config_dict("4b", tiny=False))
    text, seq = config.text, 4096
    q, kv = text.num_attention_heads * text.head_dim, text.num_key_value_heads * text.head_dim
    per_layer = text.hidden_size * (q + 2 * kv) + q * text.hidden_size + 3 * text.hidden_size * text.intermediate_size
    dense = per_layer * text.num_hidden_layers + text.hidden_size * text.vocab_size
    globals_ = sum(1 for t in text.layer_types if t == "full_attention")
    local = len(text.layer_types) - globals_
    window = text.sliding_window
    local_keys = sum(min(i + 1, window) for i in range(seq)) / seq
    anchor = seq * (6 * dense + 12 * q * (globals_ * seq / 2 + local * local_keys))
    parts = train_step.forward_flops(config, seq, images=1)
    ours_text = 3 * (parts["text_matmul"] + parts["text_attention"])
    assert abs(ours_text / anchor - 1) < 1e-3
    total = train_step.step_flops(config, seq, 1, "sft")
    assert 0.05 < 3 * parts["vision"] / total < 0.25  # one 896 px image: SigLIP's 4,096 patches, 27 layers
    assert train_step.step_flops(config, seq, 1, "peft") < 0.7 * total


def test_bandwidth_figures():
    value, note = generate_bench.peak_bandwidth("NVIDIA H100 80GB HBM3", None)
    assert value == 3.35e12 and "H100 SXM" in note
    assert generate_bench.peak_bandwidth("NVIDIA H200", None)[0] == 4.8e12
    assert generate_bench.peak_bandwidth("NVIDIA H100 PCIe", None)[0] == 2.0e12
    assert generate_bench.peak_bandwidth("cpu", None)[0] is None
    assert generate_bench.peak_bandwidth("cpu", 1.5)[0] == 1.5e12

    config = train_step.Gemma3Config.from_hf_dict(train_step.hf_config_dict("4b", tiny=False))
    # The 4B text decoder: 34 layers of 2560 wide, the 262,208 x 2560 embedding counted once; bf16.
    assert 7.5e9 < generate_bench.text_weight_bytes(config) < 8.0e9
    # One decode step at context P + 1: 6 global layers see all of it, 28 sliding layers (window 1024) too here.
    per_token = 2 * config.text.num_key_value_heads * config.text.head_dim * 2
    assert generate_bench.mean_kv_bytes(config, 1, 300, 2) == 34 * 301 * per_token
    assert generate_bench.mean_kv_bytes(config, 8, 300, 2) == 8 * 34 * 301 * per_token


def test_greedy_agreement():
    assert generate_bench.agreement([[1, 2, 3]], [[1, 2, 3]]) == {"equal": True, "min_common_prefix": 3, "rows": 1}
    assert generate_bench.agreement([[1, 2, 3], [4, 5]], [[1, 9, 3], [4, 5]])["min_common_prefix"] == 1
    assert generate_bench.agreement(None, [[1]]) is None


def test_flex_tune_candidates_and_its_cpu_refusal(tmp_path, capsys):
    """benchmarks/flex_tune.py (CUDA only) checks every candidate against inductor's defaults, so the default
    always comes first; on a CPU it says it needs CUDA and exits 2 instead of timing nothing."""
    flex_tune = load_benchmark("flex_tune", "flex_tune_under_test")

    assert flex_tune.parse_candidates(None)[0] == {} and len(flex_tune.parse_candidates(None)) > 1
    assert flex_tune.parse_candidates('[{"bwd_BLOCK_M1": 32}]') == [{}, {"bwd_BLOCK_M1": 32}]
    assert flex_tune.parse_candidates('[{}, {"USE_TMA": true}]') == [{}, {"USE_TMA": True}]
    with pytest.raises(flex_tune.Gemma3VLError, match="--candidates"):
        flex_tune.parse_candidates('{"bwd_BLOCK_M1": 32}')
    assert flex_tune.main(["--tiny", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "needs CUDA" in capsys.readouterr().err


def test_flex_tune_bookkeeping_with_cpu_stand_ins(tmp_path, monkeypatch, capsys):
    """The script's timing, checking and choosing, with SDPA standing in for compiled flex and a virtual clock for
    CUDA events (each attention call takes 1 ms of it, a "slow" one 21 ms: nothing here depends on the machine's
    load): a candidate that fails to compile is reported and skipped, one that computes something else is never
    chosen, and the fastest agreeing one is printed as the environment variable to set."""
    from gemma3vl.model.attention import attend, dense_mask

    clock = [0.0]  # ms

    flex_tune = load_benchmark("flex_tune", "flex_tune_bookkeeping")

    def stand_in(q, k, v, block_mask=None, scale=None, enable_gqa=True, kernel_options=None):
        options = kernel_options or {}
        if options.get("too_big"):
            raise RuntimeError("out of resource: shared memory")
        out = attend(q, k, v, block_mask, scale)
        if options.get("wrong"):
            out = out * 1.5
        clock[0] += 21.0 if options.get("slow") else 1.0
        return out

    class WallEvent:
        def __init__(self, enable_timing=True):
            self.at = None

        def record(self):
            self.at = clock[0]

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return other.at - self.at

    monkeypatch.setattr(flex_tune, "compiled_flex_attention", lambda: stand_in)
    monkeypatch.setattr(flex_tune, "block_mask", lambda info, keys, window: dense_mask(info, keys, window))
    monkeypatch.setattr(torch.cuda, "Event", WallEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    candidates = '[{"slow": 1}, {"too_big": 1}, {"wrong": 1}]'
    args = flex_tune.parse_args(["--tiny", "--device", "cpu", "--seq", "96", "--repeats", "2", "--out", str(tmp_path),
                                 "--candidates", candidates])
    assert flex_tune.main(["--tiny", "--device", "cpu", "--out", str(tmp_path)]) == 2  # CUDA only, said so
    device, out, _raw, config, env = train_step.benchmark_setup(args)
    assert flex_tune.tune(args, device, out, config, env) == 0
    report = json.loads((tmp_path / "flex_tune-tiny.json").read_text())
    statuses = [row["status"] for row in report["rows"]]
    assert statuses[0] == "ok" and statuses[1] == "ok"
    assert statuses[2].startswith("failed: RuntimeError: out of resource")
    assert statuses[3] == "DIFFERS from the default"
    assert report["best"] == {}  # the slow one agrees but loses; the wrong one is never chosen
    assert "GEMMA3VL_FLEX_KERNEL_OPTIONS='{}'" in capsys.readouterr().out

    # inductor's own search as a candidate: flex compiled with that mode (here faster than every option set)
    def slow(*args, **kwargs):
        clock[0] += 20.0
        return stand_in(*args, **kwargs)

    modes = []
    monkeypatch.setattr(flex_tune, "compiled_flex_attention", lambda: slow)
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: modes.append(mode) or stand_in)
    args.candidates = None
    assert flex_tune.tune(args, device, out, config, env) == 0
    report = json.loads((tmp_path / "flex_tune-tiny.json").read_text())
    assert modes == ["max-autotune-no-cudagraphs"] and report["rows"][-1]["status"] == "ok"
    assert report["best"] == {"compile_mode": "max-autotune-no-cudagraphs"}
    assert "best" in capsys.readouterr().out.split("parallel.compile_mode=max-autotune-no-cudagraphs")[0]


def test_a_compiled_row_whose_compiling_fails_is_reported_not_timed_as_eager(failing_compiler, tmp_path):
    """generate() would go on eagerly after a compile failure; the benchmark must not time that as the compiled
    row (nor the compiled engine as compiled): both say why they failed."""
    code = generate_bench.main(["--tiny", "--device", "cpu", "--repeats", "1", "--new-tokens", "3",
                                "--warmup-tokens", "1", "--batches", "1", "--order", "compiled,engine",
                                "--out", str(tmp_path)])
    assert code == 1  # a failed row fails the run
    data = json.loads((tmp_path / "generate-tiny.json").read_text())
    compiled = [r for r in data["rows"] if r["impl"] == "ours (compile=True)"]
    assert compiled and all("compiling the decode step failed: RuntimeError: no triton" in r["status"]
                            for r in compiled)
    assert "compiling the decode step failed" in json.dumps(data["engine"].get("compiled"))


def test_near_tie_looks_at_the_step_where_two_runs_part():
    """The diagnostic for a compiled-vs-eager divergence: a full forward over prompt + the eager tokens before
    index k must put the eager run's own token k on top (same model, fp32), and report the gap to the runner-up in
    bf16 spacings; describe_divergence says it."""
    from gemma3vl.tiny import tiny_hf_config

    config = generate_bench.Gemma3Config.from_hf_dict(tiny_hf_config())
    cpu = torch.device("cpu")
    model = train_step.build_ours(config, cpu, torch.float32, 0)
    prompts = generate_bench.Prompts.make(config, 2, 24, cpu, 0)
    prompts.pixel_values = prompts.pixel_values.float()
    ids, pixels = prompts.take(2)
    eager = generate_bench.generate(model, ids, pixel_values=pixels,
                                    sampling=generate_bench.Sampling(max_new_tokens=6, pad_token_id=0))
    tie = generate_bench.near_tie(model, prompts, 1, 4, eager)
    assert tie["top2_tokens"][0] == eager[1][4]
    assert tie["top2_gap"] >= 0 and tie["bf16_spacing"] > 0
    match = {"equal": False, "first_divergence": 4, "row": 1, "rows": 2, "near_tie": tie}
    assert "bf16 spacings of the top logit" in generate_bench.describe_divergence(match)


def test_generate_long_part_compares_chunked_and_whole_prefill(tmp_path, monkeypatch):
    """A long prompt past GEMMA3VL_PREFILL_CHUNK: the long part times the chunked prefill, the whole prompt at
    once and SDPA's, and their greedy tokens agree (fp32 tiny model: exactly)."""
    monkeypatch.setenv("GEMMA3VL_PREFILL_CHUNK", "16")
    code = generate_bench.main(["--tiny", "--device", "cpu", "--order", "long", "--out", str(tmp_path)])
    assert code == 0
    data = json.loads((tmp_path / "generate-tiny.json").read_text())
    assert [r["impl"] for r in data["rows"]] == ["ours, 48-token prompt, prefill sdpa, in chunks of 16",
                                                 "ours, 48-token prompt, prefill sdpa, at once",
                                                 "ours, 48-token prompt, prefill sdpa, in chunks of 16"]
    assert data["long_prefill_chunked_vs_whole"]["equal"] is True
