"""The Python API (``gemma3vl.load`` and the job functions). Parity tests hold its answers to transformers itself
(the oracle: its processor's chat template and its model's greedy decoding) on a tiny random model."""

from __future__ import annotations

import base64
import io
import subprocess
import sys

import pytest
import torch
from transformers import AutoProcessor

import gemma3vl
from gemma3vl import verify as checks
from gemma3vl.pictures import draw_picture
from gemma3vl.tiny import tiny_hf_config, write_tiny_checkpoint
from gemma3vl.tiny_tokenizer import write_tokenizer_and_processor

import launch_ranks


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("api") / "tiny")


@pytest.fixture(scope="module")
def model(tiny_dir):
    return gemma3vl.load(tiny_dir, device="cpu", dtype="float32")


@pytest.fixture
def oracle(hf_checkpoint):
    """A checkpoint transformers made, its model, our load of it and transformers' own processor for it."""
    directory, reference = hf_checkpoint()
    write_tokenizer_and_processor(directory, tiny_hf_config())
    return gemma3vl.load(directory, device="cpu", dtype="float32"), reference, AutoProcessor.from_pretrained(directory)


def reference_answer(reference, processor, messages, config, count):
    """transformers' greedy tokens for ``messages`` through its processor's chat template."""
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    batch = {key: inputs[key] for key in ("input_ids", "attention_mask", "pixel_values") if key in inputs}
    return checks.reference_greedy(reference, batch, config, count)[0]


def same_tokens(answer, expected, max_new_tokens):
    """Ours stops at a stop token (kept in ``token_ids``); transformers' reference runs all ``max_new_tokens``."""
    assert answer.token_ids == expected[:len(answer.token_ids)]
    if answer.finish_reason == "length":
        assert len(answer.token_ids) == max_new_tokens


def test_generate_with_an_image_is_transformers_greedy(oracle, tmp_path):
    ours, reference, processor = oracle
    picture = draw_picture("red circle and blue square", size=(96, 64))
    path = tmp_path / "picture.png"
    picture.save(path)
    answer = ours.generate("What is in this picture?", images=[path], max_new_tokens=12, greedy=True, details=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": picture},
                                             {"type": "text", "text": "What is in this picture?"}]}]
    same_tokens(answer, reference_answer(reference, processor, messages, ours.config, 12), 12)
    assert answer.prompt_tokens == ours.encode("What is in this picture?", [path]).length
    assert ours.generate("What is in this picture?", images=[path], max_new_tokens=12, greedy=True) == answer.text


def test_chat_history_with_a_system_message_is_transformers_greedy(oracle):
    ours, reference, processor = oracle
    first, second = draw_picture("green triangle", seed=1), draw_picture("red circle", seed=2)
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": [{"type": "image", "image": first}, {"type": "text", "text": "What shape?"}]},
        {"role": "assistant", "content": "A triangle."},
        {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image", "image": second}]},
    ]
    answer = ours.chat(messages, max_new_tokens=10, greedy=True, details=True)
    same_tokens(answer, reference_answer(reference, processor, messages, ours.config, 10), 10)


def test_image_parts_as_paths_data_urls_and_image_urls_are_the_same_image(model, tmp_path):
    picture = draw_picture("blue square", size=(80, 60))
    path = tmp_path / "square.png"
    picture.save(path)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    parts = [{"type": "image", "image": picture}, {"type": "image", "image": str(path)},
             {"type": "image", "path": str(path)}, {"type": "image", "url": data_url},
             {"type": "image_url", "image_url": {"url": data_url}}]
    prompts = [model.encode_chat([{"role": "user", "content": [part, {"type": "text", "text": "Which?"}]}])
               for part in parts]
    for prompt in prompts[1:]:
        assert torch.equal(prompt.input_ids, prompts[0].input_ids)
        assert torch.equal(prompt.pixel_values, prompts[0].pixel_values)
    generated = model.encode("Which?", [data_url])
    assert torch.equal(generated.pixel_values, prompts[0].pixel_values)


