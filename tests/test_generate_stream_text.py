"""Streamed text of ``generate``: the deltas of each row add up to ``tokenizer.decode`` of its tokens, and no
delta ever hands out a character that later tokens change.

The tiny tokenizer has Gemma's byte fallback (``<0x..>`` pieces, decoded run by run: a run that is not valid
UTF-8 as a whole becomes one U+FFFD per byte). The tokens are scripted (``choose_tokens`` replaced) so that a
valid character is followed by a byte that spoils its run; the oracle is the tokenizer's own ``decode`` of all
the tokens, which is what transformers prints for them.
"""

import torch

from gemma3vl.infer.generate import Sampling, generate_result, stream_generate
from generation_helpers import scripted


def test_byte_fallback_runs_stream_exactly_the_decoded_text(tiny_decoding, monkeypatch):
    model, tokenizer = tiny_decoding
    vocab = tokenizer.get_vocab()

    def byte(value: int) -> int:
        return vocab[f"<0x{value:02X}>"]

    plain = tokenizer.encode("the cat", add_special_tokens=False)
    rows = [
        # "é" (C3 A9), then a stray continuation byte: the whole run decodes to three U+FFFD, "é" included
        [*plain, byte(0xC3), byte(0xA9), byte(0x82), *plain],
        # "€" (E2 82 AC) split over three tokens, a special token (skipped) inside a run, then text
        [*plain, byte(0xE2), byte(0x82), vocab["<start_of_image>"], byte(0xAC), *plain, *plain],
    ]
    length = min(len(row) for row in rows)
    rows = [row[:length] for row in rows]
    scripted(monkeypatch, rows)
    prompt = torch.tensor([tokenizer.encode("hello", add_special_tokens=True)] * 2)
    settings = Sampling(max_new_tokens=length)
    texts, deltas = ["", ""], [[], []]
    for event in stream_generate(model, prompt, sampling=settings, tokenizer=tokenizer):
        texts[event.row] += event.text_delta
        deltas[event.row].append(event.text_delta)
    expected = [tokenizer.decode(row, skip_special_tokens=True) for row in rows]
    assert "\ufffd" * 3 in expected[0] and "é" not in expected[0] and "€" in expected[1]
    assert texts == expected
    for row, pieces in enumerate(deltas):  # every prefix handed out is a prefix of the final text
        handed = ""
        for piece in pieces:
            handed += piece
            assert expected[row].startswith(handed), (row, handed)
    monkeypatch.undo()
    scripted(monkeypatch, rows)
    result = generate_result(model, prompt, sampling=settings, tokenizer=tokenizer)
    assert result.tokens == rows and result.texts == expected
