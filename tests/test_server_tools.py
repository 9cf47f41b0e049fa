"""Function calling on the chat endpoint: OpenAI's ``tools`` / ``tool_choice`` / ``parallel_tool_calls``, assistant
``tool_calls`` and ``tool`` messages in the history, and answers read back as ``tool_calls``.

The prompt's oracle is transformers: the conversation with tools must give the token ids transformers'
``apply_chat_template`` gives for the plain turns ``tool_calls`` documents (functions in the system message, calls
written as ``[name(key=value)]``, results in ```` ```tool_output ```` blocks). The tiny random model never writes
a call on its own, so the answers that are calls are written under a grammar here (``guided_regex`` with ``auto``;
``required`` and named functions are decoded under their own JSON grammar, as the server does for any model)."""

from __future__ import annotations

import json
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemma3vl.infer.tool_calls import (
    Message,
    StreamedCalls,
    Tool,
    ToolCall,
    ToolUse,
    calls_text,
    converse,
    instructions,
    may_become_calls,
    output_block,
    parse_calls,
    split_answer,
)
from test_server import chat_reply, live_server, post_json

MAX_TOKENS = 80
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "pattern": "[A-Z][a-z]{1,8}"}},
                   "required": ["city"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get-time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "pattern": "[A-Z]{3}"}}, "required": ["zone"],
    "additionalProperties": False}}}
TOOLS = [WEATHER, CLOCK]
USE = ToolUse(tools=tuple(Tool(t["function"]["name"], t["function"].get("description"), t["function"]["parameters"])
                          for t in TOOLS))
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = '[get_weather(city="Paris")]'


@pytest.fixture(scope="module")
def server(runtime):
    with live_server(runtime, max_batch_size=4, batch_wait_s=0.05, max_tokens=MAX_TOKENS) as live:
        yield live


@pytest.fixture
def client(server):
    import openai

    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=60, max_retries=0) as c:
        yield c


# ----------------------------------------------------------------------------------------- reading calls
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
argument_names = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["get_weather", "get-time"]),
                          st.dictionaries(argument_names, json_values, max_size=4)), min_size=1, max_size=3))
def test_calls_as_written_in_the_prompt_read_back_as_the_same_calls(calls):
    written = [ToolCall(name, json.dumps(arguments)) for name, arguments in calls]
    read = parse_calls(calls_text(written), USE)
    assert [(call.name, json.loads(call.arguments)) for call in read] == [(n, a) for n, a in calls]


WRAPPINGS = ["{}", "  {}\n", "```tool_code\n{}\n```", "```python\n{}```", "print({})"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["get_weather", "get-time"]),
                          st.dictionaries(argument_names, json_values, max_size=3)), min_size=1, max_size=2),
       st.sampled_from(WRAPPINGS), st.booleans())
def test_a_stream_holds_every_prefix_of_an_answer_that_is_calls(calls, wrapping, bare):
    written = calls_text([ToolCall(name, json.dumps(arguments)) for name, arguments in calls])
    text = wrapping.format(written[1:-1] if bare else written)
    assert parse_calls(text, USE) is not None, text
    assert all(may_become_calls(text[:end], USE) for end in range(len(text) + 1)), text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("[](){},=:'\"\\`\n _-.0123456789abcdefgNnTtprint")) | st.characters(),
               max_size=60))
def test_any_answer_is_either_calls_or_text_and_never_an_exception(text):
    for candidate in (text, f"[get_weather({text})]", f"get-time(zone={text})"):
        calls = parse_calls(candidate, USE)
        assert calls is None or all(json.loads(call.arguments) is not None for call in calls)
        assert may_become_calls(candidate, USE) in (True, False)
    required, named = ToolUse(tools=USE.tools, choice="required"), ToolUse(USE.tools, "function", "get_weather")
    for candidate in (text, f'[{{"name": "get_weather", "parameters": {text}', f'[{{"name": {text}'):
        for use in (required, named):  # a forced answer the grammar did not hold: text, or calls, never a failure
            for reason in ("stop", "length"):
                content, calls = split_answer(candidate, use, reason)
                assert content is None  # (a forced answer is never text: its calls as far as they went, or none)
                assert calls is None or all(call.name == "get_weather" for call in calls)


