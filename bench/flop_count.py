"""How much faster fastprompt can be than PEFT by the work alone: a FLOP count
of each contender's step, and their ratio (the "FLOP bound" of the tables).

Counted: each decoder layer's weight matmuls (Q, K, V, attention output, MLP)
and attention's two products (Q·Kᵀ and weights·V), dense over the key length,
because both contenders compute full masked scores and neither skips a masked
block; and ``lm_head``. Left out: embeddings, norms, activations, softmax and
cross-entropy. They are elementwise and cost no FLOPs to speak of, but on a
CPU their memory traffic is real time, which is one reason a measured ratio
can sit above or below the bound.

A training step is the forward pass plus the backward pass of a frozen model,
which needs activation gradients only: each weight matmul runs once more (the
input gradient; no weight gradient), each attention product twice more (the
gradients of both of its operands).

Where the contenders differ (``README.md``, "How it works"):
PEFT runs the body on B·(P+T) positions and ``lm_head`` on all of them.
fastprompt runs the P prompt positions once per batch and the B·T token
positions against their shared K/V (at B = 1, one pass over P+T), and
``lm_head`` only on labelled positions when training. A trained prompt may
run packed with the tokens in one sequence (``fastprompt/paths/generic.py``),
whose attention scores all N^2 pairs; that extra is not counted, so the
bound stays the one of the work needed, and packing has to earn its place
against it. Generation: the prefill
computes ``lm_head`` on each row's last position in both; fastprompt's cached
prefix skips the prompt positions altogether, a cold cache runs them once.
A family without a fast path in fastprompt (``fast_path=False``) runs PEFT's
code, so its bound is 1.

Ragged batches (rows of different real lengths, padded to the longest row T):
PEFT computes every padded position, B·(P+T); fastprompt's packed pass needs
only P + Σ len_i (each row's real tokens over its prompt and its own earlier
tokens). The method comparison (``bench_method_comparison.py``) adds PEFT's
other methods on the same batches: LoRA runs B·T positions plus its rank-r
matrices on q_proj and v_proj (trained: their weight gradients count too);
prefix tuning runs B·T positions, each attending to P extra keys per layer
(stored keys and values: no projection), so only attention grows with P.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Dims:
    """The sizes a FLOP count needs, from any decoder-only config."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    mlp_matrices: int  # 2 for BLOOM's up/down MLP, 3 for a gated (SwiGLU) one
    vocab: int

    @classmethod
    def from_config(cls, config) -> Dims:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if config.model_type == "bloom":
            return cls(
                config.hidden_size,
                config.num_hidden_layers,
                heads,
                heads,
                head_dim,
                4 * config.hidden_size,
                2,
                config.vocab_size,
            )
        return cls(
            config.hidden_size,
            config.num_hidden_layers,
            heads,
            config.num_key_value_heads,
            head_dim,
            config.intermediate_size,
            3,
            config.vocab_size,
        )

    @property
    def layer_weights(self) -> int:
        """Weights of one layer's matmuls: multiply-adds per position."""
        query_and_output = 2 * self.hidden * self.heads * self.head_dim
        key_value = 2 * self.hidden * self.kv_heads * self.head_dim
        return query_and_output + key_value + self.mlp_matrices * self.hidden * self.intermediate


def body(dims: Dims, queries: int, keys: int, backward: bool) -> int:
    """FLOPs of ``queries`` positions, each attending to ``keys`` keys, through
    every layer; with ``backward``, forward plus activation gradients."""
    weights = 2 * queries * dims.layer_weights
    attention = 2 * 2 * queries * keys * dims.heads * dims.head_dim
    if backward:
        weights, attention = 2 * weights, 3 * attention
    return dims.layers * (weights + attention)


def head(dims: Dims, rows: int, backward: bool) -> int:
    flops = 2 * rows * dims.hidden * dims.vocab
    return 2 * flops if backward else flops


def training_step(
    dims: Dims,
    contender: str,
    *,
    batch: int,
    prompt: int,
    tokens: int,
    labelled: int,
    lengths: list[int] | None = None,
) -> int:
    """One step over a [batch, tokens] batch with ``labelled`` labels != -100;
    ``lengths``: each row's real tokens when the rows are padded to ``tokens``
    (None: no padding). ``contender``: "peft" (prompt tuning) or "fastprompt"."""
    length = prompt + tokens
    if contender == "peft":
        return body(dims, batch * length, length, True) + head(dims, batch * length, True)
    lengths = lengths or [tokens] * batch
    if batch == 1:
        work = body(dims, prompt + lengths[0], prompt + lengths[0], True)
    else:
        work = body(dims, prompt, prompt, True) + sum(body(dims, real, prompt + real, True) for real in lengths)
    return work + head(dims, labelled, True)


def lora_extra(dims: Dims, positions: int, rank: int) -> int:
    """LoRA's own FLOPs on q_proj and v_proj: x·A then ·B per position, three
    times over in a step (forward, input gradient, and the gradients of A and B,
    which are trained)."""
    query = dims.hidden + dims.heads * dims.head_dim  # A is hidden x r, B is r x the projection's outputs
    value = dims.hidden + dims.kv_heads * dims.head_dim
    per_position = 2 * rank * (query + value)
    return 3 * dims.layers * positions * per_position


def method_step(dims: Dims, method: str, *, batch: int, prompt: int, tokens: int, labelled: int, lengths=None, rank=32):
    """One training step of a PEFT method on a [batch, tokens] batch padded to
    ``tokens``: "prompt_tuning" (PEFT), "fastprompt" (``training_step``'s),
    "lora" (rank ``rank`` on q_proj/v_proj; no virtual tokens) or
    "prefix_tuning" (``prompt`` stored keys/values in every layer)."""
    if method in ("prompt_tuning", "fastprompt"):
        contender = "peft" if method == "prompt_tuning" else "fastprompt"
        return training_step(
            dims, contender, batch=batch, prompt=prompt, tokens=tokens, labelled=labelled, lengths=lengths
        )
    positions = batch * tokens
    if method == "lora":
        return body(dims, positions, tokens, True) + lora_extra(dims, positions, rank) + head(dims, positions, True)
    if method == "prefix_tuning":
        return body(dims, positions, prompt + tokens, True) + head(dims, positions, True)
    raise ValueError(f"unknown method {method!r}")


def training_bound(dims: Dims, steps: Iterable[dict], fast_path: bool = True) -> float:
    """PEFT's FLOPs over fastprompt's, summed over the same steps (each a dict
    of ``training_step``'s keyword arguments), as the measured ratio sums time."""
    steps = list(steps)
    ours = "fastprompt" if fast_path else "peft"
    return sum(training_step(dims, "peft", **s) for s in steps) / sum(training_step(dims, ours, **s) for s in steps)


def prefill(dims: Dims, contender: str, *, batch: int, prompt: int, tokens: int) -> int:
    """Generation's first forward, up to the first token's logits. Contenders:
    ``peft`` (prompt re-run for every row), ``fastprompt`` (prefix cached),
    ``fastprompt_cold`` (prefix run once, at batch 1)."""
    length = prompt + tokens
    if contender == "peft":
        work = body(dims, batch * length, length, False)
    else:
        work = body(dims, batch * tokens, length, False)
        if contender == "fastprompt_cold":
            work += body(dims, prompt, prompt, False)
    return work + head(dims, batch, False)


def decode(dims: Dims, *, batch: int, keys: int) -> int:
    """One decode step, the same for every contender: each row's new token
    attends to ``keys`` keys, prompt included."""
    return body(dims, batch, keys, False) + head(dims, batch, False)
