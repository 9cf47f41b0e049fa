"""``gemma3vl generate --batch`` lines that give a conversation (``messages``, OpenAI's / transformers' chat form)
instead of a ``prompt``.

The oracle for a messages line is transformers itself: its processor's ``apply_chat_template(messages,
add_generation_prompt=True)`` and its model's greedy decoding, on a checkpoint transformers made. Mixed files are
held to ``gemma3vl.Model`` answering each line alone (``generate`` for prompt lines, ``chat`` for messages lines),
itself held to transformers in ``test_api.py``."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image
from transformers import AutoProcessor

import gemma3vl
from gemma3vl.cli import main
from gemma3vl.infer import batch as batch_module
from gemma3vl.infer import messages as messages_module
from gemma3vl.infer.batch import BatchDefaults, read_batch_file, run_batch_file
from gemma3vl.infer.runtime import InferenceRuntime
from gemma3vl.pictures import draw_picture
from gemma3vl.tiny import tiny_hf_config, write_tiny_checkpoint
from gemma3vl.tiny_tokenizer import write_tokenizer_and_processor
from test_api import reference_answer
import test_generate_batch
from test_generate_batch import write_jsonl

MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("batch-messages") / "tiny")


@pytest.fixture(scope="module")
def model(model_dir):
    return gemma3vl.load(model_dir, device="cpu", dtype="float32")


workdir = test_generate_batch.workdir  # pics/circle.png, pics/square.png, pics/broken.png


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def absolute(messages, base_dir):
    """``messages`` with their image paths made absolute (``Model.chat`` reads paths from the working directory)."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [{**part, "image": str(base_dir / part["image"])}
                       if isinstance(part, dict) and part.get("type") == "image" else part for part in content]
        out.append({**message, "content": content})
    return out


def records_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def errors_by_line(err, prompts):
    found = {}
    for line in err.splitlines():
        if line.startswith(f"{prompts}:"):
            number, reason = line[len(f"{prompts}:"):].split(": ", 1)
            assert int(number) not in found, line
            found[int(number)] = reason
    return found


