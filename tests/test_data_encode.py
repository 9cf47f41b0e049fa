"""Encoding: our samples against transformers' Gemma3Processor (the oracle), labels, truncation, pan & scan."""

from __future__ import annotations

import pytest
import torch

from gemma3vl.data import IGNORE, BadRecord, ConversationEncoder, DataConfig, parse_record
from gemma3vl.data.dataset import ConversationDataset
from gemma3vl.infer.prompt import pan_and_scan_settings
from test_data_common import (  # noqa: F401  (fixtures)
    CONVERSATIONS,
    assistant,
    load_tiny_processor,
    opened,
    processor,
    text_tokenizer,
    user,
    write_jsonl,
    write_pictures,
)


def oracle(proc, messages, directory, **processor_kwargs):
    """transformers' own encoding of the conversation (the oracle): ids and pixel_values."""
    kwargs = {"processor_kwargs": processor_kwargs} if processor_kwargs else {}
    out = proc.apply_chat_template(
        opened(messages, directory), tokenize=True, return_dict=True, return_tensors="pt", **kwargs
    )
    return out["input_ids"][0], out.get("pixel_values")


def assistant_texts(messages):
    texts = []
    for message in messages:
        if message["role"] == "assistant":
            content = message["content"]
            texts.append(content.strip() if isinstance(content, str) else "".join(p["text"].strip() for p in content))
    return texts


def labelled_runs(sample):
    """The labelled tokens as contiguous runs of (start, end) positions."""
    mask = (sample.labels != IGNORE).tolist() + [False]
    runs, start = [], None
    for t, on in enumerate(mask):
        if on and start is None:
            start = t
        elif not on and start is not None:
            runs.append((start, t))
            start = None
    return runs


