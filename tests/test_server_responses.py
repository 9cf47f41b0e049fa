"""``POST /v1/responses`` (OpenAI's Responses API) on the live server, driven by the official ``openai`` client
(``responses.create``, streamed and not, ``responses.stream``, ``responses.parse``) and raw HTTP.

The oracle for every answer is transformers' own ``apply_chat_template`` on the equivalent chat messages followed by
``generate`` (``test_server.reference_answer``), greedy: a Responses request must be answered exactly as the same
conversation sent to ``/v1/chat/completions``. The model is the tiny random one.
"""

from __future__ import annotations

import io
import json

import openai
import pytest

from gemma3vl.infer.server import ChatCompletionServer, ServerSettings
from gemma3vl.pictures import draw_picture
from test_server import data_url, post_json, post_raw, reference_answer

MAX_TOKENS = 12
LIMIT = 160  # the JSON-schema answer's token limit: the schema below ends well within it on the tiny model
PATH = "/v1/responses"
STREAM_ORDER = ["response.created", "response.in_progress", "response.output_item.added",
                "response.content_part.added"]
STREAM_END = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


@pytest.fixture(scope="module")
def server(runtime):
    settings = ServerSettings(port=0, max_batch_size=4, batch_wait_s=0.05, max_tokens=LIMIT)
    with ChatCompletionServer(runtime, settings, log=io.StringIO()) as live:
        yield live


def image_input(text: str, kind: str) -> tuple[list[dict], list[dict]]:
    """The same question as Responses ``input`` and as chat messages."""
    url = data_url(draw_picture(kind))
    responses = [{"role": "user", "content": [{"type": "input_image", "image_url": url},
                                              {"type": "input_text", "text": text}]}]
    chat = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]
    return responses, chat


def test_an_image_question_is_answered_as_generate_answers_it(server, client, runtime):
    responses_input, messages = image_input("What is in the picture?", "red circle")
    response = client.responses.create(model=server.model_name, input=responses_input, temperature=0,
                                       max_output_tokens=MAX_TOKENS)
    text, finish, prompt_tokens, completion_tokens = reference_answer(runtime, messages)
    assert response.output_text == text
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.model == server.model_name and isinstance(response.created_at, (int, float))
    [message] = response.output
    assert (message.type, message.role, message.id[:4]) == ("message", "assistant", "msg_")
    assert [part.type for part in message.content] == ["output_text"]
    if finish == "length":
        assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    else:
        assert response.status == "completed" and response.incomplete_details is None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (prompt_tokens, completion_tokens)
    assert response.usage.total_tokens == prompt_tokens + completion_tokens
    assert response.max_output_tokens == MAX_TOKENS and response.store is True  # kept (previous_response_id)


def test_instructions_are_the_system_message_and_earlier_turns_go_through_the_template(server, client, runtime):
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": [{"type": "output_text", "text": "Hello there"}]},
               {"role": "user", "content": [{"type": "input_text", "text": "Question number 2"}]}]
    response = client.responses.create(model=server.model_name, instructions="Be brief.", input=history,
                                       temperature=0, max_output_tokens=MAX_TOKENS, metadata={"run": "a"})
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "Question number 2"}]
    assert response.output_text == reference_answer(runtime, messages)[0]
    assert response.instructions == "Be brief." and response.metadata == {"run": "a"}
    # a developer message of its own too: one system message, the instructions first (Gemma's template takes one)
    merged = client.responses.create(model=server.model_name, instructions="Be brief.", temperature=0,
                                     max_output_tokens=MAX_TOKENS,
                                     input=[{"role": "developer", "content": "Answer in French."}, history[0]])
    expected = reference_answer(runtime, [{"role": "system", "content": "Be brief.\n\nAnswer in French."},
                                          {"role": "user", "content": "hi"}])[0]
    assert merged.output_text == expected
    # a plain string is one user message
    plain = client.responses.create(model=server.model_name, input="hi", temperature=0, max_output_tokens=MAX_TOKENS)
    assert plain.output_text == reference_answer(runtime, [{"role": "user", "content": "hi"}])[0]