def test_a_messages_line_is_transformers_greedy(hf_checkpoint, tmp_path, monkeypatch):
    """A system message, a user turn with an image, an assistant turn and a second user turn with another image:
    the batch's greedy tokens are transformers' (the oracle) through its processor's chat template."""
    directory, reference = hf_checkpoint()
    write_tokenizer_and_processor(directory, tiny_hf_config())
    runtime = InferenceRuntime.load(directory, device="cpu", dtype="float32")
    processor = AutoProcessor.from_pretrained(directory)  # transformers' own
    work = tmp_path / "work"
    (work / "pics").mkdir(parents=True)
    first, second = draw_picture("green triangle", seed=1), draw_picture("red circle", seed=2)
    first.save(work / "pics" / "first.png")
    second.save(work / "pics" / "second.png")

    def conversation(image_a, image_b):
        return [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": [{"type": "image", "image": image_a}, {"type": "text", "text": "What shape?"}]},
            {"role": "assistant", "content": "A triangle."},
            {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image", "image": image_b}]},
        ]

    count = 10
    prompts, answers = work / "prompts.jsonl", work / "answers.jsonl"
    write_jsonl(prompts, [{"id": "chat", "messages": conversation("pics/first.png", "pics/second.png")}])
    seen = {}
    record = batch_module.BatchItem.record

    def spy(item, completion):
        seen[item.line] = list(completion.token_ids)
        return record(item, completion)

    monkeypatch.setattr(batch_module.BatchItem, "record", spy)
    summary = run_batch_file(runtime, prompts, answers, defaults=BatchDefaults(max_new_tokens=count, greedy=True),
                             progress=False, report=pytest.fail)
    assert (summary.answered, summary.skipped) == (1, 0)

    with Image.open(work / "pics" / "first.png") as a, Image.open(work / "pics" / "second.png") as b:
        expected = reference_answer(reference, processor, conversation(a.convert("RGB"), b.convert("RGB")),
                                    runtime.config, count)
    stops = set(runtime.config.stop_token_ids)
    end = next((i + 1 for i, token in enumerate(expected) if token in stops), count)
    assert seen[1] == expected[:end]
    [got] = records_of(answers)
    text = runtime.tokenizer.decode([t for t in expected[:end] if t not in stops], skip_special_tokens=True)
    assert got == {"id": "chat", "messages": conversation("pics/first.png", "pics/second.png"), "answer": text,
                   "tokens": end, "finish_reason": "stop" if expected[end - 1] in stops else "length"}


def test_a_file_mixing_prompt_and_messages_lines_answers_each_as_the_model_alone(model_dir, model, workdir, capsys):
    pics = workdir / "pics"
    chat_stop_messages = [{"role": "user", "content": "Count for me please"}]
    full = model.chat(chat_stop_messages, max_new_tokens=12, greedy=True)
    stop = next(full[i:i + 2] for i in range(1, len(full) - 1) if "\ufffd" not in full[i:i + 2])
    lines = [
        {"id": "p1", "prompt": "What is it?", "images": ["pics/circle.png"]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]},
        {"id": 3, "max_new_tokens": 3, "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Look closely."}]},
            {"role": "user", "content": [{"type": "image", "image": "pics/square.png"},
                                         {"type": "image_url", "image_url": {"url": data_url(pics / "circle.png")}},
                                         {"type": "text", "text": "Which differ?"}]}]},
        {"prompt": "hi"},
        {"id": "multi", "messages": [
            {"role": "user", "content": [{"type": "image", "image": "pics/circle.png"}, "What colour?"]},
            {"role": "model", "content": "Red."},
            {"role": "user", "content": "And the shape?"}]},
        {"id": "seeded", "temperature": 0.9, "seed": 3, "messages": [{"role": "user", "content": "Tell a story"}]},
        {"id": "stop", "stop": stop, "max_new_tokens": 12, "messages": chat_stop_messages},
        {"id": "json", "json": True, "messages": [{"role": "user", "content": "Reply in JSON."}]},
    ]
    prompts, answers = workdir / "prompts.jsonl", workdir / "answers.jsonl"
    write_jsonl(prompts, lines)
    assert main(["generate", str(model_dir), "--batch", str(prompts), "--output", str(answers), "--batch-size", "3",
                 "--greedy", "--max-new-tokens", str(MAX_NEW_TOKENS), "--device", "cpu"]) == 0
    assert "answered 8 prompt(s), skipped 0 bad line(s)" in capsys.readouterr().err

    def alone(line):
        settings = dict(max_new_tokens=line.get("max_new_tokens", MAX_NEW_TOKENS), greedy="temperature" not in line,
                        temperature=line.get("temperature"), seed=line.get("seed"), stop=line.get("stop"),
                        json_schema=line.get("json"), details=True)
        if "prompt" in line:
            return model.generate(line["prompt"], images=[workdir / p for p in line.get("images", [])], **settings)
        return model.chat(absolute(line["messages"], workdir), **settings)

    records = records_of(answers)
    assert len(records) == len(lines)
    for number, (line, record) in enumerate(zip(lines, records)):
        key = {"id": line["id"]} if "id" in line else {"index": number}
        asked = {"prompt": line["prompt"]} if "prompt" in line else {"messages": line["messages"]}
        expected = alone(line)
        assert record == {**key, **asked, "answer": expected.text, "tokens": len(expected.token_ids),
                          "finish_reason": expected.finish_reason}, number
        assert list(record) == [*key, *asked, "answer", "tokens", "finish_reason"]  # prompt lines as before
    assert records[6]["finish_reason"] == "stop" and stop not in records[6]["answer"]


