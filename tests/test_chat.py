"""``gemma3vl chat`` driven by scripted input: every answer must equal ``generate`` on the same history, built
by transformers' own chat template (images attached with /image go to the next message; /reset forgets)."""

from __future__ import annotations

import io

import pytest

from gemma3vl.cli import main
from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.chat import ChatSession, run_chat
from gemma3vl.infer.generate import Sampling, generate
from gemma3vl.infer.prompt import build_inputs
from gemma3vl.infer.runtime import InferenceRuntime
from gemma3vl.pictures import draw_picture
from gemma3vl.tiny import write_tiny_checkpoint

MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("chat") / "tiny")


@pytest.fixture(scope="module")
def runtime(model_dir):
    return InferenceRuntime.load(model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("pictures") / "circle.png"
    draw_picture("red circle").save(path)
    return path


def greedy(runtime, max_new_tokens=MAX_NEW_TOKENS) -> Sampling:
    return Sampling(max_new_tokens=max_new_tokens, stop_token_ids=runtime.config.stop_token_ids)


def reference(runtime, messages, max_new_tokens=MAX_NEW_TOKENS) -> str:
    """The answer ``generate`` gives for ``messages`` through transformers' apply_chat_template."""
    encoded = runtime.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True, return_tensors="pt")
    tokens = generate(runtime.model, encoded["input_ids"], attention_mask=encoded["attention_mask"],
                      pixel_values=encoded.get("pixel_values"), sampling=greedy(runtime, max_new_tokens))[0]
    stop = set(runtime.config.stop_token_ids)
    return runtime.tokenizer.decode([t for t in tokens if t not in stop], skip_special_tokens=True)


