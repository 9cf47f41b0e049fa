"""KV caches with the sliding-window semantics of transformers' DynamicCache (reference §8).

``StaticKVCache`` is what generation uses: preallocated, fixed shapes, ring buffers for sliding layers. ``KVCache``
is the simple dynamic form (tensors grow by concatenation), kept as the readable statement of the semantics and
as a second implementation to test the static one against.

KVCache: global layers keep every position. Sliding layers keep only the last ``window - 1`` positions after each
step (the window minus the query itself), so 5 of every 6 layers hold at most ``window - 1`` keys however
long the conversation grows. Keys are stored after q/k-norm and RoPE at absolute positions, so nothing is
re-rotated when the window slides. The mask description of the cached keys (positions, segments, image
blocks) is kept beside them, one per layer type, so decode steps get exactly the prefill's rule.
"""

from __future__ import annotations

import torch

from gemma3vl.config import FULL, SLIDING, TextConfig
from gemma3vl.model.attention import TokenInfo


class KVCache:
    def __init__(self, config: TextConfig):
        self.window = config.sliding_window
        self.layer_types = config.layer_types
        self.keys: list[torch.Tensor | None] = [None] * config.num_hidden_layers
        self.values: list[torch.Tensor | None] = [None] * config.num_hidden_layers
        # both kinds, whatever the layers are: the decoder asks for both masks (a config whose layers are all full or
        # all sliding, e.g. sliding_window_pattern=1, would otherwise fail with a KeyError)
        self.info: dict[str, TokenInfo | None] = {SLIDING: None, FULL: None}

    def keys_info(self, layer_type: str, new: TokenInfo) -> TokenInfo:
        """Mask description of every key the next step's queries see: cached ones, then ``new``."""
        cached = self.info[layer_type]
        full = new if cached is None else cached.cat(new)
        self.info[layer_type] = full
        return full

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def end_step(self) -> None:
        """Drop what no sliding-window query can see any more: keep the last ``window - 1`` keys."""
        keep = self.window - 1
        for layer, kind in enumerate(self.layer_types):
            if kind == SLIDING and self.keys[layer] is not None and self.keys[layer].shape[2] > keep:
                start = self.keys[layer].shape[2] - keep
                self.keys[layer] = self.keys[layer][:, :, start:]
                self.values[layer] = self.values[layer][:, :, start:]
        info = self.info.get(SLIDING)
        if info is not None and info.positions.shape[1] > keep:
            self.info[SLIDING] = info.last(keep)

    def cached_length(self, layer: int) -> int:
        return 0 if self.keys[layer] is None else self.keys[layer].shape[2]


