"""A :class:`Conversation` -> a :class:`Sample`: the processor's own token ids, plus loss labels.

The ids are what ``processor.apply_chat_template(messages, tokenize=True, return_dict=True)`` returns,
because that call *is* the encoding: the checkpoint's chat template, tokenizer, image expansion and pan & scan,
exactly as transformers (and our inference path, ``gemma3vl.infer.prompt``) uses them. Nothing is re-implemented.

Label rule. Loss is taken on the assistant's content tokens and its closing ``<end_of_turn>`` (as TRL's
assistant-only loss does), because ``<end_of_turn>`` is how the model learns to stop. Everything else is
``IGNORE``: ``<bos>``, the system text, user turns with their images (soft tokens, ``<start_of_image>``,
``<end_of_image>``), every ``<start_of_turn>model\\n`` header, and the ``"\\n"`` the template writes after
``<end_of_turn>`` — generation stops at ``<end_of_turn>`` (an eos id), so that newline is never produced by the
model and is scaffolding, like the header.

Finding the assistant spans. The template renders each turn as ``<start_of_turn>{role}\\n ... <end_of_turn>\\n``,
and both markers are special tokens that never come out of text (text containing their strings is refused
first). So the k-th ``<start_of_turn>`` / ``<end_of_turn>`` pair in the ids *is* the k-th rendered turn; the
count is checked against the conversation. An assistant span starts after the tokens of the ``"model\\n"``
header; if the tokenizer merged the header's last piece with the first content characters, that merged
token is trained on (it carries content), the header tokens before it are not.

Truncation. Special tokens also split the tokenizer's input, so the ids of a conversation's first k pairs are
exactly a prefix of the full ids (cut at the next ``<start_of_turn>``), and the pixels of a prefix are the first
rows of ``pixel_values`` (one row per image block, in order). "turns" keeps the longest such prefix that fits,
so an image block is never cut and no pixels are left over; "skip" refuses the sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gemma3vl.data.batch import IGNORE, Sample
from gemma3vl.data.images import ImageLoader
from gemma3vl.data.records import (
    ENCODING_FAILED,
    IMAGES_ON_TEXT_MODEL,
    SPECIAL_TOKEN_IN_TEXT,
    TOO_LONG,
    BadRecord,
    Conversation,
    ImageRef,
    Turn,
)
from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.prompt import pan_and_scan_settings, template_text, tokenizer_of
from gemma3vl.model.attention import image_block_ids

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
MODEL_HEADER = "model\n"  # what follows <start_of_turn> in an assistant turn ("assistant" renders as "model")
TRUNCATIONS = ("turns", "skip")


def control_strings(tokenizer: Any) -> list[str]:
    """Strings the tokenizer would turn into control tokens if they appeared in text (``<start_of_turn>``, its
    BOS / EOS / pad and image tokens)."""
    names = ("bos_token", "eos_token", "pad_token", "boi_token", "eoi_token", "image_token")
    return sorted({START_OF_TURN, END_OF_TURN} | {t for n in names if isinstance(t := getattr(tokenizer, n, None), str)})


def refuse_control_strings(turns: list[Turn], source: str, control: list[str]) -> None:
    """A :class:`BadRecord` (``special_token_in_text``) for a turn whose text holds one of ``control``: the same
    rule for training records and ``gemma3vl eval``'s rows."""
    for index, turn in enumerate(turns):
        # Each text as written, and the turn as the template renders it: text parts trimmed and
        # concatenated, so "<start_of_" + "turn>" in two parts is the control token the tokenizer sees.
        rendered = turn.content.strip() if isinstance(turn.content, str) else template_text(turn.content)
        for text in [*turn.texts(), rendered]:
            found = [token for token in control if token in text]
            if found:
                raise BadRecord(
                    source,
                    SPECIAL_TOKEN_IN_TEXT,
                    f"turn {index} ({turn.role}) contains {', '.join(found)} as text; the tokenizer would read "
                    "it as a control token",
                )


@dataclass
class EncodedConversation:
    """A whole conversation encoded, with where each user+assistant pair ends (the prefix lengths)."""

    sample: Sample
    pair_ends: list[int]