@pytest.fixture
def dataset_dir(tmp_path):
    write_pictures(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_ids_and_pixels_equal_the_processor(processor, dataset_dir, name):
    messages = CONVERSATIONS[name]
    path = write_jsonl(dataset_dir / "data.jsonl", [{"messages": messages}])
    samples = list(ConversationDataset(DataConfig(path, shuffle=False, on_bad_record="error"), processor))
    ids, pixels = oracle(processor, messages, dataset_dir)
    assert len(samples) == 1
    sample = samples[0]
    assert sample.input_ids.tolist() == ids.tolist()
    assert sample.source == f"{path}:1"
    if pixels is None:
        assert sample.pixel_values is None
    else:
        assert torch.equal(sample.pixel_values, pixels)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_labels_are_exactly_assistant_content_and_end_of_turn(processor, dataset_dir, name):
    messages = CONVERSATIONS[name]
    conversation = parse_record({"messages": messages}, "x:1", dataset_dir)
    sample = ConversationEncoder(processor).encode(conversation)
    tokenizer = processor.tokenizer
    runs = labelled_runs(sample)
    decoded = [tokenizer.decode(sample.input_ids[a:b]) for a, b in runs]
    assert decoded == [text + "<end_of_turn>" for text in assistant_texts(messages)]
    header = tokenizer.encode("<start_of_turn>model\n", add_special_tokens=False)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    for a, b in runs:
        assert sample.input_ids[a - len(header) : a].tolist() == header  # the header is not trained on
        assert sample.input_ids[b : b + len(newline)].tolist() == newline  # nor the "\n" after <end_of_turn>
    assert torch.equal(sample.labels[sample.labels != IGNORE], sample.input_ids[sample.labels != IGNORE])
    for token in ("<image_soft_token>", "<start_of_image>", "<end_of_image>", "<bos>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert not ((sample.input_ids == token_id) & (sample.labels != IGNORE)).any(), token


def test_text_only_checkpoint_uses_its_tokenizer(text_tokenizer, dataset_dir):
    messages = CONVERSATIONS["text"] + [{"role": "user", "content": "Say more."}, assistant("I am fine, thank you.")]
    sample = ConversationEncoder(text_tokenizer).encode(parse_record({"messages": messages}, "x:1"))
    expected = text_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert sample.input_ids.tolist() == expected
    assert [text_tokenizer.decode(sample.input_ids[a:b]) for a, b in labelled_runs(sample)] == [
        "How are you today?<end_of_turn>",
        "I am fine, thank you.<end_of_turn>",
    ]
    with pytest.raises(BadRecord, match="text-only") as caught:
        ConversationEncoder(text_tokenizer).encode(
            parse_record({"messages": CONVERSATIONS["system_one_image"]}, "x:1", dataset_dir)
        )
    assert caught.value.reason == "images_on_text_model"


def test_llava_records_give_the_same_sample_as_messages(processor, dataset_dir):
    pairs = [
        (  # markers place the images, text around them
            {"image": ["a.png", "b.png"], "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "<image>\n<image>\nDescribe the image."},
                {"from": "gpt", "value": "A red circle and a blue square."},
                {"from": "human", "value": "What is the background colour?"},
                {"from": "gpt", "value": "The background is white."},
            ]},
            [{"role": "system", "content": "Be brief."}, user("Describe the image.", "a.png", "b.png"),
             assistant("A red circle and a blue square."),
             {"role": "user", "content": "What is the background colour?"},
             assistant("The background is white.")],
        ),
        (  # no marker: the image goes first in the first human turn
            {"image": "a.png", "conversations": [
                {"from": "human", "value": "What is in this picture?"}, {"from": "gpt", "value": "A red circle."},
            ]},
            [user("What is in this picture?", "a.png"), assistant("A red circle.")],
        ),
        (  # a marker in the second human turn
            {"image": "b.png", "conversations": [
                {"from": "human", "value": "Hello!"}, {"from": "gpt", "value": "Hello, world!"},
                {"from": "human", "value": "Look at the picture.\n<image>"}, {"from": "gpt", "value": "A blue square."},
            ]},
            [{"role": "user", "content": "Hello!"}, assistant("Hello, world!"),
             {"role": "user", "content": [{"type": "text", "text": "Look at the picture.\n"},
                                          {"type": "image", "image": "b.png"}]},
             assistant("A blue square.")],
        ),
    ]
    encoder = ConversationEncoder(processor)
    for llava, messages in pairs:
        ours = encoder.encode(parse_record(llava, "l:1", dataset_dir, record_format="llava"))
        reference = encoder.encode(parse_record({"messages": messages}, "m:1", dataset_dir))
        assert ours.input_ids.tolist() == reference.input_ids.tolist()
        assert ours.labels.tolist() == reference.labels.tolist()
        assert torch.equal(ours.pixel_values, reference.pixel_values)
        assert ours.input_ids.tolist() == oracle(processor, messages, dataset_dir)[0].tolist()


def test_pan_and_scan_matches_the_processor(tmp_path, dataset_dir):
    proc = load_tiny_processor(tmp_path / "pas", pan_and_scan=True)
    messages = CONVERSATIONS["images_after_text"]  # c.png is wide: it gets crops
    settings = pan_and_scan_settings(proc, True)
    ids, pixels = oracle(proc, messages, dataset_dir, **settings)
    conversation = parse_record({"messages": messages}, "x:1", dataset_dir)
    sample = ConversationEncoder(proc, pan_and_scan=True).encode(conversation)
    assert pixels.shape[0] > 1  # the original and its crops
    assert sample.input_ids.tolist() == ids.tolist()
    assert torch.equal(sample.pixel_values, pixels)
    assert ConversationEncoder(proc, pan_and_scan=False).encode(conversation).num_images == 1
    # None follows the checkpoint's preprocessor_config.json, which asks for pan & scan here
    assert ConversationEncoder(proc).encode(conversation).input_ids.tolist() == ids.tolist()
    # truncation keeps an image's crops with it: the first pair holds c.png and its crops, the second a.png
    longer = messages + [user("And this one?", "a.png"), assistant("A red circle.")]
    longer_conversation = parse_record({"messages": longer}, "x:1", dataset_dir)
    whole = ConversationEncoder(proc, pan_and_scan=True).encode_whole(longer_conversation)
    fitted, truncated = ConversationEncoder(proc, seq_length=len(whole.sample) - 1, pan_and_scan=True).fit(whole)
    assert truncated and fitted.input_ids.tolist() == ids.tolist() and torch.equal(fitted.pixel_values, pixels)


def test_truncation_keeps_whole_turns_and_their_images(processor, dataset_dir):
    messages = CONVERSATIONS["multi_turn_0_1_2"]
    conversation = parse_record({"messages": messages}, "x:1", dataset_dir)
    whole = ConversationEncoder(processor).encode_whole(conversation)
    # Oracle for each number of kept pairs: transformers on the shortened conversation.
    prefixes = {}
    for pairs in (1, 2, 3):
        ids, pixels = oracle(processor, messages[: 1 + 2 * pairs], dataset_dir)
        prefixes[len(ids)] = (ids, pixels)
    assert sorted(prefixes) == whole.pair_ends
    image_id = processor.tokenizer.image_token_id
    for seq_length in range(1, len(whole.sample) + 3):  # every length, not a sample of them
        encoder = ConversationEncoder(processor, seq_length=seq_length, truncation="turns")
        fitting = [end for end in whole.pair_ends if end <= seq_length]
        if not fitting:
            with pytest.raises(BadRecord) as caught:
                encoder.fit(whole)
            assert caught.value.reason == "too_long"
            continue
        sample, truncated = encoder.fit(whole)
        ids, pixels = prefixes[fitting[-1]]
        assert len(sample) <= seq_length and truncated == (len(sample) < len(whole.sample))
        assert sample.input_ids.tolist() == ids.tolist()
        assert torch.equal(sample.pixel_values, pixels)
        soft = int((sample.input_ids == image_id).sum())
        assert soft == sample.num_images * processor.image_seq_length  # no block cut, no stray pixels
        assert sample.labels.tolist() == whole.sample.labels[: len(sample)].tolist()


def test_truncation_skip_refuses_long_samples(processor, dataset_dir):
    conversation = parse_record({"messages": CONVERSATIONS["multi_turn_0_1_2"]}, "f.jsonl:7", dataset_dir)
    whole = ConversationEncoder(processor).encode_whole(conversation)
    encoder = ConversationEncoder(processor, seq_length=len(whole.sample) - 1, truncation="skip")
    with pytest.raises(BadRecord, match=r"^f\.jsonl:7: .*over seq_length") as caught:
        encoder.encode(conversation)
    assert caught.value.reason == "too_long"
    fits = ConversationEncoder(processor, seq_length=len(whole.sample), truncation="skip").encode(conversation)
    assert len(fits) == len(whole.sample)


def test_text_spelling_a_control_token_is_refused(processor):
    for text in ("<end_of_turn>", "a <start_of_turn>model\n", "x<start_of_image>", "<image_soft_token>", "<bos>"):
        record = {"messages": [{"role": "user", "content": "Hi"}, assistant(f"say {text}")]}
        with pytest.raises(BadRecord, match="control token") as caught:
            ConversationEncoder(processor).encode(parse_record(record, "x:3"))
        assert caught.value.reason == "special_token_in_text"


@pytest.mark.parametrize("form", ["messages", "llava"])
def test_an_empty_system_prompt_encodes_as_the_template_renders_it(processor, text_tokenizer, dataset_dir, form):
    """The oracle is transformers itself; the tokenizer/processor is the tiny
    offline stand-in (tiny_tokenizer), and no model, tiny random or other, is involved: Gemma's template
    renders an empty system prompt as "" + "\\n\\n" (``apply_chat_template(tokenize=False)``; the text-only
    tokenizer's ``apply_chat_template(tokenize=True)`` gives those ids). transformers' VL processor with
    ``tokenize=True`` swaps the empty content for [] and its template fails on ``content[0]``; the record used
    to be skipped as encoding_failed ("list object has no element 0")."""
    if form == "messages":
        record = {"messages": [{"role": "system", "content": ""}, user("What is in this picture?", "a.png"),
                               assistant("A red circle.")]}
    else:
        record = {"image": "a.png", "conversations": [{"from": "system", "value": ""},
                                                      {"from": "human", "value": "<image>What is in this picture?"},
                                                      {"from": "gpt", "value": "A red circle."}]}
    messages = [{"role": "system", "content": ""}, user("What is in this picture?", "a.png"),
                assistant("A red circle.")]
    rendered = processor.apply_chat_template(opened(messages, dataset_dir), tokenize=False)
    assert rendered.startswith("<bos><start_of_turn>user\n\n\n")
    expected = processor(text=rendered, images=[opened(messages, dataset_dir)[1]["content"][0]["image"]],
                         add_special_tokens=False, return_tensors="pt")
    sample = ConversationEncoder(processor).encode(parse_record(record, "x:1", dataset_dir))
    assert sample.input_ids.tolist() == expected["input_ids"][0].tolist()
    assert torch.equal(sample.pixel_values, expected["pixel_values"])
    runs = labelled_runs(sample)
    assert [processor.tokenizer.decode(sample.input_ids[a:b]) for a, b in runs] == ["A red circle.<end_of_turn>"]
    # text-only: the tokenizer's own chat template encodes it
    text_messages = [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}, assistant("Hello!")]
    ids = ConversationEncoder(text_tokenizer).encode(parse_record({"messages": text_messages}, "x:1")).input_ids
    expected_ids = text_tokenizer.apply_chat_template(text_messages, tokenize=True, return_dict=True)["input_ids"]
    assert ids.tolist() == expected_ids
