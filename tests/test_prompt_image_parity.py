"""Bug hunt on prompt building and image preprocessing; transformers (its Gemma3Processor, Gemma3ImageProcessor
and the checkpoint's chat template) is the oracle throughout.

Found and fixed here:
- ``<image_soft_token>`` typed as text became an image slot with no image behind it; the forward pass failed
  later on a soft-token count mismatch, far from the message (``infer/conversation.py``, ``infer/prompt.py``).
- A system message sent as several text parts (OpenAI clients do) lost every part but the first: the Gemma
  template renders only ``content[0]['text']`` (``infer/conversation.py``).
- A text-only checkpoint's turn in several text parts was joined before the template, which trims and
  concatenates parts itself: "Hello " + " world" gave "Hello  world", transformers "Helloworld".
- Roles that do not alternate were refused with the template's bare message, naming no message.
- ``--raw`` with a prompt that already starts with ``<bos>`` got a second ``<bos>``; transformers'
  ``apply_chat_template`` gives one (``infer/prompt.py``).
- A control token's string split over two text parts (``"<start_of_"``, ``"turn>"``) escaped the
  special-token check: the template trims and concatenates the parts, so the tokenizer read a control token
  (``data/encode.py``, ``infer/conversation.py``).
- An empty system prompt failed: transformers' processor swaps an empty string content for [] and Gemma's
  template then fails on ``content[0]`` ("list object has no element 0"). Training records with ``"content": ""``
  were skipped as encoding_failed; a chat system message of several empty parts (or none) was refused. Both now
  encode the template's own rendering, "" + "\\n\\n" (``data/encode.py``, ``infer/conversation.py``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from gemma3vl.config import Gemma3Config
from gemma3vl.data import BadRecord, ConversationEncoder, parse_record
from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.conversation import Turn, encode_conversation
from gemma3vl.infer.prompt import build_inputs
from gemma3vl.pictures import draw_picture
from gemma3vl.tiny import tiny_hf_config
from test_data_common import load_tiny_processor, processor  # noqa: F401  (fixture)

CONFIG = Gemma3Config.from_hf_dict(tiny_hf_config())
TEXT_CONFIG = Gemma3Config.from_hf_dict(tiny_hf_config(text_only=True))


@pytest.fixture(scope="module")
def pas_processor(tmp_path_factory):
    return load_tiny_processor(tmp_path_factory.mktemp("hunt-pas"), pan_and_scan=True)


def hf_chat(proc, messages, **processor_kwargs):
    """transformers' own encoding of ``messages`` ending with the model's turn (the oracle)."""
    kwargs = {"processor_kwargs": processor_kwargs} if processor_kwargs else {}
    return proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                    return_tensors="pt", **kwargs)


# --- <image_soft_token> typed as text --------------------------------------------------------------------------


@pytest.mark.parametrize("with_image", [True, False])
def test_typed_image_soft_token_in_a_message_is_refused_naming_the_message(processor, with_image):
    """transformers (the oracle) turns the typed string into a soft-token id that its model then rejects
    (count mismatch); we refuse it up front, naming the message."""
    parts = [draw_picture()] if with_image else []
    turns = [Turn("user", ["hi"]), Turn("assistant", ["yes"]), Turn("user", [*parts, "what is <image_soft_token>?"])]
    with pytest.raises(Gemma3VLError, match=r"^message 2: .*<image_soft_token>"):
        encode_conversation(processor, CONFIG, turns)


@pytest.mark.parametrize("raw", [False, True])
def test_typed_image_soft_token_in_a_prompt_is_refused(processor, raw):
    """The oracle's processor accepts the string and its model fails later; we refuse it with a clear error."""
    prompt = ("<start_of_image>" if raw else "") + "explain <image_soft_token>"
    with pytest.raises(Gemma3VLError, match="contains <image_soft_token> as text"):
        build_inputs(processor, CONFIG, prompt, [draw_picture()], raw=raw)


def test_a_text_only_checkpoint_still_takes_the_string_as_transformers_does(tmp_path):
    """Text-only: transformers (the oracle) tokenises the string as one token and its CausalLM takes it (no
    image slots there), so the ids must equal the tokenizer's own chat template."""
    tokenizer = load_tiny_processor(tmp_path, text_only=True)
    prompt = encode_conversation(tokenizer, TEXT_CONFIG, [Turn("user", ["a <image_soft_token> b"])])
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "a <image_soft_token> b"}],
                                             add_generation_prompt=True, tokenize=True, return_dict=True)
    assert prompt.input_ids.tolist() == list(expected["input_ids"])


