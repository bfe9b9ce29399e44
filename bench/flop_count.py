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
prefix tuning runs B·T positions, each attending to P extra keys per layer,
so only attention grows with P.

Each method's prompt comes from its parameters (``prompt_encoder``): prompt
tuning's is the parameter itself; P-tuning runs an MLP over the P virtual
tokens, which PEFT's ``get_prompt`` runs once per batch and repeats for the
rows (since PEFT issue 2043), as fastprompt does; multitask prompt tuning
scales the table by a rank-r product of its task's matrices, which PEFT runs
once per row and fastprompt once per distinct task of the batch (whose
prompts, A of them, fastprompt also runs through the body once each); prefix
tuning's K/V are stored (an embedding lookup, no FLOPs) or projected by an MLP,
which PEFT runs once per row. fastprompt's prefix tuning, as planned (issue 21):
the padding-free packed pass over each row's real tokens, each attending to
the P stored keys and its own earlier tokens, the projection once per batch,
``lm_head`` on labelled positions only.
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
    prompts: int = 1,
) -> int:
    """One step over a [batch, tokens] batch with ``labelled`` labels != -100;
    ``lengths``: each row's real tokens when the rows are padded to ``tokens``
    (None: no padding). ``contender``: "peft" (prompt tuning) or "fastprompt",
    whose pass runs ``prompts`` distinct prompts (a multitask batch's tasks)."""
    length = prompt + tokens
    if contender == "peft":
        return body(dims, batch * length, length, True) + head(dims, batch * length, True)
    lengths = lengths or [tokens] * batch
    if batch == 1:
        work = body(dims, prompt + lengths[0], prompt + lengths[0], True)
    else:
        work = prompts * body(dims, prompt, prompt, True)
        work += sum(body(dims, real, prompt + real, True) for real in lengths)
    return work + head(dims, labelled, True)


def lora_extra(dims: Dims, positions: int, rank: int) -> int:
    """LoRA's own FLOPs on q_proj and v_proj: x·A then ·B per position, three
    times over in a step (forward, input gradient, and the gradients of A and B,
    which are trained)."""
    query = dims.hidden + dims.heads * dims.head_dim  # A is hidden x r, B is r x the projection's outputs
    value = dims.hidden + dims.kv_heads * dims.head_dim
    per_position = 2 * rank * (query + value)
    return 3 * dims.layers * positions * per_position


def trained_mlp(positions: int, widths: list[int]) -> int:
    """A chain of trained linear layers of ``widths`` (in, hidden..., out) over
    ``positions``: forward, input gradient and weight gradient, three matmuls each."""
    return 3 * 2 * positions * sum(a * b for a, b in zip(widths, widths[1:]))


# The methods whose prompt goes in front of the tokens, through the body (prefix tuning's goes into the
# attention cache, LoRA has none).
PROMPT_METHODS = ("prompt_tuning", "p_tuning", "multitask_prompt_tuning")


def prompt_encoder(dims: Dims, method: str, virtual: int, encoder_hidden: int | None = None, task_rank: int = 1) -> int:
    """FLOPs of a step's computing one prompt of ``virtual`` tokens from
    ``method``'s parameters. P-tuning: PEFT's MLP encoder, hidden ->
    ``encoder_hidden`` (None: PEFT's default, the hidden size) -> itself ->
    hidden; multitask prompt tuning: its task's [P, r] x [r, hidden] product
    (``task_rank`` r; the elementwise scaling of the table left out); prefix
    tuning: nothing without a projection (``encoder_hidden`` None), else PEFT's
    two-layer MLP from the K/V width to every layer's keys and values."""
    if method == "prompt_tuning" or (method == "prefix_tuning" and encoder_hidden is None):
        return 0
    if method == "p_tuning":
        width = encoder_hidden or dims.hidden
        return trained_mlp(virtual, [dims.hidden, width, width, dims.hidden])
    if method == "multitask_prompt_tuning":
        return 3 * 2 * virtual * task_rank * dims.hidden
    if method == "prefix_tuning":
        kv_width = dims.kv_heads * dims.head_dim
        return trained_mlp(virtual, [kv_width, encoder_hidden, dims.layers * 2 * kv_width])
    raise ValueError(f"unknown method {method!r}")


def method_step(
    dims: Dims,
    contender: str,
    *,
    batch: int,
    prompt: int,
    tokens: int,
    labelled: int,
    lengths: list[int] | None = None,
    prompts: int = 1,
    rank: int = 32,
    encoder_hidden: int | None = None,
    task_rank: int = 1,
) -> int:
    """One training step of ``contender``, "peft_<method>" or
    "fastprompt_<method>", on a [batch, tokens] batch padded to ``tokens``.
    Methods: those of ``PROMPT_METHODS`` (the body and ``lm_head`` as
    ``training_step`` counts them, plus the prompt's encoder: P-tuning's once a
    step, multitask prompt tuning's per row in PEFT and per distinct task,
    ``prompts``, in fastprompt); "prefix_tuning" (``prompt`` stored keys and
    values in every layer, their encoder per row in PEFT and once in
    fastprompt); "lora" (PEFT's only: rank ``rank`` on q_proj/v_proj, no virtual
    tokens). ``encoder_hidden`` and ``task_rank``: ``prompt_encoder``'s."""
    runner, _, method = contender.partition("_")
    if runner not in ("peft", "fastprompt") or (runner == "fastprompt" and method == "lora"):
        raise ValueError(f"unknown contender {contender!r}")
    lengths = lengths or [tokens] * batch
    if method == "lora":
        positions = batch * tokens
        return body(dims, positions, tokens, True) + lora_extra(dims, positions, rank) + head(dims, positions, True)
    encoder = prompt_encoder(dims, method, prompt, encoder_hidden, task_rank)
    per_row = method in ("prefix_tuning", "multitask_prompt_tuning")
    encoders = (batch if per_row else 1) if runner == "peft" else prompts
    if method == "prefix_tuning":
        if runner == "peft":
            work = body(dims, batch * tokens, prompt + tokens, True) + head(dims, batch * tokens, True)
        else:
            work = sum(body(dims, real, prompt + real, True) for real in lengths) + head(dims, labelled, True)
        return work + encoders * encoder
    shape = dict(batch=batch, prompt=prompt, tokens=tokens, labelled=labelled, lengths=lengths)
    return training_step(dims, runner, **shape, prompts=prompts) + encoders * encoder


def training_bound(dims: Dims, steps: Iterable[dict], fast_path: bool = True, method: str = "prompt_tuning") -> float:
    """PEFT's FLOPs over fastprompt's for ``method``, summed over the same steps
    (each a dict of ``method_step``'s keyword arguments), as the measured ratio sums time."""
    steps = list(steps)
    ours = "fastprompt" if fast_path else "peft"
    return sum(method_step(dims, f"peft_{method}", **s) for s in steps) / sum(
        method_step(dims, f"{ours}_{method}", **s) for s in steps
    )


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
