"""The packer (prompts + kept token embeddings + optional LayerNorm in one op, backends loaded lazily:
no triton import here), and the gated-MLP activation that saves less for backward."""

from .dispatch import backend_info, pack_embed
from .gated_activation import ACTIVATIONS, gated_activation
from .packing import PackLayout, pack_layout
from .reference import pack_embed_reference

__all__ = [
    "ACTIVATIONS",
    "PackLayout",
    "backend_info",
    "gated_activation",
    "pack_embed",
    "pack_embed_reference",
    "pack_layout",
]
