"""Torch reference for the fused embedding op, the packer.

`pack_embed_reference` is the single definition of what every backend of
`pack_embed` (Triton, native C++/CUDA) must compute. Tests and benchmarks
import it from here; nothing else re-implements it.

    out[:A*P]  = LN(prompts.reshape(A*P, H))            (LN only when ln_weight is given)
    out[A*P:]  = LN(weight[input_ids.flatten()[token_index]])

LayerNorm statistics are taken in fp32 and the result is cast back to the
embedding dtype, which is what BLOOM's `word_embeddings_layernorm` does under
autocast-free bf16/fp16 (nn.LayerNorm upcasts internally on CUDA and CPU).

Gradients are plain autograd's. The backends differentiate `prompts` only (the
table and LayerNorm are frozen, `frozen.py`), so that is the one gradient they
are checked against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pack_embed_reference(
    input_ids: torch.Tensor,
    token_index: torch.Tensor,
    prompts: torch.Tensor,
    weight: torch.Tensor,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """The packed sequence's embeddings [A*P + K, H]: the A prompts [A, P, H]
    row after row, then ``weight[input_ids.flatten()[token_index]]``, each
    position LayerNorm'ed when ``ln_weight`` is given."""
    hidden = weight.shape[1]
    tokens = F.embedding(input_ids.reshape(-1).index_select(0, token_index), weight)
    rows = torch.cat([prompts.reshape(-1, hidden).to(weight.dtype), tokens])
    if ln_weight is None:
        return rows
    normed = F.layer_norm(rows.float(), (hidden,), ln_weight.float(), None if ln_bias is None else ln_bias.float(), eps)
    return normed.to(weight.dtype)