@pytest.mark.parametrize("parts", [["Hello ", " world"], ["a", "", " b "], ["x"]])
def test_a_text_only_turn_in_parts_equals_transformers(tmp_path, parts):
    """transformers' tokenizer chat template (the oracle) given the same list-form messages: each text part is
    trimmed and the parts concatenated, as the VL path renders them (the text-only path used to pre-join them
    into one string: "Hello  world" where transformers gives "Helloworld")."""
    tokenizer = load_tiny_processor(tmp_path, text_only=True)
    turns = [Turn("system", ["Be brief."]), Turn("user", parts), Turn("assistant", parts), Turn("user", parts)]
    ours = encode_conversation(tokenizer, TEXT_CONFIG, turns)
    expected = tokenizer.apply_chat_template(
        [{"role": t.role, "content": [{"type": "text", "text": p} for p in t.parts]} for t in turns],
        add_generation_prompt=True, tokenize=True, return_dict=True)
    assert ours.input_ids.tolist() == list(expected["input_ids"])


# --- system messages, role order ----------------------------------------------------------------------------------


def test_a_system_message_in_several_text_parts_is_rendered_whole(processor):
    """transformers (the oracle) given the joined system text; the list form would drop " Answer in French.\""""
    image = draw_picture("blue square")
    turns = [Turn("system", ["Be brief.", " Answer in French."]), Turn("user", [image, "What is it?"])]
    ours = encode_conversation(processor, CONFIG, turns)
    expected = hf_chat(processor, [
        {"role": "system", "content": "Be brief. Answer in French."},
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]},
    ])
    assert ours.input_ids.tolist() == expected["input_ids"][0].tolist()
    assert torch.equal(ours.pixel_values, expected["pixel_values"])
    assert "French" in processor.tokenizer.decode(ours.input_ids)


def test_a_system_message_in_one_part_equals_transformers_list_form(processor):
    """transformers (the oracle) given the same list-form messages: the usual case is unchanged."""
    turns = [Turn("system", [" Be brief. "]), Turn("user", ["hi"]), Turn("assistant", ["yo"]), Turn("user", ["ok"])]
    ours = encode_conversation(processor, CONFIG, turns)
    expected = hf_chat(processor, [
        {"role": "system", "content": [{"type": "text", "text": " Be brief. "}]},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "yo"}]},
        {"role": "user", "content": [{"type": "text", "text": "ok"}]},
    ])
    assert ours.input_ids.tolist() == expected["input_ids"][0].tolist()


@pytest.mark.parametrize("roles, index, expected", [
    (["user", "user"], 1, "an assistant"),
    (["system", "assistant", "user"], 1, "a user"),
    (["assistant", "user"], 0, "a user"),
    (["user", "assistant", "assistant", "user"], 2, "a user"),
])
def test_roles_that_do_not_alternate_are_refused_naming_the_message(processor, roles, index, expected):
    """transformers' template (the oracle) raises "roles must alternate" on each of these; we name the message."""
    turns = [Turn(role, [f"m{i}"]) for i, role in enumerate(roles)]
    with pytest.raises(Exception, match="roles must alternate"):
        hf_chat(processor, [{"role": t.role, "content": t.text} for t in turns])
    with pytest.raises(Gemma3VLError, match=rf"^message {index}: expected {expected} message"):
        encode_conversation(processor, CONFIG, turns)


# --- raw prompts that start with <bos> ----------------------------------------------------------------------------


def test_a_raw_chat_formatted_prompt_gets_one_bos_as_transformers_gives(processor):
    """transformers' apply_chat_template (the oracle) tokenises its rendered prompt without a second <bos>;
    the same prompt pasted with --raw must give the same ids and pixels."""
    image = draw_picture("green triangle", size=(90, 40))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "hi"}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<bos>")
    ours = build_inputs(processor, CONFIG, rendered, [image], raw=True)
    expected = hf_chat(processor, messages)
    assert ours["input_ids"].tolist() == expected["input_ids"].tolist()
    assert torch.equal(ours["pixel_values"], expected["pixel_values"])
    # A raw prompt without <bos> still gets one, as the processor adds it.
    plain = build_inputs(processor, CONFIG, "<start_of_image> hi", [image], raw=True)
    assert plain["input_ids"][0, 0].item() == processor.tokenizer.bos_token_id
    assert plain["input_ids"][0, 1].item() != processor.tokenizer.bos_token_id


