"""TRL's fused LM head (``model(..., labels=labels, fused_lm_head=True)``), served on the fast path.

TRL's trainers (``SFTTrainer`` on every step) patch the base model with
``trl.trainer.utils.add_fused_lm_head`` and ask for per-token outputs instead
of logits. Through PEFT's forward the patched base model receives
``cat(prompt, tokens)`` with labels ``cat(-100·P, labels)`` and returns
``FusedCausalLMOutput``: per-token fields of shape [B, P+T-1], zero where the
shifted label is -100. Here the same fields come from the label-only pass
(``loss.prefix_token_log_probs``), laid out as PEFT's call lays them out.

What TRL configured is read from the patched forward's closure: a
temperature, logit scale or fp32 cast other than none, or a per-token field
other than ``SERVED_OUTPUTS``, makes the call run PEFT's code, which runs
TRL's head as written. The entropy is returned without a gradient (SFTTrainer
logs it detached; TRL's own head would differentiate it).
"""

from __future__ import annotations

import torch

# The per-token fields computed here (SFTTrainer's: its loss, entropy and token accuracy).
SERVED_OUTPUTS = frozenset({"log_probs", "entropy", "is_top1"})


def _head_settings(base_model) -> dict | None:
    """The variables of the fused forward TRL put on ``base_model``, or None (not TRL's head)."""
    forward = vars(base_model).get("forward")
    function = getattr(forward, "__func__", None)
    code = getattr(function, "__code__", None)
    if code is None or code.co_name != "_fused_forward" or not function.__closure__:
        return None
    try:
        return {name: cell.cell_contents for name, cell in zip(code.co_freevars, function.__closure__)}
    except ValueError:  # an empty cell
        return None


def refusal(base_model) -> str | None:
    """Why the fast path cannot serve ``fused_lm_head=True`` on ``base_model``, or None."""
    settings = _head_settings(base_model)
    if settings is None:
        return "fused_lm_head=True without TRL's fused head on the base model (trl.trainer.utils.add_fused_lm_head)"
    if not {"temperature", "logit_scale", "cast_lm_head_to_fp32", "outputs"} <= set(settings):
        return "fused_lm_head=True: this TRL version's fused head settings are unknown to fastprompt"
    if settings["temperature"] != 1.0 or settings["logit_scale"] != 1.0 or settings["cast_lm_head_to_fp32"]:
        return "fused_lm_head=True with a temperature, logit scale or fp32 cast of TRL's head"
    extra = sorted(set(settings["outputs"]) - SERVED_OUTPUTS)
    if extra:
        return f"fused_lm_head=True asking for {extra}"
    return None


def fused_output(base_model, per_label, labels, num_virtual_tokens: int, num_items_in_batch=None):
    """TRL's ``FusedCausalLMOutput`` for ``per_label`` = (log-probabilities,
    entropy, is-argmax), each [B, T] per label of ``labels`` [B, T], as PEFT's
    call through TRL's head returns it: [B, P-1+T], the virtual tokens' P-1
    shifted labels first (all -100), and the loss TRL's head computes. A
    learned prefix (prefix tuning, ``num_virtual_tokens`` 0) has no virtual
    positions: [B, T-1], the first label predicted by none."""
    from trl.trainer.utils import FusedCausalLMOutput

    requested = set(_head_settings(base_model)["outputs"])
    labels = labels.to(per_label[0].device)

    def peft_layout(values):
        if num_virtual_tokens == 0:
            return values[:, 1:]
        return torch.cat([values.new_zeros(values.shape[0], num_virtual_tokens - 1), values], dim=1)

    log_probs, entropy, is_top1 = (peft_layout(values) for values in per_label)
    label_mask = peft_layout(labels != -100)
    count = label_mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedCausalLMOutput(
        loss=-log_probs.sum() / count,
        log_probs=log_probs,
        entropy=entropy.detach() if "entropy" in requested else None,
        is_top1=is_top1 if "is_top1" in requested else None,
        label_mask=label_mask,
    )