def test_the_stream_is_openais_event_sequence_and_adds_up_to_the_answer(server, client, runtime):
    responses_input, messages = image_input("Describe it", "blue square and green star")
    events = list(client.responses.create(model=server.model_name, input=responses_input, temperature=0,
                                          max_output_tokens=MAX_TOKENS, stream=True))
    text, finish, prompt_tokens, completion_tokens = reference_answer(runtime, messages)
    kinds = [event.type for event in events]
    deltas = [event for event in events if event.type == "response.output_text.delta"]
    final = "response.incomplete" if finish == "length" else "response.completed"
    assert kinds == STREAM_ORDER + ["response.output_text.delta"] * len(deltas) + STREAM_END + [final]
    assert deltas and "".join(event.delta for event in deltas) == text
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert len({event.response.id for event in (events[0], events[1], events[-1])}) == 1
    message_id = events[2].item.id
    assert all(event.item_id == message_id for event in deltas)
    assert events[-4].text == text and events[-2].item.content[0].text == text
    last = events[-1].response
    assert last.output_text == text and last.status == final.removeprefix("response.")
    assert (last.usage.input_tokens, last.usage.output_tokens) == (prompt_tokens, completion_tokens)


def test_the_wire_format_names_each_event_and_ends_without_done(server, runtime):
    status, content_type, raw = post_raw(server, json.dumps(
        {"model": server.model_name, "input": "Question number 0", "stream": True, "temperature": 0,
         "max_output_tokens": MAX_TOKENS}).encode(), path=PATH)
    assert status == 200 and content_type.startswith("text/event-stream")
    blocks = raw.decode().split("\n\n")
    assert blocks[-1] == "" and "[DONE]" not in raw.decode()
    kinds = []
    for block in blocks[:-1]:
        event_line, data_line = block.split("\n")
        kinds.append(json.loads(data_line.removeprefix("data: "))["type"])
        assert event_line == f"event: {kinds[-1]}"
    text = reference_answer(runtime, [{"role": "user", "content": "Question number 0"}])[0]
    assert kinds.count("response.output_text.delta") > 3 and len(text) > 3  # text as it comes, not all at the end


def test_json_schema_output_through_parse_and_the_stream_helper(server, client):
    """``responses.parse`` with a pydantic model (the client sends it as a strict ``json_schema`` format) gets a
    parsed object; ``responses.stream`` puts the same greedy answer together and ends with ``response.completed``."""
    pytest.importorskip("xgrammar")
    pydantic = pytest.importorskip("pydantic")

    class Receipt(pydantic.BaseModel):
        store: str = pydantic.Field(pattern="^[a-z ]{1,10}$")
        paid: bool
        method: str = pydantic.Field(json_schema_extra={"enum": ["cash", "card"]})

    settings = dict(model=server.model_name, input="Read this receipt", temperature=0, max_output_tokens=LIMIT)
    parsed = client.responses.parse(**settings, text_format=Receipt)
    assert parsed.status == "completed" and isinstance(parsed.output_parsed, Receipt)
    assert parsed.output_parsed.method in ("cash", "card")
    assert parsed.text.format.type == "json_schema" and parsed.text.format.name == "Receipt"
    with client.responses.stream(**settings, text_format=Receipt) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == parsed.output_text
    assert final.output_parsed == parsed.output_parsed
    # json_object, sampled with a seed (an extension, as on the chat endpoint): the chat endpoint's answer
    chat = client.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=LIMIT, temperature=1, seed=1,
                                          response_format={"type": "json_object"})
    any_object = client.responses.create(model=server.model_name, input="hi", max_output_tokens=LIMIT, temperature=1,
                                         extra_body={"seed": 1}, text={"format": {"type": "json_object"}})
    assert any_object.output_text == chat.choices[0].message.content
    assert isinstance(json.loads(any_object.output_text), dict)