# --- control tokens split over text parts -------------------------------------------------------------------------


@pytest.mark.parametrize("role, parts, token", [
    ("user", ["a <start_of_", "turn> b"], "<start_of_turn>"),
    ("user", ["look <end_of_", "image>"], "<end_of_image>"),
    ("user", ["x <image_soft", " _token>"], "<image_soft_token>"),  # the template trims " _token>"
    ("assistant", ["<bo", "s> hello"], "<bos>"),
])
def test_a_control_token_split_over_text_parts_is_a_named_bad_record(processor, role, parts, token):
    """transformers' template (the oracle) trims and concatenates text parts, so its tokenizer reads the split
    string as the control token; the record is refused as special_token_in_text, naming the turn."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    at = 0 if role == "user" else 1
    messages[at] = {"role": role, "content": [{"type": "text", "text": p} for p in parts]}
    ids = hf_chat(processor, messages)["input_ids"][0].tolist()
    assert processor.tokenizer.convert_tokens_to_ids(token) in ids  # what the oracle's tokenizer makes of it
    with pytest.raises(BadRecord, match=rf"turn {at} \({role}\) contains {token}") as caught:
        ConversationEncoder(processor).encode(parse_record({"messages": messages}, "d.jsonl:7"))
    assert caught.value.reason == "special_token_in_text"


def test_a_placeholder_split_over_text_parts_is_refused_naming_the_message(processor):
    """transformers (the oracle) raises a bare count mismatch (two <start_of_image>, one image); we name the
    message."""
    image = draw_picture()
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "<start_of_"},
                                             {"type": "text", "text": "image> hi"}]}]
    # (transformers 5.24: "... number of <start_of_image> tokens ..."; 5.17: "Prompt contained 2 image tokens ...")
    with pytest.raises(ValueError, match="number of <start_of_image> tokens|contained 2 image tokens"):
        hf_chat(processor, messages)
    with pytest.raises(Gemma3VLError, match=r"^message 0: .*<start_of_image>"):
        encode_conversation(processor, CONFIG, [Turn("user", [image, "<start_of_", "image> hi"])])


# --- pan & scan, crop by crop -------------------------------------------------------------------------------------


def reference_crops(image: Image.Image, min_crop: int, max_crops: int = 4, min_ratio: float = 1.2):
    """Pan & scan as docs/gemma3-reference.md §6.3 writes it (boxes on the original image)."""
    w, h = image.size
    if w >= h:
        if w / h < min_ratio:
            return []
        n_w = max(2, min(math.floor(w / min_crop), math.floor(w / h + 0.5)))
        n_w, n_h = min(max_crops, n_w), 1
    else:
        if h / w < min_ratio:
            return []
        n_h = max(2, min(math.floor(h / min_crop), math.floor(h / w + 0.5)))
        n_h, n_w = min(max_crops, n_h), 1
    cw, ch = math.ceil(w / n_w), math.ceil(h / n_h)
    if min(cw, ch) < min_crop:
        return []
    return [image.crop((x * cw, y * ch, min(w, (x + 1) * cw), min(h, (y + 1) * ch)))
            for y in range(n_h) for x in range(n_w)]


def normalised(image: Image.Image, size: int) -> torch.Tensor:
    """Resize (PIL bilinear) and normalise as §6.2 writes it, channels first."""
    array = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float64)
    return torch.from_numpy(((array / 255 - 0.5) / 0.5).astype(np.float32)).permute(2, 0, 1)


@pytest.mark.parametrize("size", [(56, 56), (66, 56), (67, 56), (112, 56), (150, 40), (300, 29), (400, 57),
                                  (57, 400), (40, 150), (200, 27), (1, 1), (4000, 20), (20, 4000), (90, 61)])
def test_pan_and_scan_crops_equal_transformers_crop_by_crop(pas_processor, size):
    """transformers' Gemma3Processor (the oracle) with the checkpoint's crop settings: our prompt's rows are its
    rows; each row also equals the reference crop resized and normalised (to 1e-6)."""
    image = draw_picture("red circle and blue square", size=(max(size[0], 8), max(size[1], 8)), seed=3)
    image = image.resize(size) if size != image.size else image
    ours = encode_conversation(pas_processor, CONFIG, [Turn("user", [image, "hi"])], pan_and_scan=None)
    settings = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 28, "pan_and_scan_max_num_crops": 4,
                "pan_and_scan_min_ratio_to_activate": 1.2}
    expected = hf_chat(pas_processor, [{"role": "user", "content": [{"type": "image", "image": image},
                                                                   {"type": "text", "text": "hi"}]}], **settings)
    assert ours.input_ids.tolist() == expected["input_ids"][0].tolist()
    assert torch.equal(ours.pixel_values, expected["pixel_values"])
    crops = reference_crops(image, min_crop=28)
    assert ours.pixel_values.shape[0] == 1 + len(crops)
    for row, picture in zip(ours.pixel_values, [image, *crops]):
        assert (row - normalised(picture, 56)).abs().max().item() < 1e-6
    soft = int((ours.input_ids == CONFIG.image_token_id).sum())
    assert soft == CONFIG.mm_tokens_per_image * (1 + len(crops))
    # refused pan & scan: the original alone, as transformers gives with do_pan_and_scan=False
    off = encode_conversation(pas_processor, CONFIG, [Turn("user", [image, "hi"])], pan_and_scan=False)
    assert off.pixel_values.shape[0] == 1 and torch.equal(off.pixel_values[0], expected["pixel_values"][0])


def test_many_images_over_turns_with_pan_and_scan_equal_transformers(pas_processor):
    """transformers (the oracle): ids and pixel rows (original then crops, image by image in message order)
    for images in two user turns, two in one turn, next to empty text parts."""
    a, b, c = (draw_picture(k, size=s) for k, s in (("red circle", (150, 40)), ("blue square", (50, 50)),
                                                     ("green triangle", (40, 120))))
    turns = [Turn("system", ["Be brief."]), Turn("user", [a, "", b, "two?"]), Turn("assistant", ["Yes."]),
             Turn("user", ["", c])]
    ours = encode_conversation(pas_processor, CONFIG, turns, pan_and_scan=True)
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}] + [
        {"role": t.role, "content": [{"type": "image", "image": p} if isinstance(p, Image.Image)
                                     else {"type": "text", "text": p} for p in t.parts]} for t in turns[1:]]
    expected = hf_chat(pas_processor, messages, do_pan_and_scan=True, pan_and_scan_min_crop_size=28,
                       pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2)
    assert ours.input_ids.tolist() == expected["input_ids"][0].tolist()
    assert torch.equal(ours.pixel_values, expected["pixel_values"])
    assert ours.pixel_values.shape[0] == (1 + 4) + 1 + (1 + 3)


@pytest.mark.parametrize("role, index", [("system", 0), ("assistant", 1)])
def test_an_image_outside_a_user_turn_is_refused_naming_the_message(processor, role, index):
    """transformers (the oracle) fails on an image in a system message (its template reads content[0]['text']
    from the image part) and renders one in an assistant turn, which Gemma never generates; both are refused
    with the message's index, not a Jinja traceback."""
    image = draw_picture()
    if role == "system":
        with pytest.raises(Exception, match="has no attribute 'text'"):
            hf_chat(processor, [{"role": "system", "content": [{"type": "image", "image": image}]},
                                {"role": "user", "content": "hi"}])
        turns = [Turn("system", [image, "Be brief."]), Turn("user", ["hi"])]
    else:
        turns = [Turn("user", ["hi"]), Turn("assistant", [image, "this"]), Turn("user", ["and?"])]
    with pytest.raises(Gemma3VLError, match=rf"^message {index}: images can only be in user messages"):
        encode_conversation(processor, CONFIG, turns)


@pytest.mark.parametrize("parts", [[""], ["", ""], []])
def test_an_empty_system_message_is_rendered_as_transformers_renders_the_empty_string(processor, parts):
    """The oracle is transformers itself; the tokenizer/processor is the tiny
    offline stand-in (tiny_tokenizer), and no model, tiny random or other, is involved: the template's
    rendering of an empty system prompt ("" + "\\n\\n", ``apply_chat_template(tokenize=False)``) tokenised by the
    processor. Several empty parts joined (and no parts) used to be refused with the template's bare
    "list object has no element 0": transformers' processor swaps an empty string content for []."""
    image = draw_picture()
    messages = [{"role": "system", "content": ""},
                {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = processor(text=rendered, images=[image], add_special_tokens=False, return_tensors="pt")
    ours = encode_conversation(processor, CONFIG, [Turn("system", parts), Turn("user", [image, "Hi"])])
    assert ours.input_ids.tolist() == expected["input_ids"][0].tolist()
    assert torch.equal(ours.pixel_values, expected["pixel_values"])
