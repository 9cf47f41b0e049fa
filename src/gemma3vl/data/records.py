"""The conversation schema: raw JSON-like records -> validated :class:`Conversation` objects.

Three record shapes are accepted (one JSON object each)::

    {"messages": [{"role": "system" | "user" | "assistant",
                   "content": "text" | [{"type": "image", "image": "a.png"}, {"type": "text", "text": "..."}]}]}

    {"image": "a.jpg" | ["a.jpg", "b.jpg"],               # LLaVA
     "conversations": [{"from": "human" | "gpt" | "system", "value": "<image>\\n..."}]}

    {"images": ["a.jpg", ...],                            # HuggingFaceM4/the_cauldron, FineVision
     "texts": [{"user": "Question ...", "assistant": "Answer ...", "source": "..."}]}

LLaVA speakers may also be ``user`` / ``assistant`` / ``model`` (Gemma's name for the assistant; a
``messages`` role may be ``model`` too). ShareGPT records whose ``conversations`` entries say ``role`` /
``content`` are LLaVA records when every content is a string (``<image>`` markers place the images) and
``messages`` records when a content is a list of parts. A top-level image that is ``null``, ``""`` or ``[]``
is no image.

An image is a path relative to the record's file, a ``data:image/...;base64,`` URL, or an ``http(s)`` URL
(fetched only when allowed). An image part may name it under ``"url"`` or ``"path"`` instead (transformers'
chat format), or be OpenAI's ``{"type": "image_url", "image_url": {"url": ...}}``. Image parts may instead
leave out ``"image"`` and take their images, in order, from a top-level ``"images": [...]`` list (the TRL /
Hugging Face datasets layout; ``"image"`` is accepted too, never both) — all of them or none.
LLaVA ``<image>`` markers place the images; without markers the images open the first human turn.
A ``messages`` record may hold function calling, as OpenAI's chat requests and transformers' chat-template
convention write it: a top-level ``"tools"`` (a list of ``{"type": "function", "function": {"name", "description",
"parameters"}}``, bare function objects, or that list's JSON text), assistant messages with ``"tool_calls"``
(``[{"id", "type": "function", "function": {"name", "arguments"}}]``; ``arguments`` a JSON object or its text; ``id``
optional; ``content`` may then be null or left out) and ``"tool"`` messages (the result as content; ``tool_call_id``
optional: the first call not yet answered). They are written as plain turns exactly as the server writes them
(:mod:`gemma3vl.infer.tool_calls`: functions in the system message, calls as ``[name(key=value)]`` in the assistant
turn, which is trained on, results in a user turn), so a model fine-tuned on them is served the prompt it learned.
A ``texts`` entry is one user turn then one assistant turn (no system turn; keys other than ``user`` and
``assistant`` are ignored); it is read as the LLaVA record with a ``human`` and a ``gpt`` entry per ``texts``
entry, so its images (``images`` or ``image``) follow the LLaVA rules above. A record holding two of ``messages``,
``conversations`` and ``texts`` is refused (a key whose value is null is a key the record lacks).

Everything the Gemma chat template would choke on, or silently render differently from what the record
says, is refused here with the record's ``file:line``: unknown roles, roles that do not alternate
user/assistant after an optional system message, no assistant turn, a trailing user turn (nothing to learn
from), images in system or assistant turns (the template drops the former; Gemma never generates images),
image counts that do not match their placeholders. The parser never touches the disk or the tokenizer:
images stay :class:`ImageRef` s until the encoder loads them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.tool_calls import Message, ToolError, ToolUse, converse, involves_tools, parse_history_calls, \
    parse_tools

ROLES = ("system", "user", "assistant")
# "model" is Gemma's own name for the assistant; its chat template renders "model" and "assistant" alike.
ROLE_ALIASES = {"model": "assistant"}
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant",
               "model": "assistant"}
LLAVA_IMAGE_MARKER = "<image>"


class BadRecord(Gemma3VLError):
    """One record that cannot be trained on. ``reason`` is a short key counted in the summary."""

    def __init__(self, source: str, reason: str, detail: str):
        super().__init__(f"{source}: {detail}" if source else detail)
        self.source = source
        self.reason = reason
        self.detail = detail


# Reasons a record is skipped (the keys of the summary's counts).
INVALID_JSON = "invalid_json"
INVALID_SCHEMA = "invalid_schema"
UNKNOWN_ROLE = "unknown_role"
ROLE_ORDER = "role_order"
NO_ASSISTANT_TURN = "no_assistant_turn"
IMAGE_COUNT_MISMATCH = "image_count_mismatch"
SPECIAL_TOKEN_IN_TEXT = "special_token_in_text"
UNREADABLE_IMAGE = "unreadable_image"
IMAGE_OUTSIDE_DATASET = "image_outside_dataset"
REMOTE_IMAGE_REFUSED = "remote_image_refused"
TOO_LONG = "too_long"
IMAGES_ON_TEXT_MODEL = "images_on_text_model"
ENCODING_FAILED = "encoding_failed"


@dataclass(frozen=True)
class ImageRef:
    """Where an image comes from, not yet opened.

    ``source`` is a path (relative to the record's file), a ``data:`` URL or an ``http(s)`` URL; records from a
    Hugging Face dataset may also hold the decoded ``PIL.Image``, raw ``bytes`` or a ``{"bytes", "path"}`` dict.
    """

    source: Any


# A content part: text or an image.
Part = Union[str, ImageRef]


@dataclass
class Turn:
    """One message. ``content`` keeps the record's own form (a string, or a list of parts) because the chat
    template renders both, and the encoder must hand the processor what the record said."""

    role: str  # "system" | "user" | "assistant"
    content: str | list[Part]

    @property
    def images(self) -> list[ImageRef]:
        return [] if isinstance(self.content, str) else [p for p in self.content if isinstance(p, ImageRef)]

    def texts(self) -> list[str]:
        return [self.content] if isinstance(self.content, str) else [p for p in self.content if isinstance(p, str)]


@dataclass
class Conversation:
    """A validated conversation: an optional system turn, then user/assistant pairs, ending with the assistant."""

    turns: list[Turn]
    source: str = ""  # "file:line", for messages
    base_dir: Path | None = None  # where relative image paths start
    images: list[ImageRef] = field(init=False)

    def __post_init__(self) -> None:
        self.images = [image for turn in self.turns for image in turn.images]

    @property
    def has_system(self) -> bool:
        return bool(self.turns) and self.turns[0].role == "system"


def parse_json_line(text: str, source: str) -> Any:
    """``json.loads`` with every failure turned into a :class:`BadRecord` naming ``source``."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, over-long integers, absurd nesting
        raise BadRecord(source, INVALID_JSON, f"not valid JSON: {exc}") from None


def parse_record(
    record: Any, source: str = "", base_dir: Path | None = None, *, record_format: str = "auto"
) -> Conversation:
    """Validate one record (``record_format`` "auto", "messages", "llava" or "texts") into a :class:`Conversation`."""
    if not isinstance(record, dict):
        raise BadRecord(source, INVALID_SCHEMA, f"a record must be a JSON object, got {_kind(record)}")
    if record_format == "auto":
        record_format = _detect_format(record, source)
    if record.get("tools") not in (None, [], "") and record_format != "messages":
        raise BadRecord(source, INVALID_SCHEMA, f"'tools' is read only in 'messages' records, not {record_format} ones")
    if record_format == "messages":
        turns = _messages_turns(record, source)
    elif record_format == "llava":
        turns = _llava_turns(record, source)
    elif record_format == "texts":
        turns = _texts_turns(record, source)
    else:
        raise Gemma3VLError(f"unknown record format {record_format!r} (choose auto, messages, llava or texts)")
    _check_roles(turns, source)
    return Conversation(turns, source, base_dir)


# The key that tells each record shape (parse_record's record_format -> key).
FORMAT_KEYS = {"messages": "messages", "llava": "conversations", "texts": "texts"}


def _detect_format(record: dict, source: str) -> str:
    """The record's shape, told by its key. A record holding two of the keys is refused, naming them: it would
    otherwise be read as one shape with the other's turns silently left out. A key whose value is null is a key
    the record lacks (a table's row has every column), unless every one of them is null."""
    present = [key for key in FORMAT_KEYS.values() if key in record]
    given = [key for key in present if record[key] is not None] or present
    if len(given) > 1:
        named = ", ".join(map(repr, given[:-1])) + f" and {given[-1]!r}"
        raise BadRecord(source, INVALID_SCHEMA, f"the record has {'both ' if len(given) == 2 else ''}{named}; give "
                                                "only one of 'messages', 'conversations' or 'texts'")
    for record_format, key in FORMAT_KEYS.items():
        if key in given:
            return record_format
    keys = ", ".join(sorted(map(str, record))) or "none"
    raise BadRecord(
        source,
        INVALID_SCHEMA,
        f"a record needs 'messages' (or LLaVA 'conversations', or the_cauldron / FineVision 'texts'); its keys: {keys}",
    )


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _messages_turns(
    record: dict, source: str, *, key: str = "messages", aliases: dict[str, str] = ROLE_ALIASES
) -> list[Turn]:
    """``record["messages"]`` as turns; ``key`` names the list in error messages (ShareGPT records keep it under
    "conversations"), ``aliases`` maps other role names onto :data:`ROLES`."""
    if "messages" not in record:
        raise BadRecord(source, INVALID_SCHEMA, "a messages record needs 'messages'")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise BadRecord(source, INVALID_SCHEMA, f"'messages' must be a non-empty list, got {_kind(messages)}")
    shared_images, images_key = _record_images(record, source)
    known = list(dict.fromkeys([*ROLES, *aliases, TOOL_ROLE]))
    turns = []
    tool_fields = []  # each message's tool calls, the call a tool message answers, and where the message is
    for index, message in enumerate(messages):
        where = f"{key}[{index}]"
        if not isinstance(message, dict):
            raise BadRecord(source, INVALID_SCHEMA, f"{where} must be an object, got {_kind(message)}")
        role = message.get("role")
        calls, answers = _tool_fields(message, role, source, where)
        if "role" not in message or ("content" not in message and not calls):
            raise BadRecord(source, INVALID_SCHEMA, f"{where} needs 'role' and 'content'")
        if not isinstance(role, str) or (role not in ROLES and role not in aliases and role != TOOL_ROLE):
            raise BadRecord(source, UNKNOWN_ROLE, f"{where} has role {role!r}; roles are {', '.join(known)}")
        content = message.get("content")
        turn = Turn(aliases.get(role, role), [] if content is None and calls else _content(content, source, where))
        if role == TOOL_ROLE and turn.images:
            raise BadRecord(source, INVALID_SCHEMA,
                            f"{where}: a tool message's result is text; images go in user turns")
        turns.append(turn)
        tool_fields.append((calls, answers, where))
    _fill_shared_images(turns, shared_images, source, images_key)  # (it gives the turns new content lists)
    written = [Message(turn.role, turn.content if isinstance(turn.content, list) else [turn.content], calls, answers,
                       param=where) for turn, (calls, answers, where) in zip(turns, tool_fields)]
    tools = _record_tools(record, source)
    if not involves_tools(written, tools):
        return turns
    try:
        plain = converse(written, tools)
    except ToolError as exc:
        raise BadRecord(source, ROLE_ORDER, str(exc)) from None
    return [Turn(m.role, m.parts[0] if len(m.parts) == 1 and isinstance(m.parts[0], str) else m.parts)
            for m in plain]


TOOL_ROLE = "tool"


def _tool_fields(message: dict, role: Any, source: str, where: str) -> tuple[tuple, str | None]:
    """An assistant message's ``tool_calls`` and a tool message's ``tool_call_id`` (None: not given)."""
    calls: tuple = ()
    if role not in ("assistant", *ROLE_ALIASES) and message.get("tool_calls") not in (None, []):
        raise BadRecord(source, INVALID_SCHEMA, f"{where} has 'tool_calls', but only assistant messages make calls")
    if message.get("tool_calls") not in (None, []):
        try:
            calls = parse_history_calls(message["tool_calls"], f"{where}.tool_calls", need_ids=False)
        except ToolError as exc:
            raise BadRecord(source, INVALID_SCHEMA, str(exc)) from None
    call_id = message.get("tool_call_id") if role == TOOL_ROLE else None
    if call_id is not None and not (isinstance(call_id, str) and call_id):
        raise BadRecord(source, INVALID_SCHEMA, f"{where}.tool_call_id must be a non-empty string")
    return calls, call_id


def _record_tools(record: dict, source: str) -> ToolUse | None:
    """The record's ``tools`` (None: none): OpenAI's list, bare function objects, or the list's JSON text."""
    value = record.get("tools")
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise BadRecord(source, INVALID_SCHEMA, f"'tools' is a string but not JSON: {exc}") from None
    if not value:
        return None
    if isinstance(value, list):
        value = [{"type": "function", "function": entry} if isinstance(entry, dict) and "type" not in entry
                 and "name" in entry else entry for entry in value]
    try:
        return ToolUse(tools=parse_tools(value))
    except ToolError as exc:
        raise BadRecord(source, INVALID_SCHEMA, str(exc)) from None


def _content(content: Any, source: str, where: str) -> str | list[Part]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRecord(
            source, INVALID_SCHEMA, f"{where}.content must be a string or a list of parts, got {_kind(content)}"
        )
    parts: list[Part] = []
    for index, item in enumerate(content):
        at = f"{where}.content[{index}]"
        if not isinstance(item, dict):
            raise BadRecord(source, INVALID_SCHEMA, f"{at} must be an object, got {_kind(item)}")
        kind = item.get("type")
        if kind == "text":
            text = item.get("text")
            if not isinstance(text, str):
                keys = ", ".join(sorted(map(str, item)))
                raise BadRecord(
                    source,
                    INVALID_SCHEMA,
                    f"{at} is a text part whose 'text' is {_kind(text)} (its keys: {keys}); a text part is "
                    '{"type": "text", "text": "..."}',
                )
            parts.append(text)
        elif kind in ("image", "image_url"):
            image, key = _part_image(item, kind)
            # None: the image comes from the record's "images" list (TRL / HF datasets convention).
            if (image is None and kind == "image_url") or (image is not None and not _is_image_source(image)):
                raise BadRecord(
                    source, INVALID_SCHEMA, f"{at}: {key} must be a path or URL string, got {_kind(image)}"
                )
            parts.append(ImageRef(image))
        else:
            raise BadRecord(
                source, INVALID_SCHEMA, f"{at} has type {kind!r}; parts are 'text', 'image' (or 'image_url')"
            )
    return parts


def _part_image(item: dict, kind: str) -> tuple[Any, str]:
    """An image part's source and the key it came from: ``{"type": "image", "image" | "url" | "path": ...}``
    (transformers' chat format) or OpenAI's ``{"type": "image_url", "image_url": {"url": ...}}``."""
    if kind == "image_url":
        value = item.get("image_url")
        if isinstance(value, dict):
            return value.get("url"), "'image_url.url'"
        return value, "'image_url'"
    for key in ("image", "url", "path"):
        if item.get(key) is not None:
            return item[key], repr(key)
    return None, "'image'"


def _is_image_source(value: Any) -> bool:
    """Strings for JSON records; decoded images, bytes and {"bytes", "path"} dicts come from HF datasets."""
    if isinstance(value, (str, bytes)):
        return True
    if isinstance(value, dict):
        return isinstance(value.get("bytes"), bytes) or isinstance(value.get("path"), str)
    return type(value).__module__.startswith("PIL.")


def _record_images(record: dict, source: str) -> tuple[list[Any] | None, str]:
    """The record's top-level images: ``"images"`` (TRL, LLaMA-Factory) or ``"image"`` (LLaVA, HF datasets
    with one image column), a list or one value; never both, so no image is silently left out. With the key they
    came from (``images`` when none)."""
    # null, "" and [] hold no image (LLaVA exports write "image": "" on text-only records).
    given = [key for key in ("image", "images") if not _no_image(record.get(key))]
    if len(given) > 1:
        raise BadRecord(source, INVALID_SCHEMA, "the record has both 'image' and 'images'; give one list of images")
    return (_image_list(record[given[0]], source, given[0]), given[0]) if given else (None, "images")


def _no_image(value: Any) -> bool:
    return value is None or (isinstance(value, (str, list)) and not value)


def _image_list(value: Any, source: str, key: str) -> list[Any] | None:
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    for index, item in enumerate(values):
        if isinstance(item, str) and not item and isinstance(value, list):
            raise BadRecord(
                source, INVALID_SCHEMA, f"'{key}'[{index}] is an empty string; leave it out of the list"
            )
        if not _is_image_source(item):
            raise BadRecord(
                source, INVALID_SCHEMA, f"'{key}'[{index}] must be an image path or URL string, got {_kind(item)}"
            )
    return values


def _fill_shared_images(turns: list[Turn], shared: list[Any] | None, source: str, key: str = "images") -> None:
    """Image parts without their own source take the record's ``images`` (or ``image``: ``key``, as errors name
    it) in order; it is all or nothing."""
    refs = [image for turn in turns for image in turn.images]
    open_slots = sum(ref.source is None for ref in refs)
    if shared is None:
        if open_slots:
            raise BadRecord(
                source,
                IMAGE_COUNT_MISMATCH,
                f"{open_slots} image part(s) name no image and the record has no 'images' list (or an empty one)",
            )
        return
    if open_slots != len(refs):
        raise BadRecord(
            source, IMAGE_COUNT_MISMATCH, f"image parts must either all name their image or all take them from '{key}'"
        )
    if len(shared) != open_slots:
        markers = any(isinstance(turn.content, str) and "<image>" in turn.content for turn in turns)
        hint = ("; an '<image>' marker in the text places an image only in a LLaVA 'conversations' record: in "
                "'messages', give {\"type\": \"image\"} parts") if markers else ""
        raise BadRecord(
            source,
            IMAGE_COUNT_MISMATCH,
            f"the messages have {open_slots} image part(s) but '{key}' holds {len(shared)}{hint}",
        )
    fill = iter(shared)
    for turn in turns:
        if isinstance(turn.content, list):
            turn.content = [ImageRef(next(fill)) if isinstance(p, ImageRef) else p for p in turn.content]


def _llava_turns(record: dict, source: str) -> list[Turn]:
    if "conversations" not in record:
        raise BadRecord(source, INVALID_SCHEMA, "a LLaVA record needs 'conversations'")
    conversations = record["conversations"]
    if not isinstance(conversations, list) or not conversations:
        raise BadRecord(
            source, INVALID_SCHEMA, f"'conversations' must be a non-empty list, got {_kind(conversations)}"
        )
    entries = [_llava_entry(message, source, f"conversations[{index}]") for index, message in enumerate(conversations)]
    if any(isinstance(content, list) for _, content, _ in entries):
        # ShareGPT entries with content parts: the messages shape under another key (images are parts).
        if any(isinstance(content, str) and LLAVA_IMAGE_MARKER in content for _, content, _ in entries):
            raise BadRecord(
                source, INVALID_SCHEMA, f"'conversations' has both content parts and {LLAVA_IMAGE_MARKER} markers; "
                "give the images as image parts"
            )
        messages = [{"role": speaker, "content": content} for speaker, content, _ in entries]
        return _messages_turns({**record, "messages": messages}, source, key="conversations", aliases=LLAVA_ROLES)
    images = _record_images(record, source)[0] or []
    turns: list[Turn] = []
    markers = 0
    for index, (speaker, value, keys) in enumerate(entries):
        where = f"conversations[{index}]"
        if not isinstance(speaker, str) or speaker not in LLAVA_ROLES:
            raise BadRecord(
                source, UNKNOWN_ROLE,
                f"{where} {'is from' if keys[0] == 'from' else 'has role'} {speaker!r}; LLaVA speakers are "
                f"{', '.join(LLAVA_ROLES)}",
            )
        if not isinstance(value, str):
            raise BadRecord(source, INVALID_SCHEMA, f"{where}.{keys[1]} must be a string, got {_kind(value)}")
        pieces = value.split(LLAVA_IMAGE_MARKER)
        if len(pieces) == 1:
            turns.append(Turn(LLAVA_ROLES[speaker], value))
            continue
        content: list[Part] = []
        for number, piece in enumerate(pieces):
            if number:
                if markers < len(images):
                    content.append(ImageRef(images[markers]))
                markers += 1
            if piece.strip():  # the template trims every text part, so empty ones render as nothing
                content.append(piece)
        turns.append(Turn(LLAVA_ROLES[speaker], content))
    if markers != len(images) and markers:
        raise BadRecord(
            source,
            IMAGE_COUNT_MISMATCH,
            f"the conversation has {markers} {LLAVA_IMAGE_MARKER} marker(s) but 'image' names {len(images)} image(s)"
            + ("" if images else " (give them in 'image' or 'images')"),
        )
    if images and not markers:
        # No markers: the images open the first human turn.
        first_user = next((turn for turn in turns if turn.role == "user"), None)
        if first_user is None:
            raise BadRecord(source, ROLE_ORDER, "the conversation has images but no human turn to put them in")
        text = first_user.content
        first_user.content = [ImageRef(image) for image in images] + ([text] if text.strip() else [])
    return turns


def _texts_turns(record: dict, source: str) -> list[Turn]:
    """``record["texts"]`` (HuggingFaceM4/the_cauldron, FineVision): each entry a ``user`` then an ``assistant``
    turn, read as the LLaVA record with those entries, so the images (``images`` or ``image``) open the first user
    turn unless ``<image>`` markers place them. Other keys of an entry (``source`` ...) are ignored."""
    if "texts" not in record:
        raise BadRecord(source, INVALID_SCHEMA, "a texts record needs 'texts'")
    texts = record["texts"]
    if not isinstance(texts, list) or not texts:
        raise BadRecord(source, INVALID_SCHEMA, f"'texts' must be a non-empty list, got {_kind(texts)}")
    conversations = []
    for index, entry in enumerate(texts):
        where = f"texts[{index}]"
        if not isinstance(entry, dict):
            raise BadRecord(source, INVALID_SCHEMA,
                            f'{where} must be an object {{"user": ..., "assistant": ...}}, got {_kind(entry)}')
        for key in ("user", "assistant"):
            if key not in entry:
                raise BadRecord(source, INVALID_SCHEMA, f"{where} needs '{key}' (each entry holds 'user' and "
                                "'assistant')")
            if not isinstance(entry[key], str):
                raise BadRecord(source, INVALID_SCHEMA, f"{where}.{key} must be a string, got {_kind(entry[key])}")
        conversations += [{"from": "human", "value": entry["user"]}, {"from": "gpt", "value": entry["assistant"]}]
    return _llava_turns({**record, "conversations": conversations}, source)


def _llava_entry(message: Any, source: str, where: str) -> tuple[Any, Any, tuple[str, str]]:
    """One ``conversations`` entry as (speaker, text or parts, the keys it used): LLaVA's ``from``/``value`` or
    ShareGPT's ``role``/``content``."""
    if not isinstance(message, dict):
        raise BadRecord(source, INVALID_SCHEMA, f"{where} must be an object, got {_kind(message)}")
    spellings = [keys for keys in (("from", "value"), ("role", "content")) if keys[0] in message or keys[1] in message]
    if len(spellings) > 1:
        raise BadRecord(
            source, INVALID_SCHEMA, f"{where} has both 'from'/'value' and 'role'/'content' keys; give one pair"
        )
    if not spellings or not all(key in message for key in spellings[0]):
        raise BadRecord(source, INVALID_SCHEMA, f"{where} needs 'from' and 'value' (or 'role' and 'content')")
    keys = spellings[0]
    return message[keys[0]], message[keys[1]], keys


def _check_roles(turns: list[Turn], source: str) -> None:
    """The Gemma template's rule, checked here so the message names the record rather than a Jinja error."""
    body = turns[1:] if turns[0].role == "system" else turns
    if turns[0].role == "system":
        _check_system(turns[0], source)
    for index, turn in enumerate(body):
        expected = "user" if index % 2 == 0 else "assistant"
        if turn.role != expected:
            position = index + (len(turns) - len(body))
            raise BadRecord(
                source,
                ROLE_ORDER,
                f"turn {position} is {turn.role!r} but {expected!r} was expected: after an optional system "
                "message, roles must alternate user/assistant",
            )
        if turn.role == "assistant" and turn.images:
            position = index + (len(turns) - len(body))
            raise BadRecord(source, INVALID_SCHEMA, f"turn {position} (assistant) holds an image; only user turns may")
    if not any(turn.role == "assistant" for turn in body):
        raise BadRecord(source, NO_ASSISTANT_TURN, "the conversation has no assistant turn to learn from")
    if body[-1].role != "assistant":
        raise BadRecord(
            source, ROLE_ORDER, "the conversation ends with a user turn; the last turn must be the assistant's"
        )


def _check_system(turn: Turn, source: str) -> None:
    # The template renders a system message as ``content`` (string) or ``content[0]['text']`` and nothing else.
    if isinstance(turn.content, list) and not (len(turn.content) == 1 and isinstance(turn.content[0], str)):
        raise BadRecord(
            source,
            INVALID_SCHEMA,
            "a system message must be a string or a single text part (the chat template renders nothing else)",
        )