def test_many_prompts_give_each_the_answer_it_gets_alone(model, tmp_path):
    pictures = []
    for index, name in enumerate(("red circle", "green triangle")):
        pictures.append(tmp_path / f"{index}.png")
        draw_picture(name, seed=index).save(pictures[-1])
    prompts = ["Describe it.", "What colour is the shape?", "Say hello."]
    images = [[pictures[0]], [pictures[1], pictures[0]], None]
    together = model.generate(prompts, images=images, max_new_tokens=9, greedy=True, batch_size=2, details=True)
    alone = [model.generate(p, images=i, max_new_tokens=9, greedy=True, details=True) for p, i in zip(prompts, images)]
    assert together == alone
    with pytest.raises(gemma3vl.Gemma3VLError, match="with 3 prompts, images must be a list of 3 entries"):
        model.generate(prompts, images=[pictures[0]])


def test_stream_pieces_are_the_answer_and_a_break_stops_generating(model):
    settings = dict(max_new_tokens=24, greedy=True)
    pieces = list(model.stream("Tell me a story.", **settings))
    assert len(pieces) > 1 and "".join(pieces) == model.generate("Tell me a story.", **settings)
    conversation = [{"role": "user", "content": "Tell me a story."}]
    assert "".join(model.stream(conversation, **settings)) == model.chat(conversation, **settings)
    stream = model.stream("Tell me a story.", max_new_tokens=2000, greedy=True)
    next(stream)
    stream.close()  # joins the worker: it must stop at its next token, not run on to 2000
    assert model.generate("Tell me a story.", **settings) == "".join(pieces)


def test_stop_strings_and_sampling_settings(model):
    full = model.generate("Count.", max_new_tokens=20, greedy=True)
    stop = full[3:5]
    cut = model.generate("Count.", max_new_tokens=20, greedy=True, stop=stop, details=True)
    assert cut.finish_reason == "stop" and stop not in cut.text and full.startswith(cut.text)
    sampled = [model.generate("Count.", max_new_tokens=8, temperature=0.9, top_k=20, seed=7) for _ in range(2)]
    assert sampled[0] == sampled[1]


@pytest.mark.parametrize("settings, message", [
    (dict(max_new_tokens=0), "max_new_tokens=0 must be >= 1"),
    (dict(max_new_tokens=2.5), "max_new_tokens=2.5 must be an integer"),
    (dict(max_new_tokens=10**9), "leaves no room for a prompt"),
    (dict(top_k=0), "top_k=0 must be >= 1"),
    (dict(top_p=1.5), "top_p=1.5 must be in"),
    (dict(temperature="hot"), "temperature='hot' must be a number"),
    (dict(seed=True), "seed=True must be an integer"),
    (dict(stop=[""]), "stop=.* contains an empty string"),
    (dict(stop=3), "stop must be a string or a list of strings"),
    (dict(json_schema="object"), "json_schema must be a JSON Schema"),
    (dict(batch_size=0), "batch_size=0 must be >= 1"),
])
def test_bad_settings_are_named(model, settings, message):
    with pytest.raises(gemma3vl.Gemma3VLError, match=message):
        model.generate(["Hi.", "Hello."] if "batch_size" in settings else "Hi.", **settings)


