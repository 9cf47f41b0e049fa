"""vLLM's ``POST /tokenize`` and ``POST /detokenize``: the token ids this server makes of a prompt or a conversation
(to write ``logit_bias`` or ``stop_token_ids``, or to count a prompt against the context before sending it), and
the text of token ids.

``/tokenize`` takes ``prompt`` (text, read as ``/v1/completions`` reads it: ``<bos>`` added unless
``add_special_tokens`` is false or the text starts with it) or ``messages`` (a chat conversation, read as
``/v1/chat/completions`` reads it: images fetched under the same rules and limits, the chat template applied with
the generation prompt, each image as its 256 soft tokens; ``tools`` and ``tool_choice`` too), and answers
``{"count", "max_model_len", "tokens", "token_strs"}`` (``token_strs`` with ``return_token_strs: true``, else
null). ``/detokenize`` takes ``tokens`` and answers ``{"prompt"}``, special tokens kept, as vLLM decodes them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gemma3vl.infer.legacy_completions import text_prompt_ids
from gemma3vl.infer.openai_protocol import (
    _invalid,
    _is_int,
    continue_final_message_of,
    json_body,
    parse_message,
    prompt_options_of,
    tool_use_of_body,
)

if TYPE_CHECKING:
    from gemma3vl.infer.server import ChatCompletionServer, RequestRecord


def tokenize(app: ChatCompletionServer, body: dict[str, Any]) -> dict[str, Any]:
    """The answer to a ``/tokenize`` request body (a 4xx :class:`ApiError` naming the field at fault)."""
    app.check_model(body.get("model"))
    if ("prompt" in body) == ("messages" in body):
        raise _invalid("give 'prompt' (text) or 'messages' (a conversation), one of them", "prompt")
    for key in ("add_special_tokens", "add_generation_prompt", "return_token_strs"):
        if body.get(key) is not None and not isinstance(body[key], bool):
            raise _invalid(f"'{key}' must be a boolean", key)
    runtime = app.runtime
    if "prompt" in body:
        prompt = body["prompt"]
        if not isinstance(prompt, str):
            raise _invalid("'prompt' must be a string", "prompt")
        ids, _ = text_prompt_ids(runtime, prompt, add_special_tokens=body.get("add_special_tokens", True))
    else:
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise _invalid("'messages' must be a non-empty list", "messages")
        continuing = continue_final_message_of(body)  # (as the chat endpoint reads it, tools included)
        encoded = app.encode_messages([parse_message(m, f"messages[{i}]", tool_messages=True)
                                       for i, m in enumerate(messages)], continuing, tool_use_of_body(body),
                                      **prompt_options_of(body))
        ids = encoded.input_ids.tolist()
    strings = None
    if body.get("return_token_strs"):
        with runtime.lock:
            strings = runtime.tokenizer.convert_ids_to_tokens(ids)
    return {"count": len(ids), "max_model_len": app.scheduler.max_length, "tokens": ids, "token_strs": strings}


def detokenize(app: ChatCompletionServer, body: dict[str, Any]) -> dict[str, Any]:
    """The answer to a ``/detokenize`` request body."""
    app.check_model(body.get("model"))
    tokens = body.get("tokens")
    vocab = app.token_id_limit
    if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
        raise _invalid("'tokens' must be a list of token ids", "tokens")
    outside = [t for t in tokens if not 0 <= t < vocab]
    if outside:
        raise _invalid(f"'tokens' holds {outside[0]}, outside the vocabulary (ids 0 to {vocab - 1})", "tokens")
    with app.runtime.lock:
        return {"prompt": app.runtime.tokenizer.decode(tokens)}


def serve_tokenizer(handler: Any, path: str, raw: bytes, record: RequestRecord) -> None:
    """Answer ``/tokenize`` or ``/detokenize`` on ``handler`` (the server's request handler)."""
    body = json_body(raw)
    answer = (tokenize if path == "/tokenize" else detokenize)(handler.app, body)
    record.detail = f"tokens={len(answer['tokens'])}" if "tokens" in answer else f"tokens={len(body['tokens'])}"
    handler._send_json(200, answer)
