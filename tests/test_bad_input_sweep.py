"""A sweep of bad inputs a real user produces, over every subcommand: each ends with one ``error: ...`` line that
names the file, key or flag (exit code 2), never a traceback from inside transformers, jinja or torch, and never
lost data. Each test here failed before the fix it comes with. One tiny checkpoint for the module; variants are
copies of it with one file changed."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from gemma3vl.cli import main
from gemma3vl.errors import Gemma3VLError
from gemma3vl.pictures import draw_picture
from gemma3vl.tiny import write_tiny_checkpoint

GREEDY = ["--greedy", "--max-new-tokens", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("sweep") / "tiny")


@pytest.fixture
def variant(tiny, tmp_path):
    """``variant(file, text)``: a copy of the tiny checkpoint with ``file`` replaced by ``text`` (a dict: JSON
    merged into the file's object)."""

    def make(name: str, change: str | dict) -> str:
        directory = tmp_path / f"variant-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tiny, directory)
        if isinstance(change, dict):
            data = json.loads((directory / name).read_text())
            data.update(change)
            change = json.dumps(data)
        (directory / name).write_text(change)
        return str(directory)

    return make


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "picture.png"
    draw_picture("red circle").save(path)
    return str(path)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any model load fails the test: the error must come before it."""
    import gemma3vl.infer.loading
    import gemma3vl.infer.runtime
    import gemma3vl.train.run

    def refuse(*args, **kwargs):
        raise AssertionError("no model may be loaded")

    for module in (gemma3vl.infer.loading, gemma3vl.infer.runtime, gemma3vl.train.run):
        monkeypatch.setattr(module, "load_model", refuse)


def error_of(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------- chat template, processor
@pytest.mark.parametrize("template, words", [
    ("{% for m in messages %}{{ m.content ", "chat_template.jinja: the chat template is not valid Jinja (line 1"),
    ('{{ raise_exception("no system prompts here") }}', "refused the conversation"),
    ("{{ messages[5].content }}", "the chat template refused the conversation: list object has no element 5"),
    ("", "the checkpoint has no chat template"),
])
def test_a_broken_chat_template_is_one_error_naming_it(variant, capsys, template, words):
    directory = variant("chat_template.jinja", template)
    assert main(["generate", directory, "--prompt", "hi", *GREEDY]) == 2
    assert words in error_of(capsys)


def test_a_chat_template_that_is_not_jinja_stops_a_batch_before_any_line(variant, tmp_path, capsys):
    directory = variant("chat_template.jinja", "{% if %}")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    assert main(["generate", directory, "--batch", str(prompts), "--output", str(tmp_path / "a.jsonl"), *GREEDY]) == 2
    assert "not valid Jinja" in error_of(capsys)


@pytest.mark.parametrize("change, words", [
    ({"size": {"height": 28, "width": 28}}, "makes 28x28 pixel images (its 'size'), but the vision tower takes 56x56"),
    ({"size": {"height": 0, "width": 0}}, "cannot prepare an image with these settings"),
    ({"image_mean": [0.5, 0.5]}, "mean must have 3 elements"),
    ({"image_std": [0, 0, 0]}, "non-finite pixel values"),
    ({"resample": 99}, "Unknown resampling filter (99)"),
])
def test_odd_preprocessor_settings_are_one_error_naming_the_file(variant, picture, capsys, change, words):
    directory = variant("preprocessor_config.json", change)
    assert main(["generate", directory, "--prompt", "hi", "--image", picture, *GREEDY]) == 2
    error = error_of(capsys)
    assert "preprocessor_config.json" in error and words in error


def test_a_directory_given_as_an_image_says_so(tiny, tmp_path, capsys):
    assert main(["generate", str(tiny), "--prompt", "hi", "--image", str(tmp_path), *GREEDY]) == 2
    assert "a directory, not an image file" in error_of(capsys)


# ------------------------------------------------------------------------------------- flags, before loading
@pytest.mark.parametrize("argv, words", [
    (["generate", "{m}", "--prompt", "hi", "--device", "mps"], "--device 'mps' is not a device gemma3vl runs on"),
    (["generate", "{m}", "--prompt", "hi", "--device", "meta"], "--device 'meta' is not a device gemma3vl runs on"),
    (["chat", "{m}", "--device", "mps"], "--device 'mps' is not a device"),
    (["chat", "{m}", "--temperature", "nan"], "--temperature nan must be a finite number"),
    (["chat", "{m}", "--max-sequence-length", "0"], "--max-sequence-length 0 must be >= 2"),
    (["serve", "{m}", "--port", "70000"], "--port 70000 must be from 0 to 65535"),
    (["generate", "{m}", "--prompt", "hi", "--max-new-tokens", "99999"],
     "with --max-new-tokens 99999 that is over the model's context of 2048"),
])
def test_bad_flags_are_refused_before_the_model_loads(tiny, capsys, no_model_loading, argv, words):
    assert main([arg.format(m=tiny) for arg in argv]) == 2
    assert words in error_of(capsys)


def test_train_on_a_device_torch_knows_but_we_do_not_run_on(tiny, tmp_path, capsys, no_model_loading):
    assert main(["train", "--recipe", "tiny_sft", "--model", str(tiny), "--out", str(tmp_path / "run"),
                 "model.device=mps"]) == 2
    assert "model.device 'mps' is not a device" in error_of(capsys)


def test_a_nan_temperature_is_refused_by_the_sampling_check():
    from gemma3vl.infer.sampling import Sampling

    with pytest.raises(Gemma3VLError, match="temperature=nan must be a finite number"):
        Sampling(max_new_tokens=2, greedy=False, temperature=float("nan")).validate()
    Sampling(max_new_tokens=2, temperature=float("nan"), greedy=True).validate()  # unused under greedy


# ------------------------------------------------------------------------------------- generate --batch
def test_batch_output_whose_partial_file_is_the_prompts_file_is_refused(tiny, tmp_path, capsys):
    prompts = tmp_path / "answers.jsonl.partial"  # a user's name for a prompts file
    prompts.write_text('{"prompt": "hi"}\n')
    assert main(["generate", str(tiny), "--batch", str(prompts), "--output", str(tmp_path / "answers.jsonl"),
                 *GREEDY]) == 2
    assert "which is the prompts file" in error_of(capsys)
    assert prompts.read_text() == '{"prompt": "hi"}\n'  # (it was answered over, then renamed away)


def test_batch_line_that_is_not_utf8_is_a_bad_line_not_the_whole_file(tiny, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b'\xef\xbb\xbf{"prompt": "hi"}\r\n{"prompt": "caf\xe9"}\n{"id": 3, "prompt": "yo"}\n')
    answers = tmp_path / "answers.jsonl"
    assert main(["generate", str(tiny), "--batch", str(prompts), "--output", str(answers), *GREEDY]) == 1
    err = capsys.readouterr().err
    assert f"{prompts}:2: not UTF-8 text (byte 0xe9 at column 16)" in err and "Traceback" not in err
    assert [json.loads(line).get("id", "first") for line in answers.read_text().splitlines()] == ["first", 3]


def test_batch_prompts_given_as_a_directory_says_so(tiny, tmp_path, capsys):
    assert main(["generate", str(tiny), "--batch", str(tmp_path), "--output", str(tmp_path / "a.jsonl")]) == 2
    assert "a directory, not a prompts file" in error_of(capsys)


# ------------------------------------------------------------------------------------- convert merge
def test_merge_into_a_path_under_a_file_is_refused_before_the_merge(tiny, tmp_path, capsys, monkeypatch):
    import gemma3vl.evaluation.loading

    monkeypatch.setattr(gemma3vl.evaluation.loading, "check_adapter", lambda base, adapter: None)
    blocker, adapter = tmp_path / "notes.txt", tmp_path / "adapter"
    blocker.write_text("x")
    adapter.mkdir()
    assert main(["convert", "merge", str(tiny), str(adapter), str(blocker / "merged")]) == 2
    assert "notes.txt is a file, not a directory" in error_of(capsys)  # (not after loading and merging)


# ------------------------------------------------------------------------------------- train: --config
@pytest.mark.parametrize("name, text, words", [
    ("dup.yaml", "recipe: tiny_sft\ntrain:\n  steps: 1\n  steps: 2\n", "key 'steps' is given twice (lines 3 and 4)"),
    ("dup.yaml", "recipe: tiny_sft\ntrain: {steps: 1}\ntrain: {seed: 2}\n", "key 'train' is given twice"),
    ("dup.json", '{"recipe": "tiny_sft", "train": {"steps": 1, "steps": 2}}', "key 'steps' is given twice"),
    ("list.yaml", "recipe: [tiny_sft]\n", "recipe=['tiny_sft']: expected a recipe name"),
    ("tab.yaml", "recipe: tiny_sft\ntrain:\n\tsteps: 1\n", "cannot parse (line 3, column 1: found character '\\t'"),
])
def test_config_files_users_write_wrong(tmp_path, capsys, name, text, words):
    config = tmp_path / name
    config.write_text(text)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    assert words in error_of(capsys)


def test_config_file_that_is_not_text_or_is_a_directory(tmp_path, capsys):
    binary = tmp_path / "settings.yaml"
    binary.write_bytes(b"\xff\xfe\x00r")
    assert main(["train", "--config", str(binary)]) == 2
    assert "settings.yaml: not UTF-8 text (byte 0xff at offset 0)" in error_of(capsys)
    assert main(["train", "--config", str(tmp_path)]) == 2
    assert "a directory, not a config file" in error_of(capsys)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    from gemma3vl.train.config import build_config

    config = tmp_path / "c.yaml"
    config.write_text("recipe: tiny_sft\ntrain:\n  <<: {steps: 5, seed: 3}\n  steps: 2\n")
    cfg = build_config(None, str(config))
    assert (cfg.train.steps, cfg.train.seed) == (2, 3)


# ------------------------------------------------------------------------------------- train: paths
def test_train_out_that_is_a_file_or_under_one(tiny, tmp_path, capsys, no_model_loading):
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    for out, words in ((data, "exists and is not a directory"), (data / "run", "train.jsonl is a file")):
        assert main(["train", "--recipe", "tiny_sft", "--model", str(tiny), "--data", str(data),
                     "--out", str(out)]) == 2
        assert words in error_of(capsys)


def test_train_refuses_to_replace_the_model_it_starts_from(tiny, tmp_path, capsys, no_model_loading):
    run = tmp_path / "run"
    shutil.copytree(tiny, run / "hf")  # a run's export, fine-tuned again into the same OUT
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    assert main(["train", "--recipe", "tiny_sft", "--model", str(run / "hf"), "--data", str(data),
                 "--out", str(run)]) == 2
    assert "which this run replaces with its own output" in error_of(capsys)
    assert (run / "hf" / "model.safetensors").read_bytes() == (tiny / "model.safetensors").read_bytes()


def test_train_data_that_is_missing_or_empty_is_refused_before_the_model_loads(tiny, tmp_path, capsys,
                                                                               no_model_loading):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for flag, path, words in (("--data", tmp_path / "none.jsonl", "no such dataset file or directory (data.path)"),
                              ("--data", empty, "the dataset holds no records"),
                              ("--eval-data", tmp_path / "none.jsonl", "(data.eval_path)")):
        data = ["--data", str(tmp_path / "x.jsonl")] if flag == "--eval-data" else []
        (tmp_path / "x.jsonl").write_text("{}\n")
        assert main(["train", "--recipe", "tiny_sft", "--model", str(tiny), *data, flag, str(path),
                     "--out", str(tmp_path / "run")]) == 2
        assert words in error_of(capsys)


def test_held_out_questions_the_template_refuses_are_skipped_not_a_traceback(variant, tmp_path):
    from gemma3vl import bridge
    from gemma3vl.data.dataset import ConversationDataset
    from gemma3vl.data.settings import DataConfig
    from gemma3vl.infer.prompt import load_processor
    from gemma3vl.train.evaluate import Evaluator

    directory = variant("chat_template.jinja", '{{ raise_exception("no") }}')
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo"}]}) + "\n")
    dataset = ConversationDataset(DataConfig(path=data, shuffle=False),
                                  load_processor(directory, bridge.read_config(directory)))
    evaluator = Evaluator(dataset, micro_batch_size=1, accuracy_samples=1, max_new_tokens=2, stop_token_ids=(1,),
                          device=torch.device("cpu"))
    assert evaluator.questions == []


def test_a_data_directory_with_picture_folders_named_by_split_reads_its_jsonl(tmp_path):
    """The tiny recipe's own OUT/data: train.jsonl and eval.jsonl beside images-train/ and images-eval/. Hugging
    Face's naming takes the picture folders as the splits (an image folder with no conversations); the data files
    are what is meant."""
    pytest.importorskip("datasets")
    from gemma3vl.data.sources import _directory_data_files

    for split in ("train", "eval"):
        (tmp_path / f"images-{split}").mkdir()
        draw_picture().save(tmp_path / f"images-{split}" / "00000.png")
        (tmp_path / f"{split}.jsonl").write_text("{}\n")
    assert _directory_data_files(tmp_path, "train") == ("json", [str(tmp_path / "train.jsonl")])
    assert _directory_data_files(tmp_path, "test") == ("json", [str(tmp_path / "eval.jsonl")])
    with pytest.raises(Gemma3VLError, match="no split 'validation'"):
        _directory_data_files(tmp_path, "validation")


# ------------------------------------------------------------------------------------- train: checkpoints, --resume
def _small_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer, scheduler


def test_a_full_disk_inside_dcp_is_one_clear_error_and_no_partial_checkpoint(tmp_path, monkeypatch):
    """DCP wraps the writer's ENOSPC in a CheckpointException, a BaseException: it passed the OSError handler."""
    import errno

    import torch.distributed.checkpoint.filesystem as dcp_files

    from gemma3vl.train import checkpoint as ckpt

    model, optimizer, scheduler = _small_state()
    ckpt.save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {})

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp_files, "_write_item", no_space)
    with pytest.raises(Gemma3VLError, match=r"step 2 \(\[Errno 28\] No space left on device\); earlier checkpoints"):
        ckpt.save_checkpoint(tmp_path, 2, model, optimizer, scheduler, {})
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]


