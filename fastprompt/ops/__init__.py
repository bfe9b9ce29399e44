"""Fused embedding + prompt concat (+ LayerNorm), backends loaded lazily (no triton import here); and the
gated-MLP activation that saves less for backward."""

from .dispatch import backend_info, embed_concat
from .gated_activation import ACTIVATIONS, gated_activation
from .reference import embed_concat_reference

__all__ = ["ACTIVATIONS", "backend_info", "embed_concat", "embed_concat_reference", "gated_activation"]
