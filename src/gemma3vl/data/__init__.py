"""Conversation data: records -> encoded samples (ids, loss targets, pixels) -> padded or packed batches.

``records`` (schema and validation) -> ``images`` (safe image opening) -> ``encode`` (the processor's ids and
the assistant-only labels, truncation) -> ``collate`` (padded / packed batches); ``sources`` reads JSONL, JSON
arrays and local HF datasets; ``dataset`` and ``loader`` put it together, seeded and resumable.
"""

from gemma3vl.data.batch import IGNORE, Batch, Sample
from gemma3vl.data.collate import collate_packed, collate_padded, pack
from gemma3vl.data.dataset import ConversationDataset, DataSummary
from gemma3vl.data.encode import ConversationEncoder
from gemma3vl.data.images import ImageLoader
from gemma3vl.data.loader import BatchLoader
from gemma3vl.data.records import BadRecord, Conversation, ImageRef, Turn, parse_record
from gemma3vl.data.settings import DataConfig

__all__ = [
    "IGNORE",
    "BadRecord",
    "Batch",
    "BatchLoader",
    "Conversation",
    "ConversationDataset",
    "ConversationEncoder",
    "DataConfig",
    "DataSummary",
    "ImageLoader",
    "ImageRef",
    "Sample",
    "Turn",
    "collate_packed",
    "collate_padded",
    "pack",
    "parse_record",
]