@pytest.mark.parametrize("text, expected", [
    (CALL, [("get_weather", {"city": "Paris"})]),
    ('```tool_code\nget_weather(city="Paris")\n```', [("get_weather", {"city": "Paris"})]),
    ('```tool_code\nprint(get_weather(city="Paris"))\n```', [("get_weather", {"city": "Paris"})]),
    ("```python\n[get_weather(city='Paris'), get-time(zone='CET')]\n```",
     [("get_weather", {"city": "Paris"}), ("get-time", {"zone": "CET"})]),
    ('  get_weather( city = "Par,is)" , )  ', [("get_weather", {"city": "Par,is)"})]),
    ("[get-time(zone=null, days=[1, -2.5, true], extra={'a': None})]",
     [("get-time", {"zone": None, "days": [1, -2.5, True], "extra": {"a": None}})]),
    ("It is sunny in Paris.", None),
    ("[get_weather(city=open('x'))]", None),  # not a literal: never evaluated
    ("[unknown(city='Paris')]", None),  # not one of the request's functions
    ("[get_weather('Paris')]", None),  # arguments are named
    ("[get_weather(city='Paris', city='Rome')]", None),
    ("I will call [get_weather(city='Paris')]", None),  # the whole answer must be the calls
    ("[get_weather(city='Paris')", None),
    ("[]", None),
])
def test_which_answers_are_calls(text, expected):
    calls = parse_calls(text, USE)
    assert (None if calls is None else [(c.name, json.loads(c.arguments)) for c in calls]) == expected


def test_parallel_calls_only_when_allowed():
    two = "[get_weather(city='Paris'), get-time(zone='CET')]"
    assert len(parse_calls(two, USE)) == 2
    single = ToolUse(tools=USE.tools, parallel=False)
    assert parse_calls(two, single) is None and len(parse_calls(CALL, single)) == 1
    assert "one call at most" in instructions(single)


@pytest.mark.parametrize("text, expected", [
    ('Let me check.\n[get_weather(city="Paris")]', ("Let me check.", [("get_weather", {"city": "Paris"})])),
    ("Sure.\n\n```tool_code\nget_weather(city='Paris')\n```\n", ("Sure.", [("get_weather", {"city": "Paris"})])),
    ('[note]\nSure.\n[get_weather(city="Paris")]', ("[note]\nSure.", [("get_weather", {"city": "Paris"})])),
    ('Look: [get_weather(city="Paris")]', ('Look: [get_weather(city="Paris")]', None)),  # not on a line of its own
    ('[get_weather(city="Paris")]\nDone.', ('[get_weather(city="Paris")]\nDone.', None)),  # calls end the answer
])
def test_an_answer_is_text_then_calls_on_the_lines_that_end_it(text, expected):
    content, calls = split_answer(text, USE)
    assert (content, None if calls is None else [(c.name, json.loads(c.arguments)) for c in calls]) == expected
    assert split_answer(text, USE, "length") == (text, None)  # an answer cut by the token limit makes no calls


prose = st.text(alphabet=st.sampled_from(list("abcdefghij ,.!?:;\n")), min_size=1, max_size=30).filter(str.strip)


@settings(max_examples=120, deadline=None)
@given(prose, st.lists(st.tuples(st.sampled_from(["get_weather", "get-time"]),
                                 st.dictionaries(argument_names, json_values, max_size=2)), min_size=1, max_size=2),
       st.lists(st.integers(1, 12), min_size=1, max_size=40), st.booleans())
def test_text_and_calls_written_in_the_history_read_back_the_same_streamed_or_not(text, calls, pieces, with_calls):
    """An assistant message with text and calls, as ``converse`` writes it, is read back as that text and those
    calls; fed to a stream in any pieces, what is sent is the text, then the calls (or, with no calls, all of it)."""
    written = [ToolCall(name, json.dumps(arguments)) for name, arguments in calls]
    message = Message("assistant", [text], tuple(written) if with_calls else ())
    (answer,) = [m.parts[0] for m in converse([message], None)]
    content, read = split_answer(answer, USE)
    if with_calls:
        assert content == text.strip() and [(c.name, json.loads(c.arguments)) for c in read] == [
            (n, a) for n, a in calls]
    else:
        assert (content, read) == (answer, None)
    stream, sent, at = StreamedCalls(USE), [], 0
    for size in [*pieces, len(answer)]:
        delta = stream.feed(answer[at:at + size], None)
        sent.append(delta[0] if delta else "")
        at += size
    rest, _, streamed = stream.finish(answer, "stop")
    assert "".join(sent) + rest == (content or "")
    assert (streamed.calls is None) == (read is None)
    assert streamed.finish_reason == ("stop" if read is None else "tool_calls")


