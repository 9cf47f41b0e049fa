"""The model side of generation: prefill, one decode step, its compiled form, and the caches they fill.

A run has gpt-fast's shape (reference §5.3 and §8 for what must match transformers):

* ``prefill``: the whole prompt once, images bidirectional inside their blocks, vision tower once;
* ``decode_step``: one text token per row against the cache, plain causal / sliding-window attention, fixed
  shapes and no host sync inside, so that on CUDA it can be compiled with CUDA graphs (``compiled_decode_step``),
  or, without compiling, captured as it is into a CUDA graph (``CapturedDecodeStep``, ``GEMMA3VL_DECODE_GRAPH=1``).

Both ``generate`` (a left-padded batch, start to end) and the server's continuous batching (``engine.py``: rows
join and leave between steps) are loops around these two functions.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
import weakref
from typing import Callable

import torch

from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.cache import KVCache, SlotKVCache, StaticKVCache
from gemma3vl.model import Gemma3Model, TokenInfo


def prefill(
    model: Gemma3Model,
    cache: StaticKVCache | KVCache,
    input_ids: torch.Tensor,
    info: TokenInfo,
    pixel_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the prompt into the cache; float32 logits [B, V] of its last column.

    This is the one place every prefill goes through (``generate``'s and the server engine's), so it is where
    prefill picks its attention kernel (``prefill_backend``): a long prompt on a GPU takes block-sparse
    FlexAttention, whatever the decoder's own setting; decode steps (one query row) always take the dense
    mask and ``attention.attend_one_query``, so the compiled decode graph is unaffected.
    """
    hidden = prompt_hidden_states(model, input_ids, info, pixel_values, cache=cache, last_only=True)
    return model.text.logits(hidden[:, -1]).float()


def prompt_hidden_states(
    model: Gemma3Model,
    input_ids: torch.Tensor,
    info: TokenInfo,
    pixel_values: torch.Tensor | None = None,
    *,
    cache: StaticKVCache | KVCache | None,
    last_only: bool,
) -> torch.Tensor:
    """The decoder's final hidden states over a prompt: [B, T, D], or [B, 1, D] of its last column with
    ``last_only`` (``prefill``; ``logprobs.score_prompt`` keeps every column to score the prompt's tokens).

    The attention kernel is ``prefill_backend``'s. A prompt longer than ``prefill_chunk_tokens()`` goes through the
    decoder chunk by chunk, each chunk attending to the cache the earlier ones filled (as a one-token decode step
    does): the transient activations (the MLP's [T, 2I] above all) are a chunk's, not the whole prompt's. The vision
    tower runs once, over every image, before the first chunk. ``cache`` None: no cache is kept, but a chunked
    prompt fills a dynamic one of its own (the chunks need it).
    """
    backend = prefill_backend(input_ids.shape[1], input_ids.device)
    chunk = prefill_chunk_tokens()
    if not chunk or input_ids.shape[1] <= chunk:
        hidden = model.hidden_states(input_ids, pixel_values, info=info, cache=cache, attention_backend=backend)
        return hidden[:, -1:] if last_only else hidden
    cache = KVCache(model.config.text) if cache is None else cache
    embeds = model.embed(input_ids, pixel_values)
    kept = []
    for start, stop in chunk_bounds(info.image_block_ids, chunk):
        hidden = model.text(embeds[:, start:stop], info.columns(start, stop), cache, attention_backend=backend)
        kept.append(hidden[:, -1:] if last_only else hidden)
    return kept[-1] if last_only else torch.cat(kept, dim=1)


PREFILL_CHUNK_TOKENS = 32768


def prefill_chunk_tokens() -> int:
    """Longest prefill run through the decoder at once: ``GEMMA3VL_PREFILL_CHUNK`` tokens (default 32,768; 0 = the
    whole prompt at once). Longer prompts are prefilled in chunks of about that many tokens."""
    raw = os.environ.get("GEMMA3VL_PREFILL_CHUNK", str(PREFILL_CHUNK_TOKENS))
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise Gemma3VLError(f"GEMMA3VL_PREFILL_CHUNK={raw!r}: expected a number of tokens >= 0 (0: no chunking)")
    return value


