"""vLLM's ``prompt_logprobs`` on the chat and legacy completions endpoints: per prompt token (None for the first)
its logprob, its rank (how many tokens are at least as likely) and the ``k`` likeliest alternatives, as
``{token id: {"logprob", "rank", "decoded_token"}}``.

The oracle is transformers itself (tiny random fp32 model): its forward over the same prompt tokens (images
included, through its own processor's chat template) gives the log-softmax every value, rank and alternative is
checked against."""

from __future__ import annotations

import io

import pytest
import torch

from gemma3vl.infer.server import ChatCompletionServer, ServerSettings
from test_server import hf_messages, image_messages, post_json

TOP = 2


@pytest.fixture(scope="module")
def server(runtime):
    settings = ServerSettings(port=0, max_batch_size=2, batch_wait_s=0.01, max_tokens=4, max_n=2)
    with ChatCompletionServer(runtime, settings, log=io.StringIO()) as live:
        yield live


@pytest.fixture(scope="module")
def reference(runtime):
    from transformers import Gemma3ForConditionalGeneration

    return Gemma3ForConditionalGeneration.from_pretrained(runtime.model_dir, dtype=torch.float32).eval()


def transformers_logprobs(reference, runtime, inputs) -> torch.Tensor:
    """[T - 1, V]: the log-softmax of transformers' logits at every prompt position but the last."""
    ids = inputs["input_ids"]
    with torch.no_grad():
        logits = reference(input_ids=ids, attention_mask=torch.ones_like(ids),
                           token_type_ids=(ids == runtime.config.image_token_id).long(),
                           pixel_values=inputs.get("pixel_values")).logits[0, :-1].float()
    return logits.log_softmax(dim=-1)


def check(listed, ids: list[int], expected: torch.Tensor, top: int) -> None:
    assert len(listed) == len(ids) and listed[0] is None
    for position, (entry, token) in enumerate(zip(listed[1:], ids[1:])):
        row = expected[position]
        value = row[token]
        own = entry[str(token)]
        assert abs(own["logprob"] - value.item()) < 1e-4
        assert own["rank"] == int((row >= value).sum())
        best = row.topk(top)
        for rank, (token_id, logprob) in enumerate(zip(best.indices.tolist(), best.values.tolist()), start=1):
            listed_best = entry[str(token_id)]
            assert abs(listed_best["logprob"] - logprob) < 1e-4
            assert listed_best["rank"] == (own["rank"] if token_id == token else rank)
        assert len(entry) == top + (token not in best.indices.tolist())


def test_chat_prompt_logprobs_with_an_image_equal_transformers(server, runtime, reference):
    messages = image_messages()
    inputs = runtime.processor.apply_chat_template(hf_messages(messages), add_generation_prompt=True,
                                                   tokenize=True, return_dict=True, return_tensors="pt")
    status, reply = post_json(server, {"messages": messages, "max_tokens": 3, "temperature": 0, "n": 2,
                                       "prompt_logprobs": TOP})
    assert status == 200, reply
    ids = inputs["input_ids"][0].tolist()
    assert reply["usage"]["prompt_tokens"] == len(ids)
    check(reply["prompt_logprobs"], ids, transformers_logprobs(reference, runtime, inputs), TOP)
    some = next(entry for entry in reply["prompt_logprobs"][1:] if entry)
    assert all(isinstance(item["decoded_token"], str) for item in some.values())
    status, plain = post_json(server, {"messages": messages, "max_tokens": 3, "temperature": 0})
    assert "prompt_logprobs" not in plain and plain["choices"][0] == reply["choices"][0]


@pytest.mark.parametrize("max_tokens", [1, 3])  # 1: answered from the scoring forward alone; 3: by the engine
def test_legacy_prompt_logprobs_equal_transformers_and_cut_echo_to_its_own_count(server, runtime, reference,
                                                                                max_tokens):
    ids = runtime.tokenizer("Tell me about", add_special_tokens=True)["input_ids"]
    status, reply = post_json(server, {"prompt": ids, "max_tokens": max_tokens, "temperature": 0,
                                       "prompt_logprobs": TOP + 1, "echo": True, "logprobs": 1},
                              path="/v1/completions")
    assert status == 200, reply
    choice = reply["choices"][0]
    check(choice["prompt_logprobs"], ids, transformers_logprobs(reference, runtime, {"input_ids": torch.tensor([ids])}),
          TOP + 1)
    assert all(len(alternatives) <= 2 for alternatives in choice["logprobs"]["top_logprobs"][1:])


@pytest.mark.parametrize("body, path", [
    ({"messages": [{"role": "user", "content": "hi"}], "prompt_logprobs": 21}, "/v1/chat/completions"),
    ({"messages": [{"role": "user", "content": "hi"}], "prompt_logprobs": 1, "stream": True},
     "/v1/chat/completions"),
    ({"prompt": "hi", "prompt_logprobs": -1}, "/v1/completions"),
    ({"input": "hi", "prompt_logprobs": 1}, "/v1/responses"),
])
def test_bad_prompt_logprobs_is_a_400_naming_it(server, body, path):
    status, reply = post_json(server, body, path=path)
    assert (status, reply["error"]["param"]) == (400, "prompt_logprobs"), reply
