"""A tiny Gemma 3 tokenizer + processor files, generated offline, that transformers loads like the real ones.

``gemma3vl demo`` and the tests need a complete HF checkpoint directory without the hub. The 262k-piece Gemma
SentencePiece model cannot be shipped, so this module trains a 512-piece stand-in with the same *shape*:

* BPE with ``byte_fallback`` (``<0x00>``..``<0xFF>`` pieces), spaces normalized to ``"▁"``, no pre-tokenizer
  split in practice, decoder ``Replace("▁", " ") -> ByteFallback -> Fuse`` — exactly the pipeline
  ``transformers.GemmaTokenizer`` rebuilds. NOTE: that class has its own ``__init__``, so transformers 5 keeps
  only ``vocab`` + ``merges`` (+ post-processor) from ``tokenizer.json`` and re-creates the normalizer,
  pre-tokenizer and decoder itself; a byte-level (GPT-2 style) BPE would therefore be silently mis-decoded.
* Special tokens at the ids of :data:`gemma3vl.tiny.TINY_SPECIAL_TOKENS` (``<pad>`` 0 .. ``<image_soft_token>`` 9).

Vocabulary layout (all ids < ``TINY_VOCAB_SIZE``): 0-9 specials, 10-265 the 256 byte pieces, then the
characters and merges learned from :data:`_CORPUS` (a few KB of English written for the demos and tests).

Training takes a few milliseconds and is deterministic, so the files are byte-identical on every run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE

from gemma3vl.errors import Gemma3VLError
from gemma3vl.tiny import TINY_SPECIAL_TOKENS, TINY_VOCAB_SIZE

BOS, EOS, PAD, UNK, MASK = "<bos>", "<eos>", "<pad>", "<unk>", "<mask>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
BOI, EOI, IMAGE_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
SPACE = "▁"  # U+2581, SentencePiece's visible space
BYTE_PIECES = [f"<0x{b:02X}>" for b in range(256)]

# The hub ``chat_template`` of google/gemma-3-*-it, character for character (reference §7; identical to
# ``_CHAT_TEMPLATE`` in transformers' convert_gemma3_weights.py).
CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

# Training text. It covers the prompts the demos and tests use (so they tokenize into a few pieces, not bytes),
# the chat-template scaffolding and the image-expansion text of Gemma3Processor. Anything else still
# encodes through the byte pieces.
_CORPUS = """\
<start_of_turn>user
What is in this picture?<end_of_turn>
<start_of_turn>model
There is a red circle in this picture. The circle is on a white background.<end_of_turn>
<start_of_turn>user
Describe the image.<end_of_turn>
<start_of_turn>model
The image shows a blue square and a green triangle.
The square is on the left and the triangle is on the right.<end_of_turn>
<start_of_turn>user
Be brief.

What is it?<end_of_turn>
<start_of_turn>model
A yellow star.<end_of_turn>
<start_of_turn>user
What colour is the circle? What shape is it? How many shapes are there?<end_of_turn>
<start_of_turn>model
The circle is red. It is a circle. There are two shapes: a red circle and a blue square.<end_of_turn>
Here is the original image and here are some crops to help you see better.
Here is the original image and here are some crops to help you see better.
Describe the image in one sentence. Describe the picture in detail. Please describe the image.
Look at the picture. Describe the image. Look at the image. Describe the picture. What do you see in this image?
What is in the image? What is in this picture? What is the colour of the square? Is there a circle?
Yes, there is a circle. No, there is no triangle. The picture is small and simple.
Colours: red, green, blue, yellow, orange, purple, pink, brown, black, white, gray, grey, cyan.
Shapes: circle, square, triangle, star, rectangle, line, dot, cross.
A red circle. A blue square. A green triangle. A yellow star. An orange circle. A purple square.
A black line on a white background. A pink dot next to a brown cross. A gray rectangle above a cyan circle.
The red circle is bigger than the blue square. The green triangle is smaller than the yellow star.
Numbers: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 20, 42, 100, 256, 896, 2025.
One, two, three, four, five, six, seven, eight, nine, ten.
The answer is 4. There are 3 shapes. It has 2 colours. Count from 1 to 9: 1 2 3 4 5 6 7 8 9.
Punctuation: a, b; c: d. e! f? (g) [h] {i} "j" 'k' - l / m + n = o * p & q % r # s @ t _ u ~ v
More punctuation: < w > x | y ^ z.
Hello, world! How are you today? I am fine, thank you. Please answer in one word.
You are a helpful assistant. Answer the question about the image. Think step by step.
The quick brown fox jumps over the lazy dog. A small model can still see a big red circle.
This is a test of the tiny tokenizer. It turns text into tokens and tokens back into text.
The user asks a question and the model gives an answer. The model looks at the image first.
In the picture, there is a circle on the left, a square in the middle and a triangle on the right.
Where is the circle? The circle is at the top. Where is the square? The square is at the bottom.
What is the background colour? The background is white. The shapes are red, green and blue.
Images are resized to a fixed size. Wide images can be cut into crops with pan and scan.
The first image shows a circle and the second image shows a square. Compare the two images.
What is the difference between these images? The first one is red and the second one is blue.
Write a short story about a red circle that wants to become a square.
Once upon a time, there was a little red circle. It lived in a picture with a blue square.
Every day the circle looked at the square and said: I would like to have corners too.
def add(a, b):
    return a + b