def test_a_damaged_checkpoint_or_run_record_is_one_clear_error(tmp_path):
    from gemma3vl.train import checkpoint as ckpt
    from gemma3vl.train.run import check_resume_settings

    model, optimizer, scheduler = _small_state()
    path = ckpt.save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {})
    for shard in path.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:10])  # a copy cut short
    with pytest.raises(Gemma3VLError, match="cannot load the checkpoint .*damaged or incomplete"):
        ckpt.load_checkpoint(path, *_small_state())
    (path / ckpt.STATE_FILE).write_text("[1]")
    with pytest.raises(Gemma3VLError, match="trainer_state.json: not a trainer state"):
        ckpt.load_checkpoint(path, *_small_state())
    record = tmp_path / "train_config.json"
    record.write_text("[1]")
    with pytest.raises(Gemma3VLError, match="train_config.json: not the settings of a run"):
        check_resume_settings(record, {"peft": {}, "train": {}})


def test_resume_from_a_path_that_is_no_checkpoint_fails_before_loading(tiny, tmp_path, capsys, no_model_loading):
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    assert main(["train", "--recipe", "tiny_sft", "--model", str(tiny), "--data", str(data), "--out",
                 str(tmp_path / "run"), "--resume", str(tmp_path / "step-9")]) == 2
    assert "--resume" in error_of(capsys)


