"""The gemma3vl command line: stdout carries only results, bad input is one clear error and exit 2.
Parity checks inside use transformers as the oracle on tiny random models."""

import pytest
import torch

from gemma3vl.cli import main
from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.generate import Sampling, generate
from gemma3vl.infer.loading import load_model
from gemma3vl.infer.prompt import build_inputs, load_processor, tokenizer_of
from gemma3vl.pictures import draw_picture
from gemma3vl.tiny import tiny_hf_config
from gemma3vl.tiny_tokenizer import write_tokenizer_and_processor


@pytest.fixture
def vl_dir(hf_checkpoint, tmp_path):
    directory, _ = hf_checkpoint()
    write_tokenizer_and_processor(directory, tiny_hf_config())
    picture = tmp_path / "picture.png"
    draw_picture("red circle").save(picture)
    return directory, picture


def test_generate_prints_only_the_text(vl_dir, capsys):
    directory, picture = vl_dir
    code = main(["generate", str(directory), "--prompt", "What is it?", "--image", str(picture),
                 "--greedy", "--max-new-tokens", "6", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0
    model, config = load_model(directory, device="cpu", dtype="float32")
    processor = load_processor(directory, config)
    inputs = build_inputs(processor, config, "What is it?", [draw_picture("red circle")])
    tokens = generate(model, inputs["input_ids"], attention_mask=inputs["attention_mask"],
                      pixel_values=inputs["pixel_values"],
                      sampling=Sampling(max_new_tokens=6, stop_token_ids=config.stop_token_ids))[0]
    tokens = [t for t in tokens if t not in config.stop_token_ids]
    assert out == tokenizer_of(processor).decode(tokens, skip_special_tokens=True) + "\n"
    assert "tokens/s" in err


def test_generate_stream_gives_the_same_text(vl_dir, capsys):
    directory, picture = vl_dir
    common = [str(directory), "--prompt", "Describe the image", "--image", str(picture), "--greedy",
              "--max-new-tokens", "6", "--device", "cpu"]
    assert main(["generate", *common]) == 0
    plain = capsys.readouterr().out
    assert main(["generate", *common, "--stream"]) == 0
    assert capsys.readouterr().out == plain


def test_generate_stream_stopped_with_ctrl_c_ends_its_line(vl_dir, capsys, monkeypatch):
    """Ctrl-C while streaming: the text so far is printed whole, on a line of its own, and the exit code is 130."""
    import gemma3vl.infer.generate as module
    directory, picture = vl_dir
    real_generate = module.generate

    def interrupted(*args, on_step, **kwargs):
        def step(tokens, finished):
            on_step(tokens, finished)
            if step.count == 3:
                raise KeyboardInterrupt
            step.count += 1
        step.count = 0
        return real_generate(*args, on_step=step, **kwargs)

    monkeypatch.setattr(module, "generate", interrupted)
    argv = [str(directory), "--prompt", "Describe the image", "--image", str(picture), "--greedy",
            "--max-new-tokens", "6", "--device", "cpu"]
    assert main(["generate", *argv, "--stream"]) == 130
    out, err = capsys.readouterr()
    assert out.endswith("\n") and out.count("\n") == 1 and "interrupted" in err


def test_not_an_image_is_a_clear_error(vl_dir, tmp_path, capsys):
    directory, _ = vl_dir
    fake = tmp_path / "fake.jpg"
    fake.write_bytes(b"this is not a jpeg")
    code = main(["generate", str(directory), "--prompt", "hi", "--image", str(fake)])
    assert code == 2
    err = capsys.readouterr().err
    assert "fake.jpg" in err and "not a readable image" in err and "Traceback" not in err


def test_image_count_mismatch_is_a_clear_error(vl_dir, capsys):
    directory, picture = vl_dir
    code = main(["generate", str(directory), "--raw", "--prompt", "<start_of_image><start_of_image> two",
                 "--image", str(picture)])
    assert code == 2
    assert "2 <start_of_image> placeholder(s) but 1 image(s)" in capsys.readouterr().err


def test_text_only_model_refuses_images(hf_checkpoint, tmp_path, capsys):
    directory, _ = hf_checkpoint(text_only=True)
    write_tokenizer_and_processor(directory, tiny_hf_config())
    picture = tmp_path / "p.png"
    draw_picture().save(picture)
    assert main(["generate", str(directory), "--prompt", "hi", "--image", str(picture)]) == 2
    assert "text-only" in capsys.readouterr().err
    assert main(["generate", str(directory), "--prompt", "hi", "--greedy", "--max-new-tokens", "3"]) == 0


def test_verify_passes_and_detects_a_wrong_model(vl_dir, tmp_path, capsys):
    directory, _ = vl_dir
    assert main(["verify", str(directory), "--device", "cpu", "--dtype", "float32"]) == 0
    assert "PASS" in capsys.readouterr().out
    native = tmp_path / "native"
    assert main(["convert", "import", str(directory), str(native)]) == 0
    # corrupt one norm in the native copy: verify must now fail with exit code 1
    from safetensors.torch import load_file, save_file

    for file in native.glob("*.safetensors"):
        tensors = load_file(file)
        if "text.layers.1.post_mlp_norm.weight" in tensors:
            tensors["text.layers.1.post_mlp_norm.weight"] += 0.5
            save_file(tensors, file, metadata={"format": "pt"})
    assert main(["verify", str(directory), "--native", str(native), "--device", "cpu", "--dtype", "float32"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_demo_runs_end_to_end(tmp_path, capsys):
    """The demo as the README runs it, with a fifth of its fine-tuning steps (60 reach 35% held-out accuracy with
    seed 0; the README's command, 300 steps, is run as written before each release)."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "60"]) == 0
    printed = capsys.readouterr().out
    assert "round trip bitwise identical" in printed
    assert "PASS" in printed
    assert "transformers' generate gives the same tokens: yes" in printed
    last = printed.strip().splitlines()[-1]
    before, after = (float(x.rstrip("%")) for x in last.removeprefix("demo: held-out accuracy ").split(" -> "))
    assert after > before + 20  # it learned
    assert "transformers loads the export and gives the same answers: 48 of 48" in printed


def test_demo_reuses_only_its_own_directory(tmp_path):
    from gemma3vl.demo import MARKER, prepare_workdir
    from gemma3vl.errors import Gemma3VLError

    own = tmp_path / "own"
    prepare_workdir(own)
    (own / "old.txt").write_text("from a previous demo")
    prepare_workdir(own)
    assert (own / MARKER).is_file() and not (own / "old.txt").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(Gemma3VLError, match="not a demo directory"):
        prepare_workdir(foreign)
    assert (foreign / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("compiling_fails", [False, True], ids=["noted-no-op-on-cpu", "falls-back-to-eager"])
def test_generate_compile(vl_dir, capsys, request, generate_calls, compiling_fails):
    """--compile reaches generate(); on the CPU it changes nothing but a note; a compile failure (faked by the
    ``failing_compiler`` fixture: a CPU never compiles) is said once and decoding goes on eagerly, same text."""
    directory, picture = vl_dir
    common = [str(directory), "--prompt", "Describe the image", "--image", str(picture), "--greedy",
              "--max-new-tokens", "5", "--device", "cpu"]
    assert main(["generate", *common]) == 0
    plain = capsys.readouterr().out
    attempts = request.getfixturevalue("failing_compiler") if compiling_fails else None
    assert main(["generate", *common, "--compile"]) == 0
    out, err = capsys.readouterr()
    assert out == plain
    assert "--compile: ignored on cpu" in err
    assert [call["compile"] for call in generate_calls] == [False, True]
    if compiling_fails:
        assert attempts == [1]  # one compiled call, then eager for good
        assert err.count("--compile: compiling the decode step failed (RuntimeError: no triton); decoding "
                         "eagerly") == 1


def test_generate_refuses_more_tokens_than_the_context(vl_dir, capsys):
    # as --batch refuses such a line: the KV cache would be sized for all of them, past max_position_embeddings
    directory, _ = vl_dir
    assert main(["generate", str(directory), "--prompt", "hi", "--greedy", "--max-new-tokens", "5000",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "with --max-new-tokens 5000 that is over the model's context of 2048" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["generate", "{model}", "--prompt", "hi", "--temperature", "-1"], "--temperature -1.0 must be > 0"),
    (["generate", "{model}", "--prompt", "hi", "--temperature", "nan"], "--temperature nan must be a finite number"),
    (["generate", "{model}", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens 0 must be >= 1"),
    (["verify", "{model}", "--greedy-tokens", "-1"], "--greedy-tokens -1 must be >= 0"),
    (["verify", "{model}", "--device", "tpu"], "--device 'tpu' is not a device"),
])
def test_bad_flags_fail_before_any_model_loads(vl_dir, capsys, monkeypatch, argv, message):
    import gemma3vl.infer.loading
    import gemma3vl.verify

    def no_loading(*args, **kwargs):
        raise AssertionError("no model may be loaded")

    monkeypatch.setattr(gemma3vl.infer.loading, "load_model", no_loading)
    monkeypatch.setattr(gemma3vl.verify, "load_reference", no_loading)
    directory, _ = vl_dir
    assert main([arg.format(model=directory) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_verify_native_of_another_model_and_greedy_tokens_0(vl_dir, hf_checkpoint, tmp_path, capsys):
    """--native of another model (another vocabulary here) was a tensor-size RuntimeError traceback from deep
    inside the comparison; --greedy-tokens 0 printed "greedy tokens equal" for a comparison not made."""
    directory, _ = vl_dir
    other, _ = hf_checkpoint(vocab_size=640)
    native = tmp_path / "native-other"
    assert main(["convert", "import", str(other), str(native)]) == 0
    capsys.readouterr()
    assert main(["verify", str(directory), "--native", str(native), "--device", "cpu", "--dtype", "float32"]) == 2
    err = capsys.readouterr().err
    assert f"--native {native}: not the model of {directory}" in err and "text.vocab_size" in err
    assert main(["verify", str(directory), "--device", "cpu", "--dtype", "float32", "--greedy-tokens", "0"]) == 0
    out = capsys.readouterr().out
    assert "greedy tokens      not compared (--greedy-tokens 0)" in out and "PASS" in out


def test_output_piped_into_a_reader_that_stops_early_ends_quietly():
    """``gemma3vl recipes | head -1`` used to end with a BrokenPipeError traceback (or Python's "Exception
    ignored" at exit): here the reader is gone before anything is written."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        writer = subprocess.run([sys.executable, "-m", "gemma3vl", "recipes"], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert "Traceback" not in writer.stderr and "BrokenPipe" not in writer.stderr, writer.stderr
    assert writer.returncode == 141


def test_an_error_line_is_written_whole_in_one_write(monkeypatch):
    """Under torchrun each rank prints its error to the same terminal; a line written in two pieces (text, then
    the newline) ran two ranks' errors together on one line."""
    import gemma3vl.cli as cli

    writes: list[str] = []

    class Stream:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(cli.sys, "stderr", Stream())
    cli.log("error: parallel.pp=2 needs at least 2 micro-batches per step")
    assert writes == ["error: parallel.pp=2 needs at least 2 micro-batches per step\n"]


def test_under_torchrun_an_error_every_rank_raises_is_printed_once(monkeypatch, capsys):
    """A layout every rank refuses alike is printed by rank 0 alone (not 64 times); an error of one rank's own
    (e.g. a record in its share of the data) is printed by that rank, with its number."""
    import gemma3vl.cli as cli
    from gemma3vl.errors import Gemma3VLError, on_every_rank

    waits = []
    monkeypatch.setattr(cli.time, "sleep", waits.append)

    def run(rank: int, world: int, exc: Gemma3VLError) -> str:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        cli.report_error(exc)
        return capsys.readouterr().err

    layout = on_every_rank(Gemma3VLError("parallel.tp=3 does not divide 8 attention heads"))
    own = Gemma3VLError("data.jsonl line 7: image not found")
    assert run(0, 4, layout) == "error: parallel.tp=3 does not divide 8 attention heads\n" and waits == []
    # the silent rank leaves rank 0 time to print it before a launcher stops every rank on this one's exit
    assert run(3, 4, layout) == "" and waits == [cli.SILENT_RANK_EXIT_DELAY_S]
    assert run(3, 4, own) == "error (rank 3): data.jsonl line 7: image not found\n"
    assert run(0, 1, own) == "error: data.jsonl line 7: image not found\n" and len(waits) == 1


def test_train_marks_a_bad_setting_as_raised_by_every_rank(tmp_path, monkeypatch, capsys):
    """A rank other than 0 stays silent on a setting every rank reads alike, and still exits non-zero."""
    import gemma3vl.cli as cli

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(cli, "SILENT_RANK_EXIT_DELAY_S", 0.0)
    code = cli.main(["train", "--recipe", "tiny_sft", "--out", str(tmp_path / "o"), "train.steps=-3"])
    assert code == cli.EXIT_BAD_INPUT and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["train", "--recipe", "tiny_sft", "--out", str(tmp_path / "o"), "train.steps=-3"]) == 2
    assert "train.steps" in capsys.readouterr().err


def test_a_bad_sampling_value_from_the_generation_config_names_that_file(vl_dir, capsys, monkeypatch):
    """A value no flag set comes from the checkpoint's ``generation_config.json``: the error names that file."""
    import json

    import gemma3vl.infer.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("no model may be loaded")

    monkeypatch.setattr(gemma3vl.infer.loading, "load_model", no_loading)
    directory, _ = vl_dir
    generation = directory / "generation_config.json"
    saved = generation.read_text() if generation.exists() else None
    try:
        generation.write_text(json.dumps({"do_sample": True, "top_p": 2.0, "eos_token_id": 1}))
        assert main(["generate", str(directory), "--prompt", "hi", "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert f"error: {generation}: top_p=2.0 must be in (0, 1]" in err, err
    finally:
        generation.write_text(saved) if saved is not None else generation.unlink()


def test_list_settings_take_yamls_bracket_form_and_alpha_must_be_finite():
    """``peft.targets=[]`` is the empty list (it was one target named "[]"), ``[q_proj, v_proj]`` two; a
    non-finite ``peft.alpha`` is refused naming the key before any model loads (it trained NaNs)."""
    from gemma3vl.train.config import build_config

    assert build_config("tiny_peft", None, ["peft.targets=[]", "peft.include_vision=true"]).peft.targets == []
    assert build_config("tiny_peft", None, ["peft.targets=[q_proj, 'v_proj']"]).peft.targets == ["q_proj", "v_proj"]
    assert build_config("tiny_peft", None, ["peft.targets=q_proj,o_proj"]).peft.targets == ["q_proj", "o_proj"]
    for alpha, shown in (("inf", "inf"), ("nan", "nan"), ("0", "0.0"), ("-16", "-16.0")):  # (0: adapters do nothing)
        with pytest.raises(Gemma3VLError, match=f"peft.alpha={shown} must be a finite number > 0"):
            build_config("tiny_peft", None, [f"peft.alpha={alpha}"]).validate()


def test_ctrl_c_while_the_command_line_is_read_is_interrupted_not_a_traceback(monkeypatch, capsys):
    """Ctrl-C in the first seconds (argument parsing imported torch, outside main's handler) ended with a
    KeyboardInterrupt traceback; it is "interrupted" and exit 130 as later. And parsing imports no torch now."""
    import subprocess
    import sys

    import gemma3vl.cli as cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["recipes"]) == 130
    assert "interrupted" in capsys.readouterr().err
    probe = ("import sys; from gemma3vl.cli import build_parser, parse_arguments; "
             "parse_arguments(build_parser(), ['convert', 'export', 'a', 'b']); print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