class StaticKVCache:
    """Preallocated KV cache with exactly the masks of transformers' DynamicCache (reference §8).

    Layout, per layer: keys and values ``[B, K, S, hd]`` allocated once. ``S = max_length`` for global layers
    (column ``c`` of the left-padded batch lives in slot ``c``) and ``S = min(window, max_length)`` for sliding
    layers, a ring buffer (column ``c`` lives in slot ``c % S``): 5 of every 6 layers hold at most ``window``
    positions however long the conversation. Beside the tensors, ``slots[layer_type]`` is a ``TokenInfo`` [B, S]
    saying what each slot holds (position, segment, image block; segment 0 = empty), so ``dense_mask`` gives the
    same masks as without a cache and empty or stale slots can never be seen.

    Why exact: transformers keeps ``window - 1`` past keys and attends them plus the current token, i.e. a query
    sees the last ``window`` positions including itself. A single new token is written into the ring *before*
    attention (it overwrites the one position that just left the window), so the ring is exactly that. A chunk of
    several tokens (a prefill chunk) attends over ring + its own keys, since its first queries need keys that its
    last tokens would overwrite, and only then keeps its last ``S`` keys. The first chunk after creation or
    ``reset()`` (the whole prompt, unless it is prefilled in chunks) attends to its own keys alone: nothing else is
    cached, and that is transformers' no-cache prefill, column for column (``_prompt_alone``).

    ``index`` (a one-element tensor on the device) counts the columns written. A step reads and bumps it on the
    device, never on the host, so a decode step has fixed shapes and no host sync: what CUDA graphs need. On CUDA
    the buffers are marked as static addresses, the condition for ``torch.compile(mode="reduce-overhead")`` to
    capture a step that writes into them; reuse one cache across calls (``reset()``) to keep the captured graph.

    Precision: in float64 the static and the dynamic cache give the same logits to the last bit (same keys, same
    rule). In bf16 the prefill logits are bit-equal to the dynamic cache's and to the no-cache forward's (the
    prompt attends to its own keys alone, see above); decode steps accumulate in float32 (``attend_one_query``),
    but over the ring in its rotated order, so once the ring has wrapped a step's bf16 logits can come out one
    ulp apart from the dynamic cache's, and greedy decoding can then part ways at a near tie, many tokens in: that
    is rounding, not a mask difference. (Before the prompt attended alone, its attention reduced over the empty
    ring and the whole ``max_length`` buffer too: the prefill logits were ~2e-2 apart in bf16 and greedy runs
    parted after as few as 2 tokens; tests/test_generation_length_parity.py.)
    """

    def __init__(
        self, config: TextConfig, batch_size: int, max_length: int, device: torch.device | str, dtype: torch.dtype
    ):
        device = torch.device(device)
        self.layer_types = config.layer_types
        self.batch_size = batch_size
        self.max_length = max_length
        self.sizes = {FULL: max_length, SLIDING: min(config.sliding_window, max_length)}
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for kind in self.layer_types:
            shape = (batch_size, config.num_key_value_heads, self.sizes[kind], config.head_dim)
            # zeros, not empty: a masked slot still enters the attention product with weight 0, and 0 * NaN = NaN
            self.keys.append(torch.zeros(shape, device=device, dtype=dtype))
            self.values.append(torch.zeros(shape, device=device, dtype=dtype))
        self.slots = {
            kind: TokenInfo(
                positions=torch.zeros(batch_size, size, dtype=torch.long, device=device),
                segment_ids=torch.zeros(batch_size, size, dtype=torch.long, device=device),
                image_block_ids=torch.full((batch_size, size), -1, dtype=torch.long, device=device),
            )
            for kind, size in self.sizes.items()
        }
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        self._step_length = 0
        self._empty = True  # nothing written since creation or reset(): known on the host, see keys_info
        if device.type == "cuda":
            for tensor in self._buffers():
                torch._dynamo.mark_static_address(tensor)

    def _buffers(self) -> list[torch.Tensor]:
        infos = [t for info in self.slots.values() for t in (info.positions, info.segment_ids, info.image_block_ids)]
        return [*self.keys, *self.values, *infos, self.index]

    def reset(self) -> None:
        """Empty the cache in place (same tensors, so a compiled step captured with them stays valid)."""
        self.index.zero_()
        self._empty = True
        for info in self.slots.values():
            info.segment_ids.zero_()
            info.positions.zero_()
            info.image_block_ids.fill_(-1)

    def _targets(self, layer_type: str, length: int) -> tuple[int, torch.Tensor]:
        """Where a step of ``length`` new columns goes: (first new column kept, slot of each kept column)."""
        size = self.sizes[layer_type]
        keep = min(length, size) if layer_type == SLIDING else length
        columns = self.index + torch.arange(length - keep, length, device=self.index.device)
        # no wrap-around for global layers: a column past max_length must fail, not overwrite column 0
        return length - keep, columns % size if layer_type == SLIDING else columns

    def _prompt_alone(self, length: int) -> bool:
        """Whether a step of ``length`` tokens attends to its own keys only: the first chunk written into an empty
        cache (a whole prompt, or a chunked prefill's first chunk). Every other slot is empty then, so the keys it
        may see are exactly its own, and attending to them alone is the no-cache forward transformers' prefill
        does: the same columns, the same kernel, so the same rounding in bf16 (see Precision above), and no
        dense mask and attention over ``max_length`` columns (a server's rows are the whole context long).
        Decided on the host; a one-token step (decode) never takes it."""
        return self._empty and length > 1

    def keys_info(self, layer_type: str, new: TokenInfo) -> TokenInfo:
        """Mask description of the keys the step's queries attend (what ``update`` returns), in the same order."""
        length = new.positions.shape[1]
        self._step_length = length
        slots = self.slots[layer_type]
        if self._prompt_alone(length):
            keys = new
        else:
            keys = slots.cat(new) if layer_type == SLIDING and length > 1 else slots
        start, targets = self._targets(layer_type, length)
        for buffer, values in zip(
            (slots.positions, slots.segment_ids, slots.image_block_ids),
            (new.positions, new.segment_ids, new.image_block_ids),
        ):
            buffer.index_copy_(1, targets, values[:, start:])
        return keys

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the step's keys/values [B, K, T, hd]; return the keys/values to attend over."""
        kind = self.layer_types[layer]
        length = k.shape[2]
        cached_k, cached_v = self.keys[layer], self.values[layer]
        attend_k, attend_v = cached_k, cached_v
        if self._prompt_alone(length):
            attend_k, attend_v = k, v
        elif kind == SLIDING and length > 1:
            attend_k, attend_v = torch.cat((cached_k, k), dim=2), torch.cat((cached_v, v), dim=2)
        start, targets = self._targets(kind, length)
        cached_k.index_copy_(2, targets, k[:, :, start:])
        cached_v.index_copy_(2, targets, v[:, :, start:])
        return attend_k, attend_v

    def end_step(self) -> None:
        self.index.add_(self._step_length)
        if self._empty:  # (a compiled decode step only reads the flag: it never runs on an empty cache)
            self._empty = False

    def filled(self, layer_type: str) -> torch.Tensor:
        """How many slots of each row hold a real token [B] (padding columns are not counted)."""
        return (self.slots[layer_type].segment_ids != 0).sum(dim=1)