@pytest.mark.parametrize("prefix, held", [("", True), ("  [get", True), ("```", True), ("get_wea", True),
                                          ("get-time (", True), ("The weather", False), ("get_weather is", False),
                                          ("42", False), ("pri", True), ("print(get_w", True),
                                          ("print('hello')", False), ("princess", False)])
def test_a_stream_holds_text_only_while_it_may_become_calls(prefix, held):
    assert may_become_calls(prefix, USE) is held


# ------------------------------------------------------------------------------------------------ prompts
def tokenize(server, messages, **fields) -> list[int]:
    status, reply = post_json(server, {"messages": messages, **fields}, path="/tokenize")
    assert status == 200, reply
    return reply["tokens"]


def transformers_ids(runtime, messages) -> list[int]:
    """transformers' ``apply_chat_template`` on plain turns (the oracle)."""
    encoded = runtime.processor.apply_chat_template(
        [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages],
        add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(encoded["input_ids"][0])


def test_the_prompt_with_tools_and_tool_results_is_the_documented_plain_conversation(server, runtime):
    history = [
        {"role": "system", "content": "Be brief."},
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get-time", "arguments": '{"zone": "CET"}'}}]},
        {"role": "tool", "tool_call_id": "call_2", "content": "14:00"},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "Sunny, 21 C"}]},
        {"role": "user", "content": "And tomorrow?"},
    ]
    plain = [
        {"role": "system", "content": "Be brief.\n\n" + instructions(USE)},
        *QUESTION,
        {"role": "assistant", "content": '[get_weather(city="Paris"), get-time(zone="CET")]'},
        {"role": "user", "content": output_block("14:00") + "\n" + output_block("Sunny, 21 C") + "\n\nAnd tomorrow?"},
    ]
    assert tokenize(server, history, tools=TOOLS) == transformers_ids(runtime, plain)
    # tool_choice "none": the functions are not offered, the history is still written out
    assert tokenize(server, history, tools=TOOLS, tool_choice="none") == transformers_ids(
        runtime, [{"role": "system", "content": "Be brief."}, *plain[1:]])
    # no system message: the functions make one
    assert tokenize(server, QUESTION, tools=TOOLS) == transformers_ids(
        runtime, [{"role": "system", "content": instructions(USE)}, *QUESTION])


# ----------------------------------------------------------------------------------------------- answers
def log_lines(server, words: str) -> int:
    return server._log_stream.getvalue().count(words)


def logged(server, words: str, before: int) -> bool:
    """Whether the server's log gets another line holding ``words`` than the ``before`` it had (within a few
    seconds: a request's line is written once its answer has gone out)."""
    deadline = time.monotonic() + 10
    while log_lines(server, words) <= before:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_an_answer_that_is_a_call_comes_back_as_tool_calls(server, client):
    """... and the server's log line gives it the finish reason the client got."""
    before = log_lines(server, "finish=tool_calls")
    reply = client.chat.completions.create(model="tiny-gemma3", messages=QUESTION, tools=TOOLS, temperature=0,
                                           max_tokens=MAX_TOKENS, extra_body={"guided_regex": re.escape(CALL)})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert (call.type, call.function.name, json.loads(call.function.arguments)) == (
        "function", "get_weather", {"city": "Paris"})
    assert re.fullmatch(r"call_[0-9a-f]{24}", call.id)
    assert logged(server, "finish=tool_calls", before)