class ConversationEncoder:
    """Encodes conversations with one checkpoint's processor (VL) or tokenizer (text-only)."""

    def __init__(
        self,
        processor: Any,
        *,
        seq_length: int | None = None,
        truncation: str = "turns",
        pan_and_scan: bool | None = None,
        image_loader: ImageLoader | None = None,
    ):
        if truncation not in TRUNCATIONS:
            raise Gemma3VLError(f"truncation must be one of {', '.join(TRUNCATIONS)}, got {truncation!r}")
        self.processor = processor
        self.tokenizer = tokenizer_of(processor)
        self.is_vision_language = self.tokenizer is not processor
        self.seq_length = seq_length
        self.truncation = truncation
        self.image_loader = image_loader or ImageLoader()
        self.start_of_turn_id = self._token_id(START_OF_TURN)
        self.end_of_turn_id = self._token_id(END_OF_TURN)
        self.image_token_id: int | None = getattr(self.tokenizer, "image_token_id", None)
        self.pad_token_id: int = self.tokenizer.pad_token_id
        self.header_ids: list[int] = self.tokenizer.encode(MODEL_HEADER, add_special_tokens=False)
        self.processor_kwargs = pan_and_scan_settings(processor, pan_and_scan) if self.is_vision_language else {}
        self.control_strings = control_strings(self.tokenizer)

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if not isinstance(token_id, int) or token_id == self.tokenizer.unk_token_id:
            raise Gemma3VLError(f"the tokenizer has no {token} token: it is not a Gemma 3 chat tokenizer")
        return token_id

    def encode(self, conversation: Conversation) -> Sample:
        """The sample, fitted to ``seq_length`` (raises :class:`BadRecord` when it cannot be)."""
        return self.fit(self.encode_whole(conversation))[0]

    def messages(self, conversation: Conversation, images: list[Any]) -> list[dict[str, Any]]:
        """The conversation in transformers' chat format, image parts holding the given (opened) images."""
        fill = iter(images)
        out = []
        for turn in conversation.turns:
            if isinstance(turn.content, str):
                content: Any = turn.content
                if turn.role == "system" and not content and self.is_vision_language:
                    # An empty system prompt ("" + "\n\n" in Gemma's template). transformers' processor (5.24)
                    # swaps a falsy content for [] before rendering, and the template then fails on
                    # content[0]; the one-part list form renders exactly the text the string renders.
                    content = [{"type": "text", "text": ""}]
            else:
                content = [
                    {"type": "image", "image": next(fill)}
                    if isinstance(part, ImageRef)
                    else {"type": "text", "text": part}
                    for part in turn.content
                ]
            out.append({"role": turn.role, "content": content})
        return out

    def encode_whole(self, conversation: Conversation) -> EncodedConversation:
        """Ids, labels and pixels of the whole conversation, untruncated."""
        source = conversation.source
        refuse_control_strings(conversation.turns, source, self.control_strings)
        if conversation.images and not self.is_vision_language:
            raise BadRecord(source, IMAGES_ON_TEXT_MODEL, "the record has images but the checkpoint is text-only")
        images = [self.image_loader.load(ref, conversation.base_dir, source) for ref in conversation.images]
        kwargs = {"processor_kwargs": self.processor_kwargs} if images and self.processor_kwargs else {}
        try:
            encoded = self.processor.apply_chat_template(
                self.messages(conversation, images), tokenize=True, return_dict=True, return_tensors="pt", **kwargs
            )
        except Exception as exc:  # transformers raises many types; the record's line and the reason is what helps
            raise BadRecord(source, ENCODING_FAILED, f"the processor cannot encode it: {exc}") from None
        input_ids = encoded["input_ids"][0].long()
        pixel_values = encoded.get("pixel_values") if images else None
        if pixel_values is not None:
            pixel_values = pixel_values.float()
        labels, pair_ends = self._labels(input_ids, conversation)
        sample = Sample(input_ids=input_ids, labels=labels, pixel_values=pixel_values, source=source)
        blocks = self._image_blocks(input_ids)
        if blocks != sample.num_images:
            raise BadRecord(
                source, ENCODING_FAILED, f"{blocks} image block(s) in the ids but {sample.num_images} pixel row(s)"
            )
        return EncodedConversation(sample, pair_ends)

    def fit(self, encoded: EncodedConversation) -> tuple[Sample, bool]:
        """The sample within ``seq_length``, and whether trailing pairs were dropped."""
        sample = encoded.sample
        if self.seq_length is None or len(sample) <= self.seq_length:
            return sample, False
        fitting = [end for end in encoded.pair_ends if end <= self.seq_length]
        if self.truncation == "skip" or not fitting:
            first = encoded.pair_ends[0]
            why = (
                f"{len(sample)} tokens is over seq_length {self.seq_length} (truncation 'skip')"
                if self.truncation == "skip"
                else f"even its first user+assistant pair is {first} tokens, over seq_length {self.seq_length}"
            )
            raise BadRecord(sample.source, TOO_LONG, why)
        cut = fitting[-1]
        input_ids = sample.input_ids[:cut]
        rows = self._image_blocks(input_ids)
        pixel_values = None if sample.pixel_values is None or rows == 0 else sample.pixel_values[:rows]
        return Sample(input_ids, sample.labels[:cut], pixel_values, sample.source), True

    def _image_blocks(self, input_ids: torch.Tensor) -> int:
        if self.image_token_id is None or input_ids.numel() == 0:
            return 0
        return int(image_block_ids(input_ids[None], self.image_token_id).max()) + 1

    def _labels(self, input_ids: torch.Tensor, conversation: Conversation) -> tuple[torch.Tensor, list[int]]:
        source = conversation.source
        starts = (input_ids == self.start_of_turn_id).nonzero().flatten().tolist()
        ends = (input_ids == self.end_of_turn_id).nonzero().flatten().tolist()
        body = conversation.turns[1:] if conversation.has_system else conversation.turns
        ordered = all(s < e for s, e in zip(starts, ends)) and all(e < s for e, s in zip(ends, starts[1:]))
        if len(starts) != len(body) or len(ends) != len(body) or not ordered:
            raise BadRecord(
                source,
                ENCODING_FAILED,
                f"the encoded ids hold {len(starts)} {START_OF_TURN} and {len(ends)} {END_OF_TURN} for "
                f"{len(body)} rendered turns; the chat template is not Gemma 3's",
            )
        ids = input_ids.tolist()
        labels = torch.full_like(input_ids, IGNORE)
        for turn, start, end in zip(body, starts, ends):
            if turn.role != "assistant":
                continue
            first = start + 1
            for expected in self.header_ids:
                if first < end and ids[first] == expected:
                    first += 1
                else:
                    break
            labels[first : end + 1] = input_ids[first : end + 1]
        # A pair ends where the next user turn starts (its <start_of_turn>), or at the end of the ids.
        pair_ends = [starts[i] for i in range(2, len(starts), 2)] + [len(ids)]
        return labels, pair_ends