@pytest.mark.parametrize("call, message", [
    (lambda m: m.generate("Hi.", images=["missing.png"]), "missing.png: no such image file"),
    (lambda m: m.generate("Hi.", images=[3]), r"images\[0\] must be a path"),
    (lambda m: m.generate("Hi.", images=["data:image/png;base64,!!"]), "not valid base64"),
    (lambda m: m.generate("Hi.", images=["data:image/png;base64,aGVsbG8="]), r"images\[0\]: not a readable image"),
    (lambda m: m.generate("Hi.", images=["https://example.com/a.png"]), "download the image"),
    (lambda m: m.generate(["Hi.", 3]), r"prompt\[1\] must be a string"),
    (lambda m: m.generate([]), "the list of prompts is empty"),
    (lambda m: m.chat({"role": "user", "content": "Hi."}), "messages must be a list"),
    (lambda m: m.chat([{"role": "robot", "content": "Hi."}]), r"messages\[0\].role must be one of"),
    (lambda m: m.chat([{"role": "user", "content": "Hi."}, {"role": "tool", "content": "x"}]),
     r"messages\[1\]': a 'tool' message must answer one of the 'tool_calls'"),
    (lambda m: m.chat([{"role": "user", "content": "Hi."}], tools=[{"type": "function", "function": {"name": "a b"}}]),
     r"tools\[0\].function.name"),
    (lambda m: m.chat([{"role": "user", "content": [{"type": "audio"}]}]), r"content\[0\].type 'audio'"),
    (lambda m: m.chat([{"role": "user", "content": [{"type": "image"}]}]), "names its image with one of"),
    (lambda m: m.chat([{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]),
     "the last message must be a user message"),
    (lambda m: m.stream([{"role": "user", "content": "Hi."}], images=["a.png"]), "drop images="),
])
def test_bad_prompts_and_messages_are_named(model, call, message):
    with pytest.raises(gemma3vl.Gemma3VLError, match=message):
        call(model)


def test_chat_with_tools_returns_the_calls_and_goes_on_from_their_results(model):
    """Tools are written into the prompt as the server writes them (the oracle: transformers' chat template on the
    plain conversation); the tiny random model writes a call only under a grammar."""
    pytest.importorskip("xgrammar")
    import json
    import re

    from gemma3vl.infer.tool_calls import Tool, ToolUse, instructions

    parameters = {"type": "object", "properties": {"city": {"type": "string", "pattern": "[A-Z][a-z]{1,8}"}},
                  "required": ["city"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": parameters}}]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    plain = [{"role": "system", "content": [{"type": "text", "text": instructions(
        ToolUse(tools=(Tool("get_weather", None, parameters),)))}]},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]}]
    expected = model.processor.apply_chat_template(plain, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert model.encode_chat(messages, tools=tools).input_ids.tolist() == list(expected["input_ids"][0])
    calls = model.chat(messages, tools=tools, regex=re.escape('[get_weather(city="Paris")]'), max_new_tokens=40)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"})]
    follow = [*messages, {"role": "assistant", "tool_calls": calls},
              {"role": "tool", "tool_call_id": calls[0]["id"], "content": "Sunny"}]
    answer = model.chat(follow, tools=tools, details=True, max_new_tokens=6, greedy=True)
    assert answer.tool_calls is None and answer.text == model.chat(follow, tools=tools, max_new_tokens=6, greedy=True)
    named = model.chat(messages, tools=tools, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                       details=True, max_new_tokens=40)
    assert named.finish_reason == "tool_calls" and named.tool_calls[0]["function"]["name"] == "get_weather"
    assert re.fullmatch("[A-Z][a-z]{1,8}", json.loads(named.tool_calls[0]["function"]["arguments"])["city"])
    with pytest.raises(gemma3vl.Gemma3VLError, match="tool_choice 'required' decodes under its own grammar: not "
                                                     "with 'regex'"):
        model.chat(messages, tools=tools, tool_choice="required", regex="x")


def test_load_checks_before_loading(tiny_dir, tmp_path):
    with pytest.raises(gemma3vl.Gemma3VLError, match="model_dir .*: no such directory"):
        gemma3vl.load(tmp_path / "nothing")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(gemma3vl.Gemma3VLError, match="model_dir .*afile: a file, not a directory"):
        gemma3vl.load(tmp_path / "afile")
    with pytest.raises(gemma3vl.Gemma3VLError, match="adapter .*: no such directory"):
        gemma3vl.load(tiny_dir, adapter=tmp_path / "nothing")
    with pytest.raises(gemma3vl.Gemma3VLError, match="device 'mps' is not a device gemma3vl runs on"):
        gemma3vl.load(tiny_dir, device="mps")
    with pytest.raises(gemma3vl.Gemma3VLError, match="unknown dtype 'float8'"):
        gemma3vl.load(tiny_dir, dtype="float8")


def test_convert_round_trip_and_verify(tiny_dir, tmp_path):
    native = gemma3vl.convert_import(tiny_dir, tmp_path / "native", max_shard_size="1MB")
    exported = gemma3vl.convert_export(native, tmp_path / "hf")
    for name in ("model.safetensors", "config.json"):
        assert (exported / name).read_bytes() == (tiny_dir / name).read_bytes()
    report = gemma3vl.verify_checkpoint(tiny_dir, native=native, device="cpu", greedy_tokens=4)
    assert report.passed, report.failures
    with pytest.raises(gemma3vl.Gemma3VLError, match="layout='flat' is not one of source"):
        gemma3vl.convert_export(native, tmp_path / "other", layout="flat")
    with pytest.raises(gemma3vl.Gemma3VLError, match="max_shard_size='big': not a size"):
        gemma3vl.convert_import(tiny_dir, tmp_path / "other", max_shard_size="big")
    with pytest.raises(gemma3vl.Gemma3VLError, match="verify needs the HF checkpoint directory"):
        gemma3vl.verify_checkpoint(native)


def test_fine_tune_then_merge_then_answer(tmp_path, capsys):
    out = tmp_path / "run"
    result = gemma3vl.fine_tune("tiny_peft", out=out, settings={
        "train.steps": 2, "train.seq_length": 128, "train.global_batch_size": 2, "train.micro_batch_size": 1,
        "data.eval_accuracy_samples": 2, "data.eval_max_new_tokens": 3, "logging.progress": "false"})
    assert result.steps == 2 and result.final_loss is not None
    assert [entry["step"] for entry in result.history if "loss" in entry] == [1, 2]
    # tiny_peft warms up over 5 steps: a 2-step run never reaches its learning rate, and is told so
    assert "note: optim.warmup_steps=5 is longer than train.steps=2: the run ends inside the warm-up, its " \
        "learning rate reaching 2/5 of optim.lr=0.01 at the last step" in capsys.readouterr().err
    merged = gemma3vl.merge_adapter(out / "base", out / "adapter", tmp_path / "merged")
    with_adapter = gemma3vl.load(out / "base", device="cpu", dtype="float32", adapter=out / "adapter")
    plain = gemma3vl.load(merged, device="cpu", dtype="float32")
    settings = dict(max_new_tokens=6, greedy=True, details=True)
    assert with_adapter.generate("What shape?", **settings) == plain.generate("What shape?", **settings)
    with pytest.raises(gemma3vl.Gemma3VLError, match="unknown setting 'train.stpes'"):
        gemma3vl.fine_tune("tiny_sft", out=tmp_path / "other", settings={"train.stpes": 3})
    with pytest.raises(gemma3vl.Gemma3VLError, match="settings must be a dict"):
        gemma3vl.fine_tune("tiny_sft", out=tmp_path / "other", settings=["train.steps=3"])


def test_evaluate_checks_its_options(tiny_dir, tmp_path):
    with pytest.raises(gemma3vl.Gemma3VLError, match="batch_size=0 must be >= 1"):
        gemma3vl.evaluate(tiny_dir, tmp_path / "data.jsonl", out=tmp_path / "eval", batch_size=0)
    with pytest.raises(gemma3vl.Gemma3VLError, match="evaluate: .*unexpected keyword argument 'batchsize'"):
        gemma3vl.evaluate(tiny_dir, tmp_path / "data.jsonl", out=tmp_path / "eval", batchsize=2)


def test_import_gemma3vl_loads_nothing_heavy():
    code = "import sys, gemma3vl; print('torch' in sys.modules, gemma3vl.__version__); gemma3vl.nothing"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.split() == ["False", gemma3vl.__version__]
    assert "module 'gemma3vl' has no attribute 'nothing'" in done.stderr


def test_the_python_api_example_runs(tmp_path):
    """examples/python_api.py as a user runs it (tiny random model, CPU)."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "python_api.py"
    done = launch_ranks.run(["--out", str(tmp_path / "example"), "--device", "cpu", "--steps", "3"], timeout=600,
                            script=str(script))  # `python examples/python_api.py ...`, forked from a preloaded server
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "verify: passed (cosine 1.000000)" in lines
    for start in ("generate: ", "stream: ", "batch: ", "chat: ", "fine-tuned 3 steps", "after fine-tuning: "):
        assert any(line.startswith(start) for line in lines), (start, done.stdout)
    assert (tmp_path / "example" / "merged" / "model.safetensors").is_file()


def test_docs_python_md_names_the_real_functions_and_parameters():
    """docs/python.md's tables against the code: each function and method it lists exists, and takes every
    parameter the docs give it (evaluate's options are run_eval's)."""
    import inspect
    import re
    from pathlib import Path

    from gemma3vl.evaluation.runner import run_eval

    text = (Path(__file__).resolve().parents[1] / "docs" / "python.md").read_text()
    rows = re.findall(r"^\| `(\w+)\(([^`]*)\)` \|", text, flags=re.M)
    assert len(rows) >= 10
    for name, params in rows:
        function = getattr(gemma3vl, name, None) or getattr(gemma3vl.Model, name)
        accepted = set(inspect.signature(function).parameters)
        if name == "evaluate":
            accepted |= set(inspect.signature(run_eval).parameters)
        named = {p.split("=")[0].strip() for p in params.split(",")} - {"*", "**settings", "...", ""}
        named = {p.split(" ")[0] for p in named if not p.startswith("**")}
        assert named <= accepted, (name, named - accepted)


def test_calls_from_threads_take_turns_and_answer_as_alone(model):
    """Several threads asking at once (a stream among them) each get the answer they get alone."""
    import threading

    prompts = ["Say hello.", "Count to three.", "Name a colour.", "Tell me a story."]
    alone = [model.generate(p, max_new_tokens=10, greedy=True) for p in prompts]
    got: dict[int, str] = {}

    def ask(index: int) -> None:
        if index == 3:
            got[index] = "".join(model.stream(prompts[index], max_new_tokens=10, greedy=True))
        else:
            got[index] = model.generate(prompts[index], max_new_tokens=10, greedy=True)

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [got.get(index) for index in range(len(prompts))] == alone


def test_the_command_says_its_version(capsys):
    from gemma3vl.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"gemma3vl {gemma3vl.__version__}\n"


def test_arguments_a_method_does_not_take_are_named_with_that_method(model):
    """Python's TypeError named ``Model.sampling()``, which the caller never called, and a non-boolean ``greedy``
    ("false" is true) decoded greedily: each is a Gemma3VLError naming the method and the argument."""
    import re

    messages = [{"role": "user", "content": "hi"}]
    for call, words in (
        (lambda: model.generate("hi", max_tokens=3), "generate() takes no 'max_tokens': use max_new_tokens"),
        (lambda: model.chat(messages, images=["a.png"]), "chat() takes no 'images': a conversation carries"),
        (lambda: list(model.stream("hi", details=True)), "stream() takes no 'details'"),
        (lambda: model.generate("hi", foo=1), "generate() takes no 'foo' (its settings: max_new_tokens, greedy"),
        (lambda: model.generate("hi", greedy="false"), "greedy='false' must be True or False"),
        (lambda: model.chat(messages, details="yes"), "details='yes' must be True or False"),
        (lambda: list(model.stream(["a", "b"])), "stream() answers one prompt (a string) or one conversation"),
    ):
        with pytest.raises(gemma3vl.Gemma3VLError, match=re.escape(words)):
            call()


def test_generate_reports_as_many_tokens_as_details_and_batch_lines_count(tiny_dir, model, capsys):
    """``gemma3vl generate --prompt`` said "2 tokens" where ``details`` and a --batch line's ``tokens`` counted 3
    for the same answer (the stop token included): one count everywhere."""
    from gemma3vl.cli import main

    prompt = next(p for p in ("a", "json pls", "What?", "hi")  # (one the tiny model ends with a stop token)
                  if model.generate(p, greedy=True, max_new_tokens=8, details=True).finish_reason == "stop")
    answer = model.generate(prompt, greedy=True, max_new_tokens=8, details=True)
    assert main(["generate", str(tiny_dir), "--prompt", prompt, "--greedy", "--max-new-tokens", "8",
                 "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert f"{len(answer.token_ids)} tokens in " in err, err
