"""The key-name layouts Hugging Face Gemma 3 checkpoints exist in, and detection from key names.

A layout is only prefixes: where the text decoder, the SigLIP tower and the projector live, and the full
name of an untied output matrix. The per-tensor names under those prefixes are the same in every layout
(see mapping.py). Checked against transformers 5.24 (tests/test_bridge_layouts.py):

* ``hub``: the Gemma 3 checkpoints on the Hub (converted with transformers 4.50).
* ``transformers5``: what ``Gemma3ForConditionalGeneration.save_pretrained`` writes in transformers 5: the
  text and projector as on the hub, but the SigLIP tower without ``vision_model.``.
* ``memory``: the module names of a transformers 5 model in memory (``model.state_dict()``), as some tools
  save them; transformers loads them as is. Read it; write it only when asked.
* ``memory4``: the same for transformers 4.52 to 4.57, whose SigLIP tower still had ``vision_model.`` in
  memory (``model.vision_tower.vision_model.*``): what accelerate, FSDP or DeepSpeed full state dicts of those
  versions hold. transformers 5 loads it. Read it; write it only when asked (its source export is ``hub``,
  what those versions' ``save_pretrained`` writes).
* ``text``: ``Gemma3ForCausalLM`` (text-only checkpoints).
* ``textmodel``: ``Gemma3TextModel`` (what ``AutoModel`` builds for a ``gemma3_text`` config), saved as is: the
  decoder's names with no prefix and no output matrix. transformers' ``Gemma3ForCausalLM`` loads it whole (the
  head tied to the embedding); a plain export gives it back in these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from gemma3vl.errors import Gemma3VLError


@dataclass(frozen=True)
class Layout:
    name: str
    text: str  # prefix of the decoder's keys (embed_tokens, layers.*, norm)
    lm_head: str  # full key of an untied output matrix
    vision: str | None = None  # prefix of the SigLIP keys (embeddings, encoder.layers.*, post_layernorm)
    projector: str | None = None  # prefix of multi_modal_projector keys

    @property
    def vision_language(self) -> bool:
        return self.vision is not None

    def claim(self, key: str) -> int:
        """How specifically this layout explains ``key``: the length of its longest matching prefix, 0 if none."""
        if key == self.lm_head:
            return len(key)
        if not self.text:  # no prefix (textmodel): only the decoder's own roots, and weaker than any prefix
            return 1 if key.startswith(_DECODER_ROOTS) else 0
        prefixes = [p for p in (self.text, self.vision, self.projector) if p]
        return max((len(p) for p in prefixes if key.startswith(p)), default=0)


_DECODER_ROOTS = ("embed_tokens.", "layers.", "norm.")


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("hub", text="language_model.model.", lm_head="language_model.lm_head.weight",
               vision="vision_tower.vision_model.", projector="multi_modal_projector."),
        Layout("transformers5", text="language_model.model.", lm_head="language_model.lm_head.weight",
               vision="vision_tower.", projector="multi_modal_projector."),
        Layout("memory", text="model.language_model.", lm_head="lm_head.weight",
               vision="model.vision_tower.", projector="model.multi_modal_projector."),
        Layout("memory4", text="model.language_model.", lm_head="lm_head.weight",
               vision="model.vision_tower.vision_model.", projector="model.multi_modal_projector."),
        Layout("text", text="model.", lm_head="lm_head.weight"),
        Layout("textmodel", text="", lm_head="lm_head.weight"),
    )
}
# When the keys fit several layouts equally well (a VL checkpoint whose vision keys are all missing), the
# first of these wins; validation then reports exactly which keys are missing.
_PREFERENCE = ("hub", "transformers5", "memory", "memory4", "text", "textmodel")
WRITABLE = ("hub", "transformers5", "memory", "memory4", "text", "textmodel")
# The layouts that are read but not given back as they are by a plain (``source``) export: the names
# transformers' save_pretrained writes for the same model instead.
SOURCE_EXPORT = {"memory": "transformers5", "memory4": "hub"}


def source_export_layout(source_layout: str) -> str:
    """The layout a ``source`` export writes for a checkpoint read in ``source_layout``."""
    return SOURCE_EXPORT.get(source_layout, source_layout)


def get_layout(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise Gemma3VLError(f"unknown layout {name!r} (known: {', '.join(LAYOUTS)})") from None


def candidates(key: str) -> set[str]:
    """The layouts that explain ``key`` best (a longer matching prefix beats a shorter one)."""
    claims = {name: layout.claim(key) for name, layout in LAYOUTS.items()}
    best = max(claims.values())
    return {name for name, claim in claims.items() if claim == best} if best else set()


def detect_layout(keys: Iterable[str], vision_language: bool, where: str) -> Layout:
    """The one layout every recognised key fits. Keys no layout knows are left for validation to report
    (as unexpected tensors, with their file); keys from two different layouts are an error here."""
    keys = sorted(keys)
    kind = "vision-language" if vision_language else "text-only"
    possible = {name for name, layout in LAYOUTS.items() if layout.vision_language == vision_language}
    seen: list[tuple[str, set[str]]] = []
    for key in keys:
        fits = candidates(key)
        if not fits:
            continue
        if not possible & fits:
            clash = next((k for k, f in seen if not f & fits), None)
            if clash is None:
                raise Gemma3VLError(
                    f"{where}: key {key!r} is in the {'/'.join(sorted(fits))} layout, but config.json describes a "
                    f"{kind} model ({'/'.join(sorted(possible))} layout expected)"
                )
            raise Gemma3VLError(
                f"{where}: mixed key layouts: {clash!r} is {'/'.join(sorted(candidates(clash)))} but {key!r} is "
                f"{'/'.join(sorted(fits))}; a checkpoint must use one layout"
            )
        possible &= fits
        seen.append((key, fits))
    if not seen:
        sample = ", ".join(repr(k) for k in keys[:3]) or "no tensors at all"
        raise Gemma3VLError(f"{where}: no Gemma 3 key layout recognised (keys like {sample})")
    return LAYOUTS[next(name for name in _PREFERENCE if name in possible)]