def chunk_bounds(image_block_ids: torch.Tensor, chunk: int) -> list[tuple[int, int]]:
    """Column ranges of at most ``chunk`` columns covering ``[0, T)``, never cutting an image block of any row (its
    tokens attend to each other both ways, so they must be in one forward); an image block longer than a chunk
    makes its chunk end where the block ends."""
    length = image_block_ids.shape[1]
    same_block = (image_block_ids[:, 1:] == image_block_ids[:, :-1]) & (image_block_ids[:, 1:] >= 0)
    forbidden = set((same_block.any(dim=0).nonzero().flatten() + 1).tolist())  # cuts before these columns
    bounds, start = [], 0
    while length - start > chunk:
        stop = start + chunk
        while stop > start and stop in forbidden:
            stop -= 1
        if stop == start:  # the block starting here is longer than a chunk: end at its end
            stop = start + chunk
            while stop < length and stop in forbidden:
                stop += 1
        bounds.append((start, stop))
        start = stop
    if start < length:  # (a block running to the end may have taken the last columns already)
        bounds.append((start, length))
    return bounds


FLEX_PREFILL_MIN_TOKENS = 32768


def prefill_backend(length: int, device: torch.device) -> str | None:
    """The attention kernel for a prefill of ``length`` tokens: ``flex`` on CUDA from
    ``GEMMA3VL_FLEX_PREFILL_MIN_TOKENS`` tokens on (default 32,768; 0 = never), where SDPA's dense mask (and the
    bias it becomes) would take gigabytes (2 x 17 G entries at 131,072 tokens); below that, or on the CPU, the
    decoder's own ``attention_backend`` (``None``: unchanged). Short prompts keep SDPA, which needs no compiling:
    FlexAttention compiles once per new prompt shape, seconds that only a long prefill hides."""
    raw = os.environ.get("GEMMA3VL_FLEX_PREFILL_MIN_TOKENS", str(FLEX_PREFILL_MIN_TOKENS))
    try:
        threshold = int(raw)
    except ValueError:  # (a bare ValueError out of every prefill, before)
        raise Gemma3VLError(f"GEMMA3VL_FLEX_PREFILL_MIN_TOKENS={raw!r}: expected a number of tokens (0: never "
                            "FlexAttention)") from None
    if device.type == "cuda" and threshold > 0 and length >= threshold:
        return "flex"
    return None