@pytest.mark.parametrize("body, param, code", [
    ({}, "input", "missing_required_parameter"),
    ({"input": []}, "input", "invalid_value"),
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id", "previous_response_not_found"),
    ({"input": "hi", "previous_response_id": 7}, "previous_response_id", "invalid_value"),
    ({"input": "hi", "store": "yes"}, "store", "invalid_value"),
    ({"input": "hi", "conversation": "conv_1"}, "conversation", "unsupported_parameter"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type", "unsupported_parameter"),
    ({"input": "hi", "background": True}, "background", "unsupported_parameter"),
    ({"input": "hi", "include": "message.output_text.logprobs"}, "include", "invalid_value"),
    ({"input": "hi", "top_logprobs": 21}, "top_logprobs", "invalid_value"),
    ({"input": "hi", "reasoning": {"effort": "high"}}, "reasoning", "unsupported_parameter"),
    ({"input": "hi", "truncation": "auto"}, "truncation", "unsupported_parameter"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, "input[0].call_id",
     "invalid_value"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type", "unsupported_content_type"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0].type",
     "unsupported_content_type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]},
     "input[0].content[0].file_id", "unsupported_parameter"),
    ({"input": [{"role": "assistant", "content": [{"type": "input_image", "image_url": "data:,"}]}]},
     "input[0].content", "invalid_value"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role", "invalid_value"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens", "invalid_value"),
    ({"input": "hi", "max_output_tokens": LIMIT + 1}, "max_output_tokens", "invalid_value"),
    ({"input": "hi", "text": {"format": {"type": "xml"}}}, "text.format", "invalid_value"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format",
     "missing_required_parameter"),
    ({"input": "hi", "metadata": {"a": 1}}, "metadata", "invalid_value"),
    ({"input": "hi", "instructions": ["a"]}, "instructions", "invalid_value"),
    ({"input": "hi", "model": "another"}, "model", "model_not_found"),
    ({"input": [{"role": "assistant", "content": "x"}]}, "input", "invalid_conversation"),
])
def test_what_the_server_does_not_do_is_refused_naming_the_field(server, body, param, code):
    status, reply = post_json(server, body, path=PATH)
    assert 400 <= status < 500 and reply["error"]["param"] == param and reply["error"]["code"] == code, reply
    assert post_json(server, {"input": "hi", "max_output_tokens": 2}, path=PATH)[0] == 200  # still serving


def test_harmless_fields_are_accepted(server):
    status, reply = post_json(server, {"input": "hi", "max_output_tokens": 2, "tools": [], "tool_choice": "auto",
                                       "store": True, "truncation": "disabled", "user": "u1",
                                       "include": ["reasoning.encrypted_content", "message.input_image.image_url"],
                                       "reasoning": {"effort": None}, "parallel_tool_calls": True,
                                       "text": {"format": {"type": "text"}}}, path=PATH)
    assert status == 200 and reply["status"] in ("completed", "incomplete") and reply["store"] is True
    assert reply["output"][0]["content"][0]["logprobs"] == []  # none asked for


def test_logprobs_are_the_chat_endpoints(server, client):
    """``include: ["message.output_text.logprobs"]`` with ``top_logprobs``: the output text's per-token logprobs,
    the same items as the chat endpoint gives for the same conversation (greedy); streamed, the deltas carry them."""
    settings = dict(model=server.model_name, temperature=0)
    chat = client.chat.completions.create(**settings, messages=[{"role": "user", "content": "Question number 1"}],
                                          max_tokens=MAX_TOKENS, logprobs=True, top_logprobs=2)
    expected = [item.model_dump() for item in chat.choices[0].logprobs.content]
    asked = dict(**settings, input="Question number 1", max_output_tokens=MAX_TOKENS, top_logprobs=2,
                 include=["message.output_text.logprobs"])
    response = client.responses.create(**asked)
    part = response.output[0].content[0]
    assert part.text == chat.choices[0].message.content and len(expected) > 3
    assert [item.model_dump() for item in part.logprobs] == expected and response.top_logprobs == 2
    events = list(client.responses.create(**asked, stream=True))
    streamed = [item.model_dump() for event in events if event.type == "response.output_text.delta"
                for item in event.logprobs]
    assert streamed == expected
    done = next(event for event in events if event.type == "response.output_text.done")
    assert [item.model_dump() for item in done.logprobs] == expected


def test_previous_response_id_continues_the_kept_conversation(server, client, runtime):
    """A kept response's conversation (its input, its predecessors', its answer) goes before the next input; its
    ``instructions`` do not (OpenAI's rule); streamed answers are kept too; retrieve gives the response as answered."""
    settings = dict(model=server.model_name, temperature=0, max_output_tokens=MAX_TOKENS)
    first = client.responses.create(**settings, instructions="Be brief.", input="Question number 1")
    assert first.store is True and first.previous_response_id is None
    second = client.responses.create(**settings, previous_response_id=first.id, input="Question number 2")
    turns = [{"role": "user", "content": "Question number 1"}, {"role": "assistant", "content": first.output_text},
             {"role": "user", "content": "Question number 2"}]
    assert second.output_text == reference_answer(runtime, turns)[0] and second.previous_response_id == first.id
    events = list(client.responses.create(**settings, previous_response_id=second.id, stream=True,
                                          instructions="Answer in French.", input="Question number 3"))
    third = events[-1].response
    turns += [{"role": "assistant", "content": second.output_text}, {"role": "user", "content": "Question number 3"}]
    assert third.output_text == reference_answer(runtime, [{"role": "system", "content": "Answer in French."},
                                                           *turns])[0]
    assert third.store is True and client.responses.retrieve(third.id).output_text == third.output_text
    assert client.responses.retrieve(first.id).model_dump() == first.model_dump()
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError, match="never kept, deleted"):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError, match="previous_response_not_found|not found"):
        client.responses.create(**settings, previous_response_id=first.id, input="again")
    again = client.responses.create(**settings, previous_response_id=second.id, input="Question number 3")
    # the second's kept conversation (which holds the first's turns) outlives the first's deletion
    assert again.output_text == reference_answer(runtime, turns)[0]
    unkept = client.responses.create(**settings, input="hi", store=False)
    assert unkept.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unkept.id)