def user(text, *images):
    return {"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                        {"type": "text", "text": text}]}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def test_chat_command_answers_equal_generate_on_the_same_history(model_dir, runtime, picture, monkeypatch, capsys):
    script = f"/image {picture}\nWhat is it?\nAnd the colour?\n/reset\nHello there\n/exit\nnever read\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    code = main(["chat", str(model_dir), "--greedy", "--max-new-tokens", str(MAX_NEW_TOKENS), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0
    image = draw_picture("red circle")
    first = reference(runtime, [user("What is it?", image)])
    second = reference(runtime, [user("What is it?", image), assistant(first), user("And the colour?")])
    third = reference(runtime, [user("Hello there")])
    assert out == f"{first}\n{second}\n{third}\n"
    assert f"(image attached to your next message: {picture})" in err and "(conversation cleared)" in err
    # the first turn is exactly `gemma3vl generate --prompt ... --image ...`
    inputs = build_inputs(runtime.processor, runtime.config, "What is it?", [image])
    tokens = generate(runtime.model, inputs["input_ids"], attention_mask=inputs["attention_mask"],
                      pixel_values=inputs["pixel_values"], sampling=greedy(runtime))[0]
    assert first == runtime.tokenizer.decode([t for t in tokens if t not in runtime.config.stop_token_ids],
                                             skip_special_tokens=True)


def test_system_prompt_and_images_apply_to_the_next_message_only(runtime, picture):
    session = ChatSession(runtime, greedy(runtime), system="Answer in one word.")
    out, notes = io.StringIO(), io.StringIO()
    script = f"/image {picture} {picture}\nCompare them\nNow without pictures\n"
    assert run_chat(session, io.StringIO(script), out, notes) == 0
    image = draw_picture("red circle")
    system = {"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]}
    first = reference(runtime, [system, user("Compare them", image, image)])
    second = reference(runtime, [system, user("Compare them", image, image), assistant(first),
                                 user("Now without pictures")])
    assert out.getvalue() == f"{first}\n{second}\n"
    assert [turn.role for turn in session.turns] == ["user", "assistant"] * 2
    assert len(session.turns[0].images) == 2 and session.turns[2].images == [] and session.pending_images == []


def test_answers_stream_in_pieces(runtime):
    pieces: list[str] = []
    completion = ChatSession(runtime, greedy(runtime, 12)).ask("Question number 0", on_text=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == completion.text == reference(runtime, [user("Question number 0")], 12)


def test_bad_commands_and_files_are_reported_and_the_chat_goes_on(runtime, tmp_path):
    not_image = tmp_path / "notes.txt"
    not_image.write_text("not a picture")
    out, notes = io.StringIO(), io.StringIO()
    script = f"/image {tmp_path / 'missing.png'}\n/image {not_image}\n/image\n/frobnicate\n/help\n//slash\n"
    assert run_chat(ChatSession(runtime, greedy(runtime)), io.StringIO(script), out, notes) == 0
    text = notes.getvalue()
    assert "missing.png: no such image file" in text and "notes.txt: not a readable image" in text
    assert "/image needs a file path" in text and "unknown command /frobnicate" in text and "/reset" in text
    assert out.getvalue() == reference(runtime, [user("/slash")]) + "\n"  # // sends a leading slash


class _InterruptOnFirstWrite(io.StringIO):
    def __init__(self):
        super().__init__()
        self.interrupted = False

    def write(self, text):
        if not self.interrupted and text:
            self.interrupted = True
            raise KeyboardInterrupt
        return super().write(text)


def test_an_interrupted_answer_is_not_kept_in_the_history(runtime):
    session = ChatSession(runtime, greedy(runtime, 12))
    out, notes = _InterruptOnFirstWrite(), io.StringIO()
    assert run_chat(session, io.StringIO("Question number 0\nHello there\n"), out, notes) == 0
    assert "interrupted" in notes.getvalue()
    assert [turn.text for turn in session.turns] == ["Hello there", reference(runtime, [user("Hello there")], 12)]


def test_text_only_checkpoint_chats_but_refuses_images(tmp_path, picture):
    text_runtime = InferenceRuntime.load(write_tiny_checkpoint(tmp_path / "text", text_only=True), device="cpu")
    out, notes = io.StringIO(), io.StringIO()
    assert run_chat(ChatSession(text_runtime, greedy(text_runtime)), io.StringIO(f"/image {picture}\nhi\n"), out,
                    notes) == 0
    assert "text-only" in notes.getvalue()
    assert out.getvalue() == reference(text_runtime, [{"role": "user", "content": "hi"}]) + "\n"


def test_compiled_chat_runs_every_turn_on_one_fixed_cache(runtime, picture, generate_calls):
    """compile=True (on the CPU generate runs it eagerly): every turn reuses one StaticKVCache of max_length
    positions, so a GPU compiles and captures the decode step once; the answers equal the plain session's."""
    script = f"/image {picture}\nWhat is it?\nAnd the colour?\n"
    answers = []
    for compiled in (False, True):
        session = ChatSession(runtime, greedy(runtime), compile=compiled, max_length=512)
        out = io.StringIO()
        assert run_chat(session, io.StringIO(script), out, io.StringIO()) == 0
        answers.append(out.getvalue())
    assert answers[0] == answers[1] and len(answers[0].splitlines()) == 2
    caches = [call["cache"] for call in generate_calls]
    assert caches[:2] == ["static", "static"]
    assert caches[2] is caches[3] and caches[2].max_length == 512


def test_compiled_chat_too_long_says_reset_and_a_compile_failure_decodes_eagerly(runtime, failing_compiler):
    notes: list[str] = []
    session = ChatSession(runtime, greedy(runtime), compile=True, max_length=40, notes=notes.append)
    with pytest.raises(Gemma3VLError, match=r"the compiled chat holds 40 \(--max-sequence-length\); /reset"):
        session.ask("a question long enough to fill forty positions of the cache " * 2)
    streamed: list[str] = []
    answer = session.ask("Hello there", on_text=streamed.append).text
    assert answer == reference(runtime, [user("Hello there")])  # short: the whole MAX_NEW_TOKENS fit in 40
    assert "".join(streamed) == answer
    assert notes == ["(--compile: compiling the decode step failed (RuntimeError: no triton); decoding eagerly "
                     "from now on)"]
    assert session.compile is False
    assert session.ask("And now?").text == reference(
        runtime, [user("Hello there"), assistant(answer), user("And now?")])
    assert failing_compiler == [1]  # the later turn never tried to compile


def test_chat_command_compile_flag_is_noted_on_cpu(model_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n"))
    assert main(["chat", str(model_dir), "--greedy", "--max-new-tokens", "3", "--device", "cpu", "--compile"]) == 0
    assert "--compile: ignored on cpu" in capsys.readouterr().err


def chat_script(session, script: str) -> tuple[str, str]:
    """Run ``script`` (lines) through ``run_chat``; (answers, notes)."""
    out, notes = io.StringIO(), io.StringIO()
    assert run_chat(session, io.StringIO(script), out, notes) == 0
    return out.getvalue(), notes.getvalue()


def test_commands_read_in_any_case_and_after_any_whitespace(runtime, picture):
    """/IMAGE, /Reset, /EXIT and a tab after the command used to be "unknown command" (and the chat went on
    past an /Exit)."""
    session = ChatSession(runtime, greedy(runtime))
    out, notes = chat_script(session, f"/IMAGE\t{picture}\n  /Image   {picture}  \n/Reset\n/image {picture}\n"
                                      "/EXIT now\nnever read\n")
    assert "unknown command" not in notes and out == ""
    assert notes.count("(image attached") == 3 and "(conversation cleared)" in notes
    assert len(session.pending_images) == 1 and session.turns == []


def test_image_paths_with_spaces_quotes_and_home(runtime, picture, tmp_path, monkeypatch):
    """A path typed as it is (spaces, a quote) used to be split into words (or "No closing quotation"); a quoted
    one, several quoted ones and ~ work too."""
    spaced, quoted = tmp_path / "my pic.png", tmp_path / "it's here.png"
    for path in (spaced, quoted):
        path.write_bytes(picture.read_bytes())
    monkeypatch.setenv("HOME", str(tmp_path))
    session = ChatSession(runtime, greedy(runtime))
    _, text = chat_script(session, f"/image {spaced}\n/image {quoted}\n/image '{spaced}' \"{quoted}\"\n"
                                   f"/image ~/my\\ pic.png\n/image 'unclosed {spaced}\n")
    assert text.count("(image attached") == 5 and len(session.pending_images) == 5, text
    assert f"(image attached to your next message: {spaced})" in text
    assert "No closing quotation (quote a path that holds spaces or quotes)" in text


def test_failed_commands_and_turns_keep_the_history_and_the_attached_images(runtime, picture, tmp_path):
    """A name too long for the file system used to end the chat with an OSError traceback; a failed /image or a
    failed turn keeps the images attached before (and says so), and the history as it was."""
    session = ChatSession(runtime, greedy(runtime))
    out, text = chat_script(session, f"Hello there\n/image {picture}\n/image {'x' * 5000}.png\n"
                                     f"/image {tmp_path / 'missing.png'}\n/image {tmp_path}\n/image\n"
                                     f"{'word ' * 3000}\n/frobnicate\nWhat is it?\n")
    assert "File name too long" in text and "missing.png: no such image file" in text
    assert f"{tmp_path}: a directory, not an image file" in text
    assert "the model's whole context (2048); /reset to start again; 1 image(s) still attached" in text
    first = reference(runtime, [user("Hello there")])
    image = draw_picture("red circle")
    second = reference(runtime, [user("Hello there"), assistant(first), user("What is it?", image)])
    assert out == f"{first}\n{second}\n"
    assert [turn.text for turn in session.turns] == ["Hello there", first, "What is it?", second]
    assert len(session.turns[2].images) == 1 and session.pending_images == []


def test_input_that_is_not_utf8_is_refused_line_by_line(runtime):
    """A line that is not UTF-8 used to end the chat with a UnicodeDecodeError (losing the lines read with it)."""
    session = ChatSession(runtime, greedy(runtime))
    out, notes = io.StringIO(), io.StringIO()
    script = io.TextIOWrapper(io.BytesIO(b"caf\xe9 ?\nHello there\n"), encoding="utf-8")
    assert run_chat(session, script, out, notes) == 0
    assert "not UTF-8 text; it was not sent" in notes.getvalue()
    assert out.getvalue() == reference(runtime, [user("Hello there")]) + "\n"
    assert [turn.text for turn in session.turns][0] == "Hello there"


class _Answers(ChatSession):
    """A session whose answer is fixed (the tiny model cannot be made to say what the test needs)."""

    def ask(self, text, on_text=None):
        on_text("caf\u00e9 \u2713")


def test_an_answer_the_output_cannot_encode_is_shown_replaced(runtime):
    """A terminal that is not UTF-8 used to end the chat with a UnicodeEncodeError mid-answer."""
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="ascii")
    notes = io.StringIO()
    assert run_chat(_Answers(runtime, greedy(runtime)), io.StringIO("Hi\nHi\n"), out, notes) == 0
    out.flush()
    assert raw.getvalue() == b"caf? ?\ncaf? ?\n" and notes.getvalue() == ""


def test_text_only_checkpoint_refuses_an_image_command_once(tmp_path, picture):
    text_runtime = InferenceRuntime.load(write_tiny_checkpoint(tmp_path / "text", text_only=True), device="cpu")
    session = ChatSession(text_runtime, greedy(text_runtime))
    _, notes = chat_script(session, f"/image {picture} {picture}\n")
    assert notes == "error: this is a text-only Gemma 3 checkpoint: it cannot take images\n"
    assert session.pending_images == []