def test_bad_messages_lines_are_reported_and_the_others_answered(model_dir, model, workdir, capsys):
    hello = [{"role": "user", "content": "Hello."}]
    lines = [
        {"prompt": "hi", "messages": hello},                                                        # 1
        {"id": "neither", "max_new_tokens": 3},                                                     # 2
        {"messages": hello, "images": ["pics/circle.png"]},                                         # 3
        {"messages": {"role": "user", "content": "Hello."}},                                        # 4
        {"messages": [{"role": "tool", "content": "Hello."}]},                                      # 5
        {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}]},         # 6
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "pics/missing.png"}, "Hi"]}]},  # 7
        {"messages": [*hello, {"role": "assistant", "content": "Hi there."}]},                      # 8
        {"id": "good", "messages": hello},                                                          # 9
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}]}]},  # 10
        {"messages": [{"role": "user", "content": [{"type": "image", "path": "pics/broken.png"}]}]},  # 11
        {"messages": []},                                                                           # 12
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "https://x.org/a.png"}]}]},  # 13
        {"prompt": "What is it?", "images": ["pics/circle.png"]},                                   # 14
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "pics"}]}]},          # 15
    ]
    prompts, answers = workdir / "prompts.jsonl", workdir / "answers.jsonl"
    write_jsonl(prompts, lines)
    assert main(["generate", str(model_dir), "--batch", str(prompts), "--output", str(answers), "--greedy",
                 "--max-new-tokens", "4", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    reasons = errors_by_line(err, prompts)
    expected = {
        1: "give 'prompt' or 'messages', not both",
        2: "'prompt' (a string) is required, or 'messages' (a list of chat messages)",
        3: "'images' does not go with 'messages'",
        4: "messages must be a list",
        5: "'messages[0]': a 'tool' message must answer one of the 'tool_calls' of the assistant message before it",
        6: "messages[0].content[0].type 'audio' is not one of text, image, image_url",
        7: "messages[0].content[0].image: " + str(workdir / "pics" / "missing.png") + ": no such image file",
        8: "the last message must be a user message",
        10: "messages[0].content[0].image_url.url: the data URL is not valid base64",
        11: "broken.png: not a readable image",
        12: "the conversation is empty",
        13: "is a web address",
        15: "a directory, not an image file",
    }
    assert set(reasons) == set(expected), err
    for number, reason in expected.items():
        assert reason in reasons[number], (number, reasons[number])
    assert "answered 2 prompt(s), skipped 13 bad line(s)" in err
    records = records_of(answers)
    assert [record.get("id", record.get("index")) for record in records] == ["good", 13]
    assert records[0]["answer"] == model.chat(hello, max_new_tokens=4, greedy=True)


def test_structure_and_image_files_are_checked_when_read_and_images_loaded_only_when_encoded(model, workdir,
                                                                                            monkeypatch):
    """Like a prompt line's ``images``, a messages line's image files are checked when the file is read (a missing
    one is a bad line before anything runs) but decoded only when the line's turn comes."""
    loads = []
    real = messages_module.load_image
    monkeypatch.setattr(messages_module, "load_image", lambda path: loads.append(path) or real(path))
    prompts = workdir / "prompts.jsonl"
    lines = [{"messages": [{"role": "user", "content": [{"type": "image", "image": f"pics/{name}.png"}, "What?"]}]}
             for name in ("circle", "square", "missing")]
    lines.append({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                               {"role": "user", "content": "Again"}]})
    write_jsonl(prompts, lines)
    errors = []
    items, bad = read_batch_file(prompts, BatchDefaults(), model.runtime, errors.append)
    assert [item.line for item in items] == [1, 2] and bad == 2 and loads == []
    assert errors[0].startswith(f"{prompts}:3: messages[0].content[0].image: ") and "no such image file" in errors[0]
    assert errors[1].startswith(f"{prompts}:4: message 1: expected an assistant message")
    assert items[0].messages == lines[0]["messages"]  # as read: nothing replaced
    summary = run_batch_file(model.runtime, prompts, workdir / "answers.jsonl",
                             defaults=BatchDefaults(max_new_tokens=2, greedy=True), progress=False,
                             report=lambda message: None)
    assert summary.answered == 2
    assert loads == [workdir / "pics" / "circle.png", workdir / "pics" / "square.png"]


def test_lines_with_tools_are_answered_as_model_chat_answers_them(model_dir, model, workdir, capsys):
    """A messages line's ``tools``: the prompt and the calls ``Model.chat(..., tools=...)`` gives (itself held to
    transformers' chat template on the plain conversation in test_api.py)."""
    pytest.importorskip("xgrammar")
    import re

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "pattern": "[A-Z][a-z]{1,8}"}},
        "required": ["city"], "additionalProperties": False}}}]
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    call = '[get_weather(city="Paris")]'
    follow = [*ask, {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]}, {"role": "tool", "tool_call_id": "c1",
                                                                      "content": "Sunny"}]
    prompts, answers = workdir / "prompts.jsonl", workdir / "answers.jsonl"
    write_jsonl(prompts, [
        {"messages": ask, "tools": tools, "regex": re.escape(call), "max_new_tokens": 40},
        {"messages": follow, "tools": tools},
        {"messages": ask, "tools": tools, "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
         "max_new_tokens": 40},
        {"prompt": "Hi", "tools": tools},
        {"messages": ask, "tools": tools, "tool_choice": "required", "json": True},
    ])
    assert main(["generate", str(model_dir), "--batch", str(prompts), "--output", str(answers), "--greedy",
                 "--max-new-tokens", str(MAX_NEW_TOKENS), "--device", "cpu"]) == 1
    reasons = errors_by_line(capsys.readouterr().err, prompts)
    assert reasons == {4: "'tools' goes with 'messages' lines only",
                       5: "tool_choice 'required' decodes under its own grammar: not with 'json' (or --json / "
                          "--json-schema / --regex / --choice)"}
    called, answered, named = records_of(answers)
    assert (called["finish_reason"], called["answer"]) == ("tool_calls", call)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in called["tool_calls"]] == [
        ("get_weather", {"city": "Paris"})]
    assert "tool_calls" not in answered
    assert answered["answer"] == model.chat(follow, tools=tools, max_new_tokens=MAX_NEW_TOKENS, greedy=True)
    expected = model.chat(ask, tools=tools, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                          max_new_tokens=40, greedy=True)
    assert named["finish_reason"] == "tool_calls"
    assert named["tool_calls"][0]["function"]["arguments"] == expected[0]["function"]["arguments"]