def test_the_store_drops_the_least_recently_used_within_its_budget():
    from gemma3vl.infer.openai_protocol import RequestMessage
    from gemma3vl.infer.responses_api import ResponseStore

    def response(name: str) -> dict:
        return {"id": name, "text": "x" * 100}

    turns = [RequestMessage(role="user", parts=["y" * 100])]
    size = len(json.dumps(response("a"))) + 100
    store = ResponseStore(max_bytes=2 * size)
    assert store.put(response("a"), turns) and store.put(response("b"), turns)
    assert store.get("a") is not None  # a is now the most recently used: b goes first
    assert store.put(response("c"), turns) and len(store) == 2
    assert store.get("b") is None and store.get("a") is not None and store.get("c") is not None
    assert store.delete("a") and not store.delete("a") and store.put(response("d"), turns) and len(store) == 2
    assert not store.put({"id": "big", "text": "z" * (2 * size)}, turns) and store.get("big") is None
    assert not ResponseStore(max_bytes=0).put(response("e"), turns)


def test_a_server_that_keeps_no_responses(runtime):
    settings = ServerSettings(port=0, max_batch_size=1, max_tokens=2, response_store_bytes=0)
    with ChatCompletionServer(runtime, settings, log=io.StringIO()) as live:
        status, reply = post_json(live, {"input": "hi"}, path=PATH)
        assert status == 200 and reply["store"] is False
        status, reply = post_json(live, {"input": "hi", "previous_response_id": reply["id"]}, path=PATH)
        assert status == 400 and reply["error"]["code"] == "unsupported_parameter"
        assert "--response-store 0" in reply["error"]["message"]


def test_the_route_takes_post_and_unknown_ids_are_404(server):
    status, _, raw = post_raw(server, b"", path=PATH, method="GET")
    assert status == 405 and json.loads(raw)["error"]["code"] == "method_not_allowed"
    for method in ("GET", "DELETE"):
        status, _, raw = post_raw(server, b"", path=PATH + "/resp_missing", method=method)
        assert status == 404 and json.loads(raw)["error"]["code"] == "not_found"
    status, _, raw = post_raw(server, b"", path="/v1/models", method="DELETE")
    assert status == 405