def test_a_streamed_call_comes_as_one_tool_calls_delta_and_text_streams_as_text(client):
    def streamed(regex):
        chunks = list(client.chat.completions.create(
            model="tiny-gemma3", messages=QUESTION, tools=TOOLS, temperature=0, max_tokens=MAX_TOKENS, stream=True,
            extra_body={"guided_regex": regex}))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        return ("".join(d.content or "" for d in deltas), [t for d in deltas for t in d.tool_calls or ()],
                [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason])

    text, calls, finish = streamed(re.escape(CALL))
    assert (text, finish) == ("", ["tool_calls"])
    assert [(t.index, t.function.name, json.loads(t.function.arguments)) for t in calls] == [
        (0, "get_weather", {"city": "Paris"})]
    text, calls, finish = streamed("Sunny in Paris")
    assert (text, calls, finish) == ("Sunny in Paris", [], ["stop"])


def test_text_then_calls_come_back_as_content_and_tool_calls_streamed_or_not(client):
    answer = 'Let me check.\n[get_weather(city="Paris")]'
    settings = dict(model="tiny-gemma3", messages=QUESTION, tools=TOOLS, temperature=0, max_tokens=MAX_TOKENS,
                    extra_body={"guided_regex": re.escape(answer)})
    choice = client.chat.completions.create(**settings).choices[0]
    assert (choice.message.content, choice.finish_reason) == ("Let me check.", "tool_calls")
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("get_weather", {"city": "Paris"})]
    chunks = [c for c in client.chat.completions.create(**settings, stream=True) if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Let me check."
    assert [t.function.name for c in chunks for t in c.choices[0].delta.tool_calls or ()] == ["get_weather"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    flat = [{"type": "function", **tool["function"]} for tool in TOOLS]
    for stream in (False, True):
        asked = dict(model="tiny-gemma3", input=QUESTION[0]["content"], tools=flat, temperature=0,
                     max_output_tokens=MAX_TOKENS, extra_body={"guided_regex": re.escape(answer)})
        response = (list(client.responses.create(**asked, stream=True))[-1].response if stream
                    else client.responses.create(**asked))
        assert [item.type for item in response.output] == ["message", "function_call"]
        assert response.output_text == "Let me check." and response.output[1].name == "get_weather"


def test_text_answers_are_unchanged_by_tools_the_model_does_not_call(server):
    with_tools = chat_reply(server, QUESTION, MAX_TOKENS, tools=TOOLS, tool_choice="none")["choices"][0]
    assert with_tools["message"]["content"] == chat_reply(server, QUESTION, MAX_TOKENS)["choices"][0]["message"][
        "content"]
    assert "tool_calls" not in with_tools["message"] and with_tools["finish_reason"] in ("stop", "length")


@settings(max_examples=120, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["get_weather", "get-time"]),
                          st.dictionaries(argument_names, json_values, max_size=3)), min_size=1, max_size=3),
       st.lists(st.integers(1, 9), min_size=1, max_size=60), st.booleans())