class SlotKVCache:
    """A decode-only cache of ``slots`` independent rows, each with its own length: continuous batching.

    The layout is ``StaticKVCache``'s (global layers ``[slots, K, max_length, hd]``, sliding layers a ring of
    ``min(window, max_length)``), but ``index`` is per row [slots]: row ``r``'s column ``c`` lives in slot ``c`` (or
    ``c % S``), so a request joins by having its prompt prefilled alone into a batch-1 ``StaticKVCache`` of the
    same sizes and that row copied in (``load_row``), and leaves by being overwritten by the next. Rows are never
    padded: a row decoded here sees exactly the keys it would see alone.

    A decode step writes each row's new key at that row's own column (a scatter: fixed shapes, no host sync, so
    the step still compiles to one CUDA graph for the life of the cache). Rows that hold no request still run
    (fixed shapes); their index stops at the last column instead of running past the end.
    """

    def __init__(
        self, config: TextConfig, slots: int, max_length: int, device: torch.device | str, dtype: torch.dtype
    ):
        self.config = config
        self.rows = StaticKVCache(config, slots, max_length, device, dtype)  # the buffers (its index unused)
        self.layer_types = config.layer_types
        self.batch_size = slots
        self.max_length = max_length
        self.sizes = self.rows.sizes
        self.keys, self.values, self.slots = self.rows.keys, self.rows.values, self.rows.slots
        self.index = torch.zeros(slots, dtype=torch.long, device=self.rows.index.device)
        if self.index.device.type == "cuda":
            torch._dynamo.mark_static_address(self.index)

    def prefill_cache(self) -> StaticKVCache:
        """A batch-1 cache with this cache's sizes, for prefilling one joining row."""
        return StaticKVCache(self.config, 1, self.max_length, self.keys[0].device, self.keys[0].dtype)

    def load_row(self, slot: int, prefilled: StaticKVCache) -> None:
        """Make row ``slot`` exactly ``prefilled``'s (batch 1, same sizes): keys, values, what each slot holds."""
        for target, source in zip((*self.keys, *self.values), (*prefilled.keys, *prefilled.values)):
            target[slot].copy_(source[0])
        for kind, info in self.slots.items():
            source = prefilled.slots[kind]
            for target_tensor, source_tensor in zip(
                (info.positions, info.segment_ids, info.image_block_ids),
                (source.positions, source.segment_ids, source.image_block_ids),
            ):
                target_tensor[slot].copy_(source_tensor[0])
        self.index[slot] = prefilled.index[0]

    def _targets(self, layer_type: str) -> torch.Tensor:
        """[slots, 1]: the slot each row's new column goes to."""
        return (self.index % self.sizes[layer_type] if layer_type == SLIDING else self.index)[:, None]

    def keys_info(self, layer_type: str, new: TokenInfo) -> TokenInfo:
        if new.positions.shape[1] != 1:
            raise ValueError("SlotKVCache takes one token per row; prefill a joining row into prefill_cache()")
        slots = self.slots[layer_type]
        targets = self._targets(layer_type)
        for buffer, values in zip(
            (slots.positions, slots.segment_ids, slots.image_block_ids),
            (new.positions, new.segment_ids, new.image_block_ids),
        ):
            buffer.scatter_(1, targets, values)
        return slots

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store each row's new key/value [slots, K, 1, hd] at its own column; attend over the whole row."""
        targets = self._targets(self.layer_types[layer])[:, :, None, None].expand(-1, k.shape[1], 1, k.shape[3])
        self.keys[layer].scatter_(2, targets, k)
        self.values[layer].scatter_(2, targets, v)
        return self.keys[layer], self.values[layer]

    def end_step(self) -> None:
        # a row that holds no request keeps decoding (fixed shapes): it must not run past the last column
        self.index.add_(1).clamp_(max=self.max_length - 1)

