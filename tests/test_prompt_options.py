"""Per-request prompt options: vLLM's ``chat_template_kwargs`` (the chat template's own variables) and
``mm_processor_kwargs`` (Gemma 3's pan & scan settings), on the chat endpoint, the Responses API, ``/tokenize``,
``--batch`` messages lines and ``Model.chat``.

The oracle is transformers itself (tiny random fp32 checkpoint whose chat template reads a ``default_system``
variable): a prompt's tokens and pixels are what its processor's ``apply_chat_template`` gives with the same
template variable or pan & scan settings."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from gemma3vl.api import Model
from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.image_sources import ImageLimits
from gemma3vl.infer.runtime import InferenceRuntime
from gemma3vl.tiny import write_tiny_checkpoint
from generation_helpers import run_batch_lines
from test_server import data_url, live_server, post_json

DEFAULT_SYSTEM = "Answer in one word."
TEXT = [{"role": "user", "content": "What colour is the sky?"}]


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    """The tiny checkpoint, its Gemma chat template made to read ``default_system`` (a system prompt used when the
    conversation has none), as a fine-tuned checkpoint's template may."""
    directory = write_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny-gemma3")
    template = directory / "chat_template.jinja"
    text = template.read_text()
    plain = '{%- set first_user_prefix = "" -%}'
    assert plain in text
    template.write_text(text.replace(plain, "{%- set first_user_prefix = (default_system + '\\n\\n') if "
                                            'default_system is defined else "" -%}'))
    return InferenceRuntime.load(directory, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def server(runtime):
    with live_server(runtime, max_tokens=3, images=ImageLimits(max_images=4)) as live:
        yield live


def wide_messages():
    """One user message with a 4:1 picture: pan & scan cuts it into crops (the processor's defaults: up to 4)."""
    picture = Image.new("RGB", (1024, 256), "white")
    picture.paste(Image.new("RGB", (256, 256), "red"), (512, 0))
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(picture)}},
                                         {"type": "text", "text": "Read it."}]}], picture


def transformers_encoding(runtime, messages, **options):
    return runtime.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True, return_tensors="pt", **options)


def test_template_variables_reach_the_template_as_transformers_passes_them(server, runtime):
    """A variable the template reads changes the prompt exactly as transformers' ``apply_chat_template(...,
    default_system=...)`` does, on /tokenize, the chat endpoint, the Responses API and the Python API; one it does
    not read (``enable_thinking``, as clients send it to any vLLM server) changes nothing."""
    expected = transformers_encoding(runtime, TEXT, default_system=DEFAULT_SYSTEM)["input_ids"][0].tolist()
    plain = transformers_encoding(runtime, TEXT)["input_ids"][0].tolist()
    assert len(expected) > len(plain)
    kwargs = {"default_system": DEFAULT_SYSTEM, "enable_thinking": False}
    status, reply = post_json(server, {"messages": TEXT, "chat_template_kwargs": kwargs}, path="/tokenize")
    assert (status, reply["tokens"]) == (200, expected), reply
    status, reply = post_json(server, {"messages": TEXT, "chat_template_kwargs": {"enable_thinking": False}},
                              path="/tokenize")
    assert (status, reply["tokens"]) == (200, plain), reply
    status, reply = post_json(server, {"messages": TEXT, "max_tokens": 1, "chat_template_kwargs": kwargs})
    assert (status, reply["usage"]["prompt_tokens"]) == (200, len(expected)), reply
    status, reply = post_json(server, {"input": TEXT, "max_output_tokens": 1, "chat_template_kwargs": kwargs},
                              path="/v1/responses")
    assert (status, reply["usage"]["input_tokens"]) == (200, len(expected)), reply
    model = Model(runtime)
    assert model.encode_chat(TEXT, chat_template_kwargs=kwargs).input_ids.tolist() == expected
    ours = model.chat(TEXT, chat_template_kwargs=kwargs, greedy=True, max_new_tokens=3, details=True)
    assert ours.prompt_tokens == len(expected)


