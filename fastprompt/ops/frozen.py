"""The one rule every `pack_embed` backend shares about gradients: only the prompts get one.

Prompt tuning keeps the base model frozen, so no backend computes gradients for the embedding
table or the LayerNorm parameters. A backward that returned None for a tensor that requires grad
would leave it silently untrained, so such a call is refused before anything is computed.
"""

from __future__ import annotations

import torch


def check_frozen(weight: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None) -> None:
    """Raise ValueError when autograd would need a gradient for the table or a LayerNorm parameter.

    Without grad mode (generation, evaluation) nothing is differentiated, so any flags pass."""
    if not torch.is_grad_enabled():
        return
    named = (("weight", weight), ("ln_weight", ln_weight), ("ln_bias", ln_bias))
    trainable = [name for name, tensor in named if tensor is not None and tensor.requires_grad]
    if trainable:
        raise ValueError(
            "pack_embed treats the embedding table and the LayerNorm parameters as frozen and computes "
            f"the prompts' gradient only, but these require grad: {', '.join(trainable)}. Freeze them "
            "(requires_grad_(False)) or call it under torch.no_grad()."
        )
