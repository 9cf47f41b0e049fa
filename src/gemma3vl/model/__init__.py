"""Plain ``nn.Module``s for Gemma 3: no parallelism inside (``gemma3vl.parallel`` applies it from outside)."""

from gemma3vl.model.attention import TokenInfo
from gemma3vl.model.vlm import Gemma3Model

__all__ = ["Gemma3Model", "TokenInfo"]