def test_input_items_list_what_a_kept_response_answered(server, client):
    """``client.responses.input_items.list``: the kept conversation before the answer (a previous response's turns
    included, instructions not), latest first by default, paged by ``limit`` / ``after`` (the client's
    auto-pagination walks every page), images' URLs only with ``include``."""
    settings = dict(model=server.model_name, temperature=0, max_output_tokens=3)
    images, _ = image_input("What is it?", "red circle")
    first = client.responses.create(**settings, instructions="Be brief.", input=images)
    second = client.responses.create(**settings, previous_response_id=first.id, input="And now?")
    items = client.responses.input_items.list(second.id, order="asc")
    shapes = [(item.role, [part.type for part in item.content]) for item in items.data]
    assert shapes == [("user", ["input_image", "input_text"]), ("assistant", ["output_text"]),
                      ("user", ["input_text"])]
    assert items.data[1].content[0].text == first.output_text and items.data[2].content[0].text == "And now?"
    assert items.data[0].content[0].image_url is None and items.has_more is False
    with_urls = client.responses.input_items.list(second.id, order="asc", include=["message.input_image.image_url"])
    assert with_urls.data[0].content[0].image_url == images[0]["content"][0]["image_url"]
    latest_first = client.responses.input_items.list(second.id)
    assert [item.id for item in latest_first.data] == [item.id for item in reversed(items.data)]
    page = client.responses.input_items.list(second.id, order="asc", limit=2)
    assert [item.id for item in page.data] == [item.id for item in items.data[:2]] and page.has_more
    assert [item.id for item in page] == [item.id for item in items.data]  # auto-pagination: after=last_id
    # the first response's one input item (ids are each response's own: msg_<its hex>_<position>)
    (only,) = client.responses.input_items.list(first.id).data
    assert only.content == items.data[0].content and only.id == f"msg_{first.id.removeprefix('resp_')}_0"
    for query, param in (("limit=0", "limit"), ("limit=" + "9" * 5000, "limit"), ("limit=%C2%B2", "limit"),
                         ("order=up", "order"), ("after=msg_nope", "after")):
        status, _, raw = post_raw(server, b"", path=f"{PATH}/{second.id}/input_items?{query}", method="GET")
        assert status == 400 and json.loads(raw)["error"]["param"] == param
    status, _, raw = post_raw(server, b"", path=f"{PATH}/resp_missing/input_items", method="GET")
    assert status == 404
    status, _, raw = post_raw(server, b"", path=f"{PATH}/{second.id}/input_items", method="DELETE")
    assert status == 405 and client.responses.retrieve(second.id).id == second.id


def test_conversation_errors_name_the_requests_own_fields(runtime):
    """A conversation the server cannot answer is a 400 naming the field it came from: ``input`` on the Responses
    API, ``messages`` on chat completions; over the context, the error says what took the room (no made-up
    ``max_tokens`` when none was asked for)."""
    settings = ServerSettings(port=0, max_tokens=64, max_sequence_length=64)
    long = "word " * 100
    with ChatCompletionServer(runtime, settings, log=io.StringIO()) as live:
        status, reply = post_json(live, {"input": [{"role": "user", "content": "hi"}, {
            "type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"}],
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]},
            path="/v1/responses")
        assert (status, reply["error"]["param"]) == (400, "input"), reply
        status, reply = post_json(live, {"input": long}, path="/v1/responses")
        assert (status, reply["error"]["param"], reply["error"]["code"]) == (400, "input", "context_length_exceeded")
        assert "leaving no room for an answer" in reply["error"]["message"], reply
        status, reply = post_json(live, {"messages": [{"role": "user", "content": long}]})
        assert (status, reply["error"]["param"]) == (400, "messages")
        assert "the messages take" in reply["error"]["message"] and "-" not in reply["error"]["message"], reply
        status, reply = post_json(live, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 60})
        assert "max_tokens asks for 60 more" in reply["error"]["message"], reply
        status, reply = post_json(live, {"input": [{"type": "function_call_output", "call_id": "zz", "output": "x"}],
                                         "tools": [{"type": "function", "name": "f", "parameters": {
                                             "type": "object"}}]}, path="/v1/responses")
        assert status == 400 and "function_call_output must answer" in reply["error"]["message"], reply
