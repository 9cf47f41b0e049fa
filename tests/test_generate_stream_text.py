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


def test_text_on_both_sides_of_a_skipped_turn_token_streams_the_decoded_text(tiny_decoding, monkeypatch):
    """``decode(skip_special_tokens=True)`` skips every added token marked special, ``<start_of_turn>`` included,
    which ``all_special_ids`` leaves out: byte runs on both sides of it decode as one run. "€" then a lone lead byte
    across ``<start_of_turn>`` is one run that is not UTF-8 (four U+FFFD); "€" must not be streamed before it."""
    model, tokenizer = tiny_decoding
    vocab = tokenizer.get_vocab()
    turn = vocab["<start_of_turn>"]
    assert turn not in tokenizer.all_special_ids
    plain = tokenizer.encode("the cat", add_special_tokens=False)
    script = [*plain, *(vocab[f"<0x{b:02X}>"] for b in "€".encode()), turn, vocab["<0xF0>"]]
    expected = tokenizer.decode(script, skip_special_tokens=True)
    assert expected.endswith("\ufffd" * 4) and "€" not in expected
    scripted(monkeypatch, [script])
    sampling = Sampling(max_new_tokens=len(script))
    deltas = [event.text_delta for event in stream_generate(model, torch.tensor([[2]]), sampling=sampling,
                                                            tokenizer=tokenizer)]
    assert "".join(deltas) == expected


def test_a_stop_string_completed_by_a_byte_piece_stops_there(tiny_decoding, monkeypatch):
    """A stop string whose last character comes in byte pieces ("é" = C3 A9) ends the answer at that byte, as
    ``stop``: not only at the next ordinary piece (tokens generated past the stop), nor, at the token limit, as
    ``length`` with the text cut all the same. For ``generate``, its stream and the server's engine
    (``RowState``)."""
    from gemma3vl.infer import engine as engine_module
    from gemma3vl.infer.completion import Row
    from gemma3vl.infer.conversation import EncodedPrompt
    from gemma3vl.infer.engine import ContinuousBatcher

    model, tokenizer = tiny_decoding
    vocab = tokenizer.get_vocab()
    plain = tokenizer.encode("the cat", add_special_tokens=False)
    accent = [vocab["<0xC3>"], vocab["<0xA9>"]]
    cjk = [vocab[f"<0x{b:02X}>"] for b in "中".encode()]
    prompt = torch.tensor([[2]])
    for script, limit in (([*plain, *accent], None), ([*plain, *accent, *cjk, *cjk], None), ([*plain, *accent], 40)):
        stop_at = len(plain) + len(accent)
        sampling = Sampling(max_new_tokens=limit or len(script), stop_strings=("é",))
        monkeypatch.undo()
        scripted(monkeypatch, [script])
        result = generate_result(model, prompt, sampling=sampling, tokenizer=tokenizer)
        assert (result.tokens, result.texts, result.finish_reasons) == ([script[:stop_at]], ["the cat"], ["stop"])
        monkeypatch.undo()
        scripted(monkeypatch, [script])
        events = list(stream_generate(model, prompt, sampling=sampling, tokenizer=tokenizer))
        assert "".join(event.text_delta for event in events) == "the cat" and len(events) == stop_at
        assert events[-1].finish_reason == "stop"

        monkeypatch.undo()
        step = iter(script)
        monkeypatch.setattr(engine_module, "choose_tokens", lambda scores, rows, active=None: torch.tensor([next(step)]))
        engine, done = ContinuousBatcher(model, tokenizer, slots=1, max_length=64), []
        engine.add(Row(prompt=EncodedPrompt(prompt[0]), max_new_tokens=sampling.max_new_tokens, stop_strings=("é",),
                       on_finish=done.append), sampling)
        while engine.active:
            engine.step()
        assert (done[0].token_ids, done[0].text, done[0].finish_reason) == (script[:stop_at], "the cat", "stop")
