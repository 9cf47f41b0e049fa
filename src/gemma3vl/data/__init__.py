"""Conversation data: records -> encoded samples (ids, loss targets, pixels) -> padded or packed batches."""
