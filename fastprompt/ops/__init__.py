"""Fused embedding + prompt concat (+ LayerNorm). Backends load lazily: no triton import here."""

from .dispatch import backend_info, embed_concat
from .reference import embed_concat_reference

__all__ = ["backend_info", "embed_concat", "embed_concat_reference"]