def test_pan_and_scan_settings_per_request_are_transformers_crops(server, runtime):
    """``mm_processor_kwargs`` turns pan & scan on for one request (the server's default is off): the prompt's tokens
    and crops are the processor's with the same settings; ``pan_and_scan_max_num_crops`` caps the crops."""
    messages, picture = wide_messages()
    hf = [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": "Read it."}]}]
    seen = {}
    for options in ({}, {"do_pan_and_scan": True}, {"do_pan_and_scan": True, "pan_and_scan_max_num_crops": 2}):
        expected = transformers_encoding(runtime, hf, processor_kwargs=dict(options))  # (transformers adds to it)
        status, reply = post_json(server, {"messages": messages, "mm_processor_kwargs": options}, path="/tokenize")
        assert status == 200, (options, reply)
        assert reply["tokens"] == expected["input_ids"][0].tolist(), options
        ours = Model(runtime).encode_chat(hf, mm_processor_kwargs=options)
        assert ours.input_ids.tolist() == expected["input_ids"][0].tolist()
        torch.testing.assert_close(ours.pixel_values, expected["pixel_values"], rtol=0, atol=0)
        seen[json.dumps(options)] = ours.pixel_values.shape[0]
    assert list(seen.values()) == [1, 5, 3]  # the picture alone; with 4 crops; with 2
    status, reply = post_json(server, {"messages": messages, "max_tokens": 1,
                                       "mm_processor_kwargs": {"do_pan_and_scan": True}})
    assert status == 200, reply


@pytest.mark.parametrize("fields, param, words", [
    ({"chat_template_kwargs": ["x"]}, "chat_template_kwargs", "must be an object"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs",
     "use 'add_generation_prompt'"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs", "set by the request itself"),
    ({"chat_template_kwargs": {"tokenize": False}}, "chat_template_kwargs", "set by the request itself"),
    ({"chat_template_kwargs": {"bos_token": "<x>"}}, "chat_template_kwargs", "special token bos_token"),
    ({"mm_processor_kwargs": {"size": {"height": 10}}}, "mm_processor_kwargs", "mm_processor_kwargs.size"),
    ({"mm_processor_kwargs": {"do_pan_and_scan": "yes"}}, "mm_processor_kwargs", "must be a boolean"),
    ({"mm_processor_kwargs": {"pan_and_scan_max_num_crops": 0, "do_pan_and_scan": True}}, "mm_processor_kwargs",
     "an integer >= 1"),
    ({"mm_processor_kwargs": {"pan_and_scan_min_ratio_to_activate": True}}, "mm_processor_kwargs", "a number"),
    ({"mm_processor_kwargs": {"pan_and_scan_max_num_crops": 2}}, "mm_processor_kwargs", "pan and scan is off"),
    ({"mm_processor_kwargs": {"do_pan_and_scan": True, "pan_and_scan_max_num_crops": 9}}, "mm_processor_kwargs",
     "over this server's limit of 4 images"),
])
def test_bad_options_are_a_400_naming_the_field(server, fields, param, words):
    """On the chat endpoint, the Responses API and /tokenize alike; nothing is dropped silently."""
    messages, picture = wide_messages()
    given = [{"role": "user", "content": [{"type": "input_image", "image_url": data_url(picture)},
                                          {"type": "input_text", "text": "Read it."}]}]
    for path, body in (("/v1/chat/completions", {"messages": messages, "max_tokens": 1}),
                       ("/v1/responses", {"input": given, "max_output_tokens": 1}),
                       ("/tokenize", {"messages": messages})):
        status, reply = post_json(server, {**body, **fields}, path=path)
        assert (status, reply["error"]["param"]) == (400, param), (path, reply)
        assert words in reply["error"]["message"], (path, reply)


def test_batch_lines_and_the_python_api_take_the_options(runtime, tmp_path):
    """A ``--batch`` messages line with ``chat_template_kwargs`` answers as ``Model.chat`` with the same variables;
    on a prompt line, or with a bad value, the line is reported and the others answered."""
    model = Model(runtime)
    kwargs = {"default_system": DEFAULT_SYSTEM}
    expected = model.chat(TEXT, chat_template_kwargs=kwargs, greedy=True, max_new_tokens=4)
    lines = [{"messages": TEXT, "chat_template_kwargs": kwargs, "greedy": True},
             {"prompt": "hi", "chat_template_kwargs": kwargs},
             {"messages": TEXT, "mm_processor_kwargs": {"pan_and_scan_min_crop_size": 0}}]
    code, err, records = run_batch_lines(runtime, tmp_path, lines, "--max-new-tokens", "4")
    source = tmp_path / "in.jsonl"
    assert code == 1
    assert f"{source}:2: 'chat_template_kwargs' goes with 'messages' lines only" in err
    assert f"{source}:3: mm_processor_kwargs.pan_and_scan_min_crop_size must be an integer >= 1" in err
    assert [record["answer"] for record in records] == [expected]
    with pytest.raises(Gemma3VLError, match="chat_template_kwargs.continue_final_message: set by the request"):
        model.chat(TEXT, chat_template_kwargs={"continue_final_message": True})
    with pytest.raises(Gemma3VLError, match="for a conversation"):
        next(iter(model.stream("hi", chat_template_kwargs=kwargs)))
