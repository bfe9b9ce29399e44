"""A soft prompt's prefix: what every layer attends to before the tokens.

Computed by a path from the prompts (``prefix_cache.PrefixSource``), or
learned as it is by prefix tuning (``prompt_methods.learned_prefix``); kept by
the prefix cache and handed to the passes in a ``PromptBatch``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Prefix:
    """The prompts after the body, one row per adapter: ``final`` [A, P, H] is
    the body's last hidden state (after its final norm), ``kv`` the per-layer
    (key, value) [A, kv_heads, P, head_dim]. A prefix-tuning adapter's prefix
    is learned, not computed by the body: it has ``kv`` only (``final`` None)."""

    final: torch.Tensor | None
    kv: list[tuple[torch.Tensor, torch.Tensor]]