def test_demo_out_that_is_a_file_or_under_one(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for out, words in ((notes, "exists and is not a directory"), (notes / "demo", "notes.txt is a file")):
        assert main(["demo", "--out", str(out)]) == 2
        assert words in error_of(capsys)
    assert notes.read_text() == "mine"
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "0"]) == 2
    assert "--steps 0 must be >= 1" in error_of(capsys)
    assert not (tmp_path / "demo").exists()


def test_a_bad_record_is_logged_once_however_often_it_is_read(tiny, tmp_path, caplog):
    """A small file is read once per epoch (and a held-out set at every evaluation): its bad record was logged
    each time, the same line over and over; it is still counted each time."""
    from gemma3vl import bridge
    from gemma3vl.data.dataset import ConversationDataset
    from gemma3vl.data.settings import DataConfig
    from gemma3vl.infer.prompt import load_processor

    data = tmp_path / "train.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    data.write_text(json.dumps(good) + "\n{not json\n")
    dataset = ConversationDataset(DataConfig(path=data, shuffle=False), load_processor(tiny, bridge.read_config(tiny)))
    with caplog.at_level("WARNING", logger="gemma3vl.data"):
        for _ in range(3):
            assert len(list(dataset)) == 1
    assert sum("skipping record" in record.getMessage() for record in caplog.records) == 1
    assert dataset.summary().num_skipped == 3


def test_a_prompt_argument_that_is_not_utf8_names_its_byte(tiny, capsys):
    # what Python makes of `--prompt $'caf\xe9'` typed in a Latin-1 terminal
    assert main(["generate", str(tiny), "--prompt", "caf\udce9", *GREEDY]) == 2
    assert "the prompt is not UTF-8 text (byte 0xe9 at character 4)" in error_of(capsys)


@pytest.mark.parametrize("system, words", [("caf\udce9", "--system is not UTF-8 text (character 4)"),
                                           ("<start_of_image>", "--system contains <start_of_image>")])
def test_a_chat_system_prompt_no_turn_could_use_is_refused_before_loading(tiny, capsys, no_model_loading, system,
                                                                          words):
    assert main(["chat", str(tiny), "--system", system]) == 2
    assert words in error_of(capsys)


def test_batch_image_paths_no_filesystem_takes_are_bad_lines(tiny, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "a", "images": ["x" * 5000 + ".png"]}, {"prompt": "b", "images": [""]},
             {"prompt": "c", "images": ["a\u0000b.png"]}, {"prompt": "d", "images": ["."]}]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["generate", str(tiny), "--batch", str(prompts), "--output", str(tmp_path / "a.jsonl"), *GREEDY]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "skipped 4 bad line(s)" in err
    for number, words in ((1, "not a usable path (File name too long)"), (2, "holds an empty path"),
                          (3, "a path with a NUL byte"), (4, "a directory, not an image file")):
        assert re.search(f"{re.escape(str(prompts))}:{number}: [^\n]*{re.escape(words)}", err), (number, err)
