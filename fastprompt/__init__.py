"""fastprompt: fast soft-prompt tuning (PEFT PROMPT_TUNING, P_TUNING, MULTITASK_PROMPT_TUNING) for frozen causal LMs."""

import logging as _logging

__all__ = ["FastPromptModel", "get_peft_model", "load_model", "patch_peft", "unpatch_peft"]
__version__ = "0.1.0"

_EXPORTS = {
    "FastPromptModel": "model",
    "get_peft_model": "model",
    "load_model": "loading",
    "patch_peft": "peft_patch",
    "unpatch_peft": "peft_patch",
}


class _OptionalHubKernelFilter(_logging.Filter):
    """bitsandbytes (the optional "8bit" extra) tries, at import, to fetch optional
    CPU/MPS kernels from the ``kernels-community`` hub repos and logs a warning
    when it cannot. 8-bit layers work without them, so the line is noise; other
    bitsandbytes warnings pass. Nothing depends on this filter being installed
    before peft imports bitsandbytes: then the line is bitsandbytes' own."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "kernels-community" not in str(record.msg)


for _name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.backends.mps.ops"):
    _logging.getLogger(_name).addFilter(_OptionalHubKernelFilter())


def __getattr__(name):
    # Lazy: importing peft/transformers takes seconds, and `fastprompt --help`
    # or a bad CLI flag should not wait for them.
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