for i in range(10):
    print(i)

1. The first item.
2. The second item.
3. The third item.
- a red circle
- a blue square
- a green triangle
"""


class TinyTokenizerError(Gemma3VLError, ValueError):
    """A config id that disagrees with the tiny tokenizer (a ValueError, and a Gemma3VLError for the CLI)."""


def _training_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Word boundaries used only while learning merges.

    SentencePiece (as configured for Gemma) never merges across a space, splits digits and keeps newline runs
    as their own pieces. Training on these boundaries gives pieces like ``"▁circle"``, ``"\\n\\n"``; at encode
    time GemmaTokenizer runs BPE over the whole normalized text, and since no learned merge spans a boundary
    the result is the same segmentation.
    """
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(SPACE, behavior="merged_with_next"),
            pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated"),
            pre_tokenizers.Split(Regex(r"[^\w\s▁]"), behavior="isolated"),  # punctuation, one char each
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )


def build_tiny_tokenizer() -> Tokenizer:
    """Train and return the tiny Gemma-style tokenizer (deterministic: same JSON on every call).

    The result is the backend that ``tokenizer.json`` serializes: BPE + byte fallback, ``" " -> "▁"``
    normalizer, Gemma's (effectively no-op) ``Split(" ")`` pre-tokenizer, the SentencePiece decoder, a
    ``<bos> $A`` post-processor, and the ten special tokens as special added tokens.
    """
    specials = sorted(TINY_SPECIAL_TOKENS, key=TINY_SPECIAL_TOKENS.__getitem__)
    if [TINY_SPECIAL_TOKENS[t] for t in specials] != list(range(len(specials))):
        raise TinyTokenizerError(f"TINY_SPECIAL_TOKENS must use ids 0..{len(specials) - 1}: {TINY_SPECIAL_TOKENS}")

    # 1) Learn pieces on the text; byte pieces are added afterwards (giving them to the trainer as
    #    special_tokens would make decode() skip them and lose every non-corpus character).
    trainer_tok = Tokenizer(BPE(unk_token=UNK, fuse_unk=True, byte_fallback=True))
    trainer_tok.normalizer = normalizers.Replace(" ", SPACE)
    trainer_tok.pre_tokenizer = _training_pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE - len(BYTE_PIECES),
        min_frequency=2,
        special_tokens=specials,
        show_progress=False,
    )
    # One sequence, not one per line: the trainer must see the "\n\n" runs to learn them as pieces.
    trainer_tok.train_from_iterator([_CORPUS], trainer=trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    # Learned pieces in id order, without the specials (they come first with ids 0..9).
    pieces = [p for p, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]) if p not in TINY_SPECIAL_TOKENS]

    # 2) Final vocabulary: specials, bytes, learned pieces (real Gemma also has both the byte pieces and
    #    single-character pieces, so "a" and "<0x61>" coexisting is faithful).
    vocab = {tok: i for i, tok in enumerate(specials + BYTE_PIECES + pieces)}
    assert len(vocab) <= TINY_VOCAB_SIZE, len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=UNK, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    # What transformers.GemmaTokenizer installs: a Split on " " that, after normalization, never matches.
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    # Same template transformers builds for add_bos_token=True, add_eos_token=False.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0",
        pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, TINY_SPECIAL_TOKENS[BOS])],
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def _dump_json(path: Path, obj: Any) -> None:
    """Stable formatting (sorted keys, trailing newline) so the files are byte-identical across runs."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _as_id_list(value: Any, key: str) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
        return list(value)
    raise TinyTokenizerError(f"config {key} must be an int or a non-empty list of ints, got {value!r}")


def _check_ids(hf_config: dict[str, Any], vocab: dict[str, int], n_tokens: int) -> list[int]:
    """Check the config's token ids against the tokenizer; return the config's stop ids (eos list)."""
    is_vl = "vision_config" in hf_config
    text_cfg = hf_config.get("text_config", {}) if is_vl else hf_config
    vocab_size = text_cfg.get("vocab_size")
    if not isinstance(vocab_size, int) or vocab_size < n_tokens:
        raise TinyTokenizerError(
            f"text vocab_size {vocab_size!r} must be an int >= the tiny tokenizer's {n_tokens} tokens"
        )
    if is_vl:
        for key, token in (("boi_token_index", BOI), ("eoi_token_index", EOI), ("image_token_index", IMAGE_TOKEN)):
            if key not in hf_config:
                raise TinyTokenizerError(f"config has no {key} (expected {vocab[token]}, the id of {token})")
            if hf_config[key] != vocab[token]:
                raise TinyTokenizerError(
                    f"config {key}={hf_config[key]!r} but the tiny tokenizer has {token} at id {vocab[token]}"
                )
    eos_key = "eos_token_id"
    raw_eos = hf_config.get(eos_key, text_cfg.get(eos_key))
    if raw_eos is None:
        raise TinyTokenizerError(f"config has no {eos_key} (expected [{vocab[EOS]}, {vocab[END_OF_TURN]}])")
    eos = _as_id_list(raw_eos, eos_key)
    allowed = {vocab[EOS]: EOS, vocab[END_OF_TURN]: END_OF_TURN}
    if vocab[EOS] not in eos or any(i not in allowed for i in eos):
        raise TinyTokenizerError(
            f"config {eos_key}={raw_eos!r}: must contain {vocab[EOS]} ({EOS}) and otherwise only "
            f"{vocab[END_OF_TURN]} ({END_OF_TURN}), the tiny tokenizer's stop tokens"
        )
    for key, token in (("bos_token_id", BOS), ("pad_token_id", PAD)):
        value = text_cfg.get(key, hf_config.get(key))
        if value is not None and value != vocab[token]:
            raise TinyTokenizerError(f"config {key}={value!r} but the tiny tokenizer has {token} at id {vocab[token]}")
    return eos


def write_tokenizer_and_processor(
    out_dir: str | Path, hf_config: dict[str, Any], *, pan_and_scan: bool = False
) -> list[Path]:
    """Write the tokenizer and (for a VL config) processor files of a tiny checkpoint into ``out_dir``.

    ``hf_config`` is the checkpoint's ``config.json`` dict (e.g. :func:`gemma3vl.tiny.tiny_hf_config`); its
    token ids must match the tokenizer, otherwise :class:`TinyTokenizerError` (a ``ValueError``) is raised.
    The files follow google/gemma-3-4b-it as transformers 5.24 reads them: ``tokenizer.json``,
    ``tokenizer_config.json`` (``GemmaTokenizer``), ``special_tokens_map.json``, ``chat_template.jinja``,
    ``generation_config.json`` and, when ``hf_config`` has a ``vision_config``, ``processor_config.json``
    and ``preprocessor_config.json`` (a text-only config gets none, like gemma-3-1b-it).
    ``pan_and_scan`` sets ``do_pan_and_scan`` (the hub leaves it null = off); the crop limits are scaled to
    the tiny image size so that wide pictures do get crops. Returns the paths written.

    NOTE: transformers 5.24's ``Gemma3Processor`` passes its class defaults (pan & scan off, 256-px minimum
    crop, 4 crops, ratio 1.2) to the image processor on every call, so the pan & scan values in
    ``preprocessor_config.json`` only act when the image processor is called on its own. Through the
    processor, pass ``do_pan_and_scan=True`` (and ``pan_and_scan_min_crop_size`` for pictures under ~512 px).
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise TinyTokenizerError(f"output directory {out} does not exist")

    tok = build_tiny_tokenizer()
    vocab = tok.get_vocab(with_added_tokens=True)
    eos = _check_ids(hf_config, vocab, tok.get_vocab_size(with_added_tokens=True))
    is_vl = "vision_config" in hf_config
    text_cfg = hf_config["text_config"] if is_vl else hf_config
    written: list[Path] = []

    def dump(name: str, obj: Any) -> None:
        _dump_json(out / name, obj)
        written.append(out / name)

    (out / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    written.append(out / "tokenizer.json")

    def added(token: str) -> dict[str, Any]:
        return {"content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    # Image tokens travel as "extra_special_tokens" (a dict in transformers 5: it becomes the tokenizer
    # attributes boi_token / eoi_token / image_token and their *_id, which Gemma3Processor reads).
    # The hub file also repeats them as top-level keys; we do the same.
    image_tokens = {"boi_token": BOI, "eoi_token": EOI, "image_token": IMAGE_TOKEN}
    tokenizer_config: dict[str, Any] = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(vocab[t]): {**added(t), "special": True} for t in TINY_SPECIAL_TOKENS},
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "model_max_length": int(text_cfg.get("max_position_embeddings", 131072)),
        "pad_token": PAD,
        "padding_side": "left",
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": UNK,
        "use_default_system_prompt": False,
    }
    special_tokens_map: dict[str, Any] = {"bos_token": added(BOS), "eos_token": added(EOS),
                                          "pad_token": added(PAD), "unk_token": added(UNK)}
    if is_vl:
        tokenizer_config.update(image_tokens, extra_special_tokens=dict(image_tokens),
                                processor_class="Gemma3Processor")
        special_tokens_map.update(image_tokens)
    dump("tokenizer_config.json", tokenizer_config)
    dump("special_tokens_map.json", special_tokens_map)

    # transformers 5 reads the template from chat_template.jinja (tokenizer and processor alike).
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    written.append(out / "chat_template.jinja")

    dump("generation_config.json", {
        "bos_token_id": vocab[BOS],
        "cache_implementation": "hybrid",  # as the hub; transformers 5.24 maps it to a DynamicCache
        "do_sample": True,
        "eos_token_id": eos,
        "pad_token_id": vocab[PAD],
        "top_k": 64,
        "top_p": 0.95,
    })

    if is_vl:
        image_size = int(hf_config["vision_config"]["image_size"])
        mm_tokens = int(hf_config["mm_tokens_per_image"])
        dump("processor_config.json", {"image_seq_length": mm_tokens, "processor_class": "Gemma3Processor"})
        dump("preprocessor_config.json", {
            "do_convert_rgb": None,
            "do_normalize": True,
            "do_pan_and_scan": True if pan_and_scan else None,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "Gemma3ImageProcessor",
            "image_seq_length": mm_tokens,
            "image_std": [0.5, 0.5, 0.5],
            # The hub leaves these null (-> 256 / 4 / 1.2 for 896-px images). 256 px would forbid every crop of
            # a small test picture, so the minimum crop is half the tiny image size (28 px for 56). Read by the
            # image processor; Gemma3Processor overrides them with its own defaults (see the docstring).
            "pan_and_scan_max_num_crops": 4,
            "pan_and_scan_min_crop_size": max(1, image_size // 2),
            "pan_and_scan_min_ratio_to_activate": 1.2,
            "processor_class": "Gemma3Processor",
            "resample": 2,  # PIL bilinear
            "rescale_factor": 1 / 255,
            "size": {"height": image_size, "width": image_size},
        })
    return written