def decode_step(
    model: Gemma3Model, cache: StaticKVCache | SlotKVCache | KVCache, tokens: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """One token per row (tokens, positions: [B]) -> float32 logits [B, V].

    The function ``torch.compile`` captures. New tokens are text (transformers passes no token_type_ids after
    prefill), so it embeds them directly: ``model.embed``'s image checks would sync with the host.
    """
    info = TokenInfo(
        positions=positions[:, None],
        segment_ids=torch.ones_like(tokens)[:, None],
        image_block_ids=torch.full_like(tokens, -1)[:, None],
    )
    hidden = model.text(model.text.embed_tokens(tokens[:, None]), info, cache)  # [B, 1, D]
    return model.text.logits(hidden[:, -1]).float()


def _compile_options() -> dict:
    """``mode="reduce-overhead"`` (CUDA graphs), plus bf16 rounding where eager rounds: without it inductor keeps
    fused intermediates in float32, so the compiled step's bf16 logits differ from eager ones in the last bits
    and greedy decoding can part ways at a near tie (the benchmark reports the first differing token).
    ``GEMMA3VL_EXACT_CASTS=0`` turns the emulation off (a way out should an inductor version mishandle it)."""
    from torch._inductor import config as inductor_config

    options = {"triton.cudagraphs": True}
    if hasattr(inductor_config, "emulate_precision_casts") and os.environ.get("GEMMA3VL_EXACT_CASTS", "1") != "0":
        options["emulate_precision_casts"] = True
    return options


@functools.cache
def compiled_decode_step() -> Callable:
    """``decode_step`` compiled once per process with CUDA graphs; shapes are specialised (one graph per batch
    size and cache length: reuse one cache to keep hitting the same graph)."""
    return torch.compile(decode_step, options=_compile_options(), fullgraph=True, dynamic=False)


def compiles_on(device: torch.device) -> bool:
    """Whether ``compile=True`` compiles the decode step on ``device``: CUDA graphs need CUDA; elsewhere the same
    step runs eagerly."""
    return device.type == "cuda"


def captures_eager_step(device: torch.device) -> bool:
    """Whether decode steps that are not compiled run as a captured CUDA graph of the eager step
    (``GEMMA3VL_DECODE_GRAPH=1``, CUDA only): nothing is compiled (capturing records one step's kernels), and the
    eager step's kernels are replayed without the host launching each one. Off by default: not yet measured on a
    GPU (``benchmarks/generate.py``'s ``graph`` row)."""
    raw = os.environ.get("GEMMA3VL_DECODE_GRAPH", "0")
    if raw not in ("0", "1"):
        raise Gemma3VLError(f"GEMMA3VL_DECODE_GRAPH={raw!r}: expected 1 (capture the eager decode step) or 0")
    return raw == "1" and device.type == "cuda"


class CapturedDecodeStep:
    """``decode_step`` captured into CUDA graphs as it is (no compiling): one graph per cache and batch shape,
    replayed with the step's tokens and positions copied into the graph's own input tensors.

    The first call for a cache runs the step eagerly on a side stream (a real step, and the warm-up CUDA graph
    capture needs: cuBLAS handles and workspaces made outside the capture), then captures it; capturing records
    the kernels without running them, so the cache is advanced once. Later calls replay. Host-side state the
    step reads is fixed for a cache's decode steps (one token a row, the same buffers; the KV indices live on the
    device), which is what makes a replay equal to running the step again.

    The graphs live as long as their cache (``_captured``), so the calls that reuse a cache (``generate``'s
    borrowed ones, a chat's, the server engine's) replay one graph. ``graph`` and ``stream`` are the CUDA graph
    and stream classes (replaceable, for tests without a GPU).
    """

    def __init__(self, graph=None, stream=None):
        self._graph_class = graph or torch.cuda.CUDAGraph
        self._stream_class = stream or torch.cuda.Stream

    def __call__(self, model: Gemma3Model, cache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        graphs = _captured.setdefault(cache, {})
        key = (id(model), tuple(tokens.shape))
        captured = graphs.get(key)
        if captured is None:
            logits, graphs[key] = self._capture(model, cache, tokens, positions)
            return logits
        graph, tokens_in, positions_in, logits_out = captured
        tokens_in.copy_(tokens)
        positions_in.copy_(positions)
        graph.replay()
        return logits_out.clone()  # the next replay overwrites it

    def _capture(self, model, cache, tokens, positions):
        tokens_in, positions_in = tokens.clone(), positions.clone()
        side = self._stream_class()
        if tokens.is_cuda:
            side.wait_stream(torch.cuda.current_stream())
        with _on_stream(side):
            logits = decode_step(model, cache, tokens_in, positions_in)  # this call's step, and the warm-up
        if tokens.is_cuda:
            torch.cuda.current_stream().wait_stream(side)
            logits.record_stream(torch.cuda.current_stream())  # made on the side stream, read on this one
        graph = self._graph_class()
        try:
            logits_out = _capture_into(graph, side, lambda: decode_step(model, cache, tokens_in, positions_in))
        except Exception as exc:  # noqa: BLE001  (an op that cannot be captured: this call's step is done)
            raise CaptureFailed(logits, f"{type(exc).__name__}: {exc}") from exc
        return logits, (graph, tokens_in, positions_in, logits_out)


# per cache (dropped with it): (model, batch shape) -> (graph, tokens in, positions in, logits out)
_captured: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


class CaptureFailed(Exception):
    """Capturing the decode step failed after its warm-up had run the call's step: ``logits`` are that step's."""

    def __init__(self, logits: torch.Tensor, why: str):
        super().__init__(why)
        self.logits = logits


def _on_stream(stream):
    """``torch.cuda.stream(stream)`` for a CUDA stream, nothing for a test's stand-in."""
    return torch.cuda.stream(stream) if isinstance(stream, torch.cuda.Stream) else contextlib.nullcontext()


def _capture_into(graph, stream, step: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Capture ``step`` into ``graph`` on ``stream`` (errors of this thread only: the server's other threads do not
    touch the GPU); its output tensor, which every replay rewrites. A test's stand-in graph captures by itself."""
    if not isinstance(graph, torch.cuda.CUDAGraph):
        return graph.capture(step)
    with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
        return step()


class DecodeStep:
    """The decode step a generation loop calls (``generate``'s and the server engine's): compiled with CUDA graphs
    when asked for on CUDA; else, with ``GEMMA3VL_DECODE_GRAPH=1`` on CUDA, the eager step captured into CUDA
    graphs (:class:`CapturedDecodeStep`); eager otherwise.

    Should a compiled or captured call fail (compiling, or capturing the graph), the step says why through
    ``report`` (``warnings.warn`` without one), runs the eager step for that call instead, and stays eager from
    then on: the eager step computes the same tokens, and it rewrites whatever cache positions the failed call
    reached. A failed capture comes after its warm-up has run the call's step: that step's logits are returned.
    ``failure`` keeps the reason. An error that is not the compiler's raises again from the eager step.
    """

    def __init__(self, compile: bool, device: torch.device, report: Callable[[str], None] | None = None):
        self.failure: str | None = None
        self._report = report
        self._compiled_fn: Callable | None = None
        if compile and compiles_on(device):
            self._compiled_fn = compiled_decode_step()
        elif captures_eager_step(device):
            self._compiled_fn = CapturedDecodeStep()

    @property
    def compiled(self) -> bool:
        """Whether the next call replays a graph (the compiled step's, or the captured eager step's); False on other
        devices and once compiling or capturing failed. Such a step wants one cache reused across calls."""
        return self._compiled_fn is not None

    def __call__(self, model: Gemma3Model, cache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self._compiled_fn is not None:
            try:
                if not isinstance(self._compiled_fn, CapturedDecodeStep):
                    torch.compiler.cudagraph_mark_step_begin()
                    # a copy: the graph overwrites its output at the next replay
                    return self._compiled_fn(model, cache, tokens, positions).clone()
                return self._compiled_fn(model, cache, tokens, positions)
            except CaptureFailed as exc:  # the step itself ran (the cache moved on): its logits stand
                self.use_eager(f"capturing the eager step: {exc}")
                return exc.logits
            except Exception as exc:  # noqa: BLE001  (whatever the compiler raised; the eager step decides)
                self.use_eager(f"{type(exc).__name__}: {exc}")
        return decode_step(model, cache, tokens, positions)

    def use_eager(self, why: str) -> None:
        """Decode eagerly from now on, saying ``why`` the compiled step was given up."""
        self._compiled_fn, self.failure = None, why
        if self._report is not None:
            self._report(why)
        else:
            warnings.warn(f"compiling the decode step failed ({why[:300]}); decoding eagerly", RuntimeWarning,
                          stacklevel=3)


class HostCopy:
    """A device tensor's values on the host, copied in stream order without waiting for work queued after it:
    ``tolist()`` waits only for the copy (an event), not for the steps launched since."""

    def __init__(self, tensor: torch.Tensor):
        if tensor.device.type != "cuda":
            self.host, self.ready = tensor, None
            return
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.host.copy_(tensor, non_blocking=True)
        self.ready = torch.cuda.Event()
        self.ready.record(torch.cuda.current_stream(tensor.device))

    def tolist(self) -> list:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# NOTE: a compiled step is a CUDA graph captured against the cache's buffer addresses. A call that brings the
# same cache replays it; a new cache means capturing again (cheap: ~20 ms at 4B shapes on an H200), but every
# capture stays in the CUDA-graph tree, which each step searches, so a server must not capture per request.
# Compiled calls that bring no cache therefore borrow one kept per model and batch size (taken out while in use:
# two calls at once never share one). It stays allocated between calls.
_spare_caches: "weakref.WeakKeyDictionary[Gemma3Model, dict[int, StaticKVCache]]" = weakref.WeakKeyDictionary()


def make_cache(
    cache: str | StaticKVCache, model: Gemma3Model, batch: int, length: int, compiled: bool
) -> StaticKVCache | KVCache:
    """The cache a ``generate`` call of ``batch`` rows x ``length`` positions runs on (see ``generate``)."""
    weight = model.text.embed.weight
    if isinstance(cache, StaticKVCache):
        if (cache.batch_size, cache.index.device, cache.keys[0].dtype) != (batch, weight.device, weight.dtype) \
                or cache.max_length < length:
            raise Gemma3VLError(
                f"the given StaticKVCache holds {cache.batch_size} rows x {cache.max_length} positions "
                f"({cache.keys[0].dtype}, {cache.index.device}); this call needs {batch} rows x {length} positions "
                f"({weight.dtype}, {weight.device})"
            )
        cache.reset()
        return cache
    if cache == "static":
        if not compiled:
            return StaticKVCache(model.config.text, batch, length, weight.device, weight.dtype)
        spare = _spare_caches.get(model, {}).pop(batch, None)
        if spare is not None and spare.max_length >= length:
            spare.reset()
            return spare
        # rounded up, so that calls of similar lengths share the cache and its graph
        return StaticKVCache(model.config.text, batch, _round_up(length, 256), weight.device, weight.dtype)
    if cache == "dynamic":
        if compiled:
            raise Gemma3VLError("compile=True needs the static cache (cache='static' or a StaticKVCache)")
        return KVCache(model.config.text)
    raise Gemma3VLError(f"cache={cache!r}: expected 'static', 'dynamic' or a StaticKVCache")


def give_back(model: Gemma3Model, kv: StaticKVCache | KVCache) -> None:
    """Return a borrowed compiled-call cache for the next call of the same batch size."""
    if isinstance(kv, StaticKVCache):
        _spare_caches.setdefault(model, {})[kv.batch_size] = kv