def test_a_forced_answer_streams_as_the_calls_it_reads_back_as(calls, pieces, named):
    """A forced answer (a named function's arguments, or ``required``'s list of ``{"name", "parameters"}``), in the
    layout the grammar writes and fed in any pieces: each call's first piece names it, the pieces joined are the
    arguments ``split_answer`` reads (the model's own JSON text, ids included), and a cut answer gives the calls
    begun, their arguments a prefix of the whole ones."""
    from gemma3vl.infer.tool_calls import StreamedForcedCalls

    if named:
        calls = calls[:1]
        use = ToolUse(tools=USE.tools, choice="function", name=calls[0][0])
        text = json.dumps(calls[0][1], ensure_ascii=False)
    else:
        use = ToolUse(tools=USE.tools, choice="required")
        text = json.dumps([{"name": name, "parameters": arguments} for name, arguments in calls], ensure_ascii=False)
    stream, sent, cuts = StreamedForcedCalls(use), {}, [0]
    for size in pieces:
        cuts.append(min(len(text), cuts[-1] + size))
    cuts.append(len(text))
    names = {}
    for start, end in zip(cuts, cuts[1:]):
        for piece in stream.feed(text[start:end], None):
            if piece.first:
                assert piece.index not in names and piece.index == len(names)
                names[piece.index] = (piece.call.name, piece.call.id)
            sent[piece.index] = sent.get(piece.index, "") + piece.call.arguments
    pieces_left, _, answer = stream.finish(text, "stop")
    assert pieces_left == [] and answer.finish_reason == "tool_calls"
    read = answer.calls
    assert [(call.name, json.loads(call.arguments)) for call in read] == calls
    assert [(call.name, call.id) for call in read] == [names[index] for index in range(len(calls))]
    assert [sent[index] for index in range(len(calls))] == [call.arguments for call in read]
    cut = cuts[len(cuts) // 2]
    _, partial = split_answer(text[:cut], use, "length")
    for call, whole in zip(partial or (), read):
        assert call.name == whole.name and whole.arguments.startswith(call.arguments)


def test_a_forced_call_streams_its_arguments_piece_by_piece(server, client):
    """Streamed, a forced call comes as it is generated: its id, type and name first, then its arguments in several
    deltas; joined, they are the non-streamed answer's call. Cut by max_tokens, the call is returned as far as it
    went with finish_reason "length" (as OpenAI and vLLM return it), streamed or not."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    settings = dict(model="tiny-gemma3", messages=QUESTION, tools=TOOLS, temperature=0, tool_choice=named)
    whole = client.chat.completions.create(max_tokens=MAX_TOKENS, **settings).choices[0]
    chunks = list(client.chat.completions.create(max_tokens=MAX_TOKENS, stream=True, **settings))
    entries = [entry for c in chunks if c.choices for entry in c.choices[0].delta.tool_calls or ()]
    assert len(entries) > 2 and entries[0].id.startswith("call_") and entries[0].function.name == "get_weather"
    assert all(entry.index == 0 and entry.id is None and entry.function.name is None for entry in entries[1:])
    assert "".join(entry.function.arguments or "" for entry in entries) == whole.message.tool_calls[0].function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert all(not c.choices[0].delta.content for c in chunks if c.choices)
    cut = client.chat.completions.create(max_tokens=3, **settings).choices[0]
    (call,) = cut.message.tool_calls
    assert cut.finish_reason == "length" and call.function.name == "get_weather"
    assert whole.message.tool_calls[0].function.arguments.startswith(call.function.arguments)
    chunks = list(client.chat.completions.create(max_tokens=3, stream=True, **settings))
    entries = [entry for c in chunks if c.choices for entry in c.choices[0].delta.tool_calls or ()]
    assert "".join(entry.function.arguments or "" for entry in entries) == call.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    response = client.responses.create(model="tiny-gemma3", input=QUESTION, tools=FLAT_TOOLS, temperature=0,
                                       max_output_tokens=3, tool_choice={"type": "function", "name": "get_weather"})
    (item,) = response.output
    assert (response.status, item.type, item.status, item.arguments) == (
        "incomplete", "function_call", "incomplete", call.function.arguments)
    # a kept response whose call was cut cannot be continued: a 400 naming it, not a failure
    status, reply = post_json(server, {"previous_response_id": response.id, "tools": FLAT_TOOLS, "input": [
        {"type": "function_call_output", "call_id": item.call_id, "output": "Sunny"}]}, path="/v1/responses")
    assert (status, reply["error"]["param"]) == (400, "previous_response_id"), reply
    # 'required' cut before a call's name is whole: no calls yet, and never the grammar's JSON as text
    for stream in (False, True):
        settings = dict(model="tiny-gemma3", messages=QUESTION, tools=TOOLS, temperature=0, tool_choice="required",
                        max_tokens=2)
        if stream:
            chunks = [c for c in client.chat.completions.create(stream=True, **settings) if c.choices]
            assert not any(c.choices[0].delta.content or c.choices[0].delta.tool_calls for c in chunks)
            assert chunks[-1].choices[0].finish_reason == "length"
        else:
            early = client.chat.completions.create(**settings).choices[0]
            assert (early.message.content, early.message.tool_calls, early.finish_reason) == (None, None, "length")


def test_a_named_function_or_required_forces_a_call(client):
    named = client.chat.completions.create(
        model="tiny-gemma3", messages=QUESTION, tools=TOOLS, temperature=0, max_tokens=MAX_TOKENS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}).choices[0]
    assert named.finish_reason == "tool_calls"
    (call,) = named.message.tool_calls
    assert call.function.name == "get_weather"
    assert re.fullmatch(r"[A-Z][a-z]{1,8}", json.loads(call.function.arguments)["city"])
    required = client.chat.completions.create(
        model="tiny-gemma3", messages=QUESTION, tools=TOOLS, temperature=0, max_tokens=MAX_TOKENS,
        tool_choice="required", parallel_tool_calls=False).choices[0]
    assert required.finish_reason == "tool_calls" and len(required.message.tool_calls) == 1
    call = required.message.tool_calls[0]
    assert call.function.name in ("get_weather", "get-time")
    assert set(json.loads(call.function.arguments)) == ({"city"} if call.function.name == "get_weather" else {"zone"})


def test_the_readme_loop_appends_the_clients_own_message_object(client):
    """As OpenAI's docs write it (and the README): the reply's message object goes back into ``messages``."""
    messages = list(QUESTION)
    reply = client.chat.completions.create(model="tiny-gemma3", messages=messages, tools=TOOLS, temperature=0,
                                           max_tokens=MAX_TOKENS, extra_body={"guided_regex": re.escape(CALL)}
                                           ).choices[0].message
    messages.append(reply)
    messages += [{"role": "tool", "tool_call_id": call.id, "content": "Sunny"} for call in reply.tool_calls]
    answer = client.chat.completions.create(model="tiny-gemma3", messages=messages, tools=TOOLS, temperature=0,
                                            max_tokens=MAX_TOKENS, extra_body={"guided_regex": "It is sunny"})
    assert answer.choices[0].message.content == "It is sunny"


def test_a_conversation_goes_on_after_tool_results(client):
    reply = client.chat.completions.create(model="tiny-gemma3", tools=TOOLS, temperature=0, max_tokens=MAX_TOKENS,
                                           messages=[*QUESTION, {"role": "assistant", "tool_calls": [
                                               {"id": "c1", "type": "function", "function": {
                                                   "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                                               {"role": "tool", "tool_call_id": "c1", "content": "Sunny"}],
                                           extra_body={"guided_regex": "It is sunny"})
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == ("It is sunny", "stop")


# ------------------------------------------------------------------------------------------------- errors
CALLED = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}


@pytest.mark.parametrize("fields, param", [
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1]"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools[0].function.parameters"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"messages": [*QUESTION, {"role": "tool", "tool_call_id": "c1", "content": "x"}]}, "messages[1].tool_call_id"),
    ({"messages": [{**QUESTION[0], "tool_calls": CALLED["tool_calls"]}]}, "messages[0].tool_calls"),
    ({"messages": [*QUESTION, CALLED, {"role": "tool", "tool_call_id": "c2", "content": "x"}]},
     "messages[2].tool_call_id"),
    ({"messages": [*QUESTION, CALLED, {"role": "tool", "content": "x"}]}, "messages[2].tool_call_id"),
    ({"messages": [*QUESTION, {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "get_weather", "arguments": "{city: Paris}"}}]}]}, "messages[1].tool_calls[0].function.arguments"),
])
def test_bad_tools_are_a_400_naming_the_field(server, fields, param):
    status, reply = post_json(server, {"messages": QUESTION, "max_tokens": 4, **fields})
    assert status == 400, reply
    assert reply["error"]["param"] == param, reply


def test_errors_found_in_the_written_conversation_name_the_request_message(server):
    """``converse`` adds a system message and joins tool results into one turn: a later error names the message of
    the request the turn was written from, not a position in the written conversation."""
    messages = [*QUESTION, CALLED, {"role": "tool", "tool_call_id": "c1", "content": "<start_of_image> here"}]
    status, reply = post_json(server, {"messages": messages, "tools": TOOLS, "max_tokens": 4})
    assert status == 400 and reply["error"]["message"].startswith("messages[2]: the text contains <start_of_image>")


def test_the_legacy_endpoint_still_refuses_tools(server):
    status, reply = post_json(server, {"prompt": "x", "tools": TOOLS}, path="/v1/completions")
    assert (status, reply["error"]["param"]) == (400, "tools")


# ------------------------------------------------------------------------------------------ Responses API
FLAT_TOOLS = [{"type": "function", **tool["function"]} for tool in TOOLS]  # the Responses API's form


def test_responses_answer_calls_as_function_call_items_and_continue_from_their_outputs(client):
    first = client.responses.create(model="tiny-gemma3", input=QUESTION[0]["content"], tools=FLAT_TOOLS,
                                    temperature=0, max_output_tokens=MAX_TOKENS,
                                    extra_body={"guided_regex": re.escape(CALL)})
    (item,) = first.output
    assert (item.type, item.name, json.loads(item.arguments), item.status) == (
        "function_call", "get_weather", {"city": "Paris"}, "completed")
    assert item.call_id.startswith("call_") and item.id.startswith("fc_") and first.status == "completed"
    assert [tool.name for tool in first.tools] == ["get_weather", "get-time"] and first.tool_choice == "auto"
    second = client.responses.create(model="tiny-gemma3", previous_response_id=first.id, tools=FLAT_TOOLS,
                                     input=[{"type": "function_call_output", "call_id": item.call_id,
                                             "output": "Sunny"}],
                                     temperature=0, max_output_tokens=MAX_TOKENS)
    # the same conversation sent whole to the chat endpoint gets the same (greedy) answer
    chat = client.chat.completions.create(model="tiny-gemma3", tools=TOOLS, temperature=0, max_tokens=MAX_TOKENS,
                                          messages=[*QUESTION, {"role": "assistant", "tool_calls": [
                                              {"id": item.call_id, "type": "function", "function": {
                                                  "name": "get_weather", "arguments": item.arguments}}]},
                                              {"role": "tool", "tool_call_id": item.call_id, "content": "Sunny"}])
    assert second.output_text == chat.choices[0].message.content
    listed = client.responses.input_items.list(second.id, order="asc").data
    assert [entry.type for entry in listed] == ["message", "function_call", "function_call_output"]
    assert (listed[1].call_id, listed[2].call_id, listed[2].output) == (item.call_id, item.call_id, "Sunny")


def test_responses_stream_calls_as_function_call_events(server, client):
    before = log_lines(server, "finish=tool_calls")
    events = list(client.responses.create(model="tiny-gemma3", input="Weather?", tools=FLAT_TOOLS, temperature=0,
                                          max_output_tokens=MAX_TOKENS, stream=True,
                                          tool_choice={"type": "function", "name": "get_weather"}))
    kinds = [event.type for event in events]
    deltas = [event.delta for event in events if event.type == "response.function_call_arguments.delta"]
    assert len(deltas) > 2  # the forced call's arguments come piece by piece, as they are generated
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     *["response.function_call_arguments.delta"] * len(deltas),
                     "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    (item,) = events[-1].response.output
    assert item.name == events[2].item.name == "get_weather" and events[2].item.id == item.id
    assert "".join(deltas) == events[-3].arguments == item.arguments
    assert set(json.loads(item.arguments)) == {"city"}
    assert logged(server, "finish=tool_calls", before)  # (the log line says what the client got)
    text = list(client.responses.create(model="tiny-gemma3", input="Weather?", tools=FLAT_TOOLS, temperature=0,
                                        max_output_tokens=MAX_TOKENS, stream=True,
                                        extra_body={"guided_regex": "Sunny in Paris"}))
    assert "".join(e.delta for e in text if e.type == "response.output_text.delta") == "Sunny in Paris"
    assert text[-1].response.output_text == "Sunny in Paris"


def test_responses_refuse_a_forced_call_with_a_json_format_and_hosted_tools(server):
    status, reply = post_json(server, {"input": "x", "tools": FLAT_TOOLS, "tool_choice": "required",
                                       "text": {"format": {"type": "json_object"}}}, path="/v1/responses")
    assert (status, reply["error"]["param"]) == (400, "tool_choice")
    status, reply = post_json(server, {"input": "x", "tools": [{"type": "file_search", "vector_store_ids": ["v"]}]},
                              path="/v1/responses")
    assert (status, reply["error"]["param"], reply["error"]["code"]) == (400, "tools[0].type", "unsupported_parameter")
