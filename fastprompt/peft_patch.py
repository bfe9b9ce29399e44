"""``patch_peft()``: code that calls ``peft.get_peft_model`` gets fastprompt for soft prompts.

TRL's trainers (``SFTTrainer(peft_config=...)``), Trainer scripts and other
libraries build their PEFT model with ``peft.get_peft_model``, most of them
bound at import (``from peft import get_peft_model``). ``patch_peft`` replaces
that function wherever it is bound: in ``peft`` and ``peft.mapping_func``,
in every module already imported, and so in every module imported later
(they take it from ``peft``). The replacement returns a ``FastPromptModel``
for the configs fastprompt serves (prompt tuning, multitask prompt tuning,
P-tuning, prefix tuning on a causal LM) and calls PEFT's own function for
every other (LoRA, other task types, ``mixed=True``). ``unpatch_peft``
puts PEFT's function back everywhere. Both may be called any number of times.
"""

from __future__ import annotations

import functools
import sys

from .model import PEFTS_OWN
from .model import get_peft_model as fastprompt_get_peft_model

# PEFT's function and its replacement while patched.
_ORIGINAL = None
_PATCHED = None


def _serves(peft_config, kwargs) -> bool:
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType

    return (
        isinstance(peft_config, (PromptTuningConfig, PromptEncoderConfig, PrefixTuningConfig))
        and peft_config.task_type in (TaskType.CAUSAL_LM, "CAUSAL_LM")
        and not kwargs.get("mixed")
    )


def _rebind(old, new) -> None:
    """Every module attribute ``get_peft_model`` that is ``old`` becomes ``new``."""
    for module in list(sys.modules.values()):
        # vars(): a lazy module's __getattr__ would import what it names.
        namespace = getattr(module, "__dict__", None)
        if isinstance(namespace, dict) and namespace.get("get_peft_model") is old:
            module.get_peft_model = new


def _dispatching(original):
    @functools.wraps(original)
    def get_peft_model(model, peft_config, adapter_name: str = "default", *args, **kwargs):
        # PEFT's later parameters given by position (mixed first) go to PEFT, as mixed=True does.
        if args or not _serves(peft_config, kwargs):
            return original(model, peft_config, adapter_name, *args, **kwargs)
        return fastprompt_get_peft_model(model, peft_config, adapter_name=adapter_name, **kwargs)

    # fastprompt.get_peft_model builds with PEFT's own function, found here while patched.
    setattr(get_peft_model, PEFTS_OWN, original)

    return get_peft_model


def patch_peft() -> None:
    """Make ``peft.get_peft_model``, wherever it is bound, return a
    ``FastPromptModel`` for soft-prompt configs on causal LMs (PEFT's model
    for every other config). Idempotent; ``unpatch_peft`` undoes it."""
    global _ORIGINAL, _PATCHED
    import peft.mapping_func

    if _PATCHED is None:
        _ORIGINAL = peft.mapping_func.get_peft_model
        _PATCHED = _dispatching(_ORIGINAL)
    # Again when patched: modules that bound PEFT's function since (importlib.reload) are patched too.
    _rebind(_ORIGINAL, _PATCHED)


def unpatch_peft() -> None:
    """Put PEFT's own ``get_peft_model`` back wherever ``patch_peft`` bound fastprompt's."""
    global _ORIGINAL, _PATCHED
    if _PATCHED is None:
        return
    _rebind(_PATCHED, _ORIGINAL)
    _ORIGINAL = _PATCHED = None