def test_raw_applies_to_prompt_lines_only(model_dir, model, workdir, capsys):
    prompts, answers = workdir / "prompts.jsonl", workdir / "answers.jsonl"
    write_jsonl(prompts, [{"messages": [{"role": "user", "content": "Hello."}]}, {"prompt": "a b c"}])
    assert main(["generate", str(model_dir), "--batch", str(prompts), "--output", str(answers), "--raw", "--greedy",
                 "--max-new-tokens", "4", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert f"{prompts}:1: --raw applies to prompt lines only, and this line gives 'messages'" in err
    [record] = records_of(answers)
    assert record["index"] == 1
    assert record["answer"] == model.generate("a b c", raw=True, max_new_tokens=4, greedy=True)


def test_image_paths_in_messages_are_relative_to_the_jsonl_file(model_dir, model, workdir, monkeypatch):
    sub = workdir / "sub"
    (sub / "pics").mkdir(parents=True)
    draw_picture("green triangle", seed=4).save(sub / "pics" / "triangle.png")
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    messages = [{"role": "user", "content": [{"type": "image", "image": "pics/triangle.png"},
                                             {"type": "text", "text": "What shape?"}]}]
    write_jsonl(sub / "prompts.jsonl", [{"messages": messages}])
    assert main(["generate", str(model_dir), "--batch", "../sub/prompts.jsonl", "--output", "answers.jsonl",
                 "--greedy", "--max-new-tokens", "5", "--pan-and-scan", "--device", "cpu"]) == 0
    [record] = records_of(elsewhere / "answers.jsonl")
    expected = model.chat(absolute(messages, sub), max_new_tokens=5, greedy=True, pan_and_scan=True, details=True)
    assert (record["messages"], record["answer"], record["tokens"]) == (messages, expected.text,
                                                                         len(expected.token_ids))


def test_a_text_only_checkpoint_refuses_image_parts(tmp_path_factory, workdir):
    runtime = InferenceRuntime.load(write_tiny_checkpoint(tmp_path_factory.mktemp("text-only") / "tiny",
                                                          text_only=True), device="cpu", dtype="float32")
    prompts, answers = workdir / "prompts.jsonl", workdir / "answers.jsonl"
    buffer = io.BytesIO()
    draw_picture("red circle").save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    write_jsonl(prompts, [
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "pics/circle.png"}, "What?"]}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, "What?"]}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What?"}]},
    ])
    errors = []
    summary = run_batch_file(runtime, prompts, answers, defaults=BatchDefaults(max_new_tokens=3, greedy=True),
                             progress=False, report=errors.append)
    assert (summary.answered, summary.skipped) == (1, 2)
    assert errors == [f"{prompts}:{n}: this is a text-only Gemma 3 checkpoint: it cannot take images" for n in (1, 2)]
    assert [record["index"] for record in records_of(answers)] == [2]
