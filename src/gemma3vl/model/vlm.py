"""The whole model: text decoder, and for VL checkpoints the SigLIP tower and the projector.

``Gemma3Model(config)`` builds the VL model when ``config.vision`` is set and the text-only decoder
(``Gemma3ForCausalLM``, logits soft-capped when the config asks) otherwise. Parameter names are the native
names the bridge maps HF checkpoints onto (``text.*``, ``vision.*``, ``projector.*``).
"""

from __future__ import annotations

import torch
from torch import nn

from gemma3vl.config import Gemma3Config
from gemma3vl.errors import Gemma3VLError
from gemma3vl.model.attention import TokenInfo
from gemma3vl.model.loss import linear_cross_entropy
from gemma3vl.model.projector import Projector
from gemma3vl.model.text import Cache, TextDecoder
from gemma3vl.model.vision import VisionTower


class Gemma3Model(nn.Module):
    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.config = config
        self.text = TextDecoder(config.text, softcap_logits=not config.is_vision_language)
        self.vision: VisionTower | None = None
        self.projector: Projector | None = None
        if config.vision is not None:
            self.vision = VisionTower(config.vision)
            self.projector = Projector(config)

    @property
    def image_token_id(self) -> int | None:
        return self.config.image_token_id if self.config.is_vision_language else None

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] normalised pixels -> [N, mm_tokens_per_image, D] soft tokens."""
        if self.vision is None or self.projector is None:
            raise Gemma3VLError("this is a text-only Gemma 3 checkpoint: it cannot take images")
        size = self.config.vision.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (self.config.vision.num_channels, size, size):
            raise Gemma3VLError(
                f"pixel_values has shape {tuple(pixel_values.shape)}, expected [N, "
                f"{self.config.vision.num_channels}, {size}, {size}]"
            )
        return self.projector(self.vision(pixel_values))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with each image's soft tokens written over its ``<image_soft_token>`` run."""
        embeds = self.text.embed_tokens(input_ids)
        image_token_id = self.image_token_id
        slots = (input_ids == image_token_id) if image_token_id is not None else None
        slot_count = int(slots.sum()) if slots is not None else 0
        if pixel_values is None:
            if slot_count:
                raise Gemma3VLError(f"the input has {slot_count} image soft tokens but no images were given")
            return embeds
        features = self.embed_images(pixel_values)
        if features.shape[0] * features.shape[1] != slot_count:
            raise Gemma3VLError(
                f"{features.shape[0]} image(s) give {features.shape[0] * features.shape[1]} soft tokens, but the "
                f"input has {slot_count} <image_soft_token> positions ({features.shape[1]} per image expected)"
            )
        return embeds.masked_scatter(slots[..., None], features.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        *,
        info: TokenInfo | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        logits_to_keep: int = 0,
        attention_backend: str | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] (or the last ``logits_to_keep`` positions).

        ``info`` is the mask description; by default it is derived from ``attention_mask`` (1 = real token)
        with images bidirectional inside their blocks, as transformers does with ``token_type_ids``.
        ``attention_backend`` overrides the decoder's ``attention_backend`` for this call only.
        """
        hidden = self.hidden_states(input_ids, pixel_values, info=info, attention_mask=attention_mask, cache=cache,
                                    attention_backend=attention_backend)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.text.logits(hidden)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        *,
        info: TokenInfo | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        attention_backend: str | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states [B, T, D]: what the training loss projects chunk by chunk."""
        if info is None:
            info = TokenInfo.for_tokens(input_ids, attention_mask=attention_mask, image_token_id=self.image_token_id)
        return self.text(self.embed(input_ids, pixel_values), info, cache, attention_backend=attention_backend)

    def loss(
        self, input_ids: torch.Tensor, targets: torch.Tensor, info: TokenInfo, pixel_values: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, int]:
        """(summed token cross-entropy, number of target tokens); never materialises full logits."""
        hidden = self.hidden_states(input_ids, pixel_values, info=info)
        return linear_cross_entropy(hidden, self.text.output_weight, targets, softcap=self.text.logit_softcap,
                                    compile_backend=self.text.loss_compile_backend)
