"""fastprompt: fast soft-prompt tuning (every PEFT soft-prompt method) for frozen causal LMs."""

import logging as _logging

__all__ = [
    "AutoFastPromptModelForCausalLM",
    "FastPromptModel",
    "get_peft_model",
    "load_model",
    "patch_peft",
    "unpatch_peft",
]
__version__ = "0.1.0"

_EXPORTS = {
    "AutoFastPromptModelForCausalLM": "auto",
    "FastPromptModel": "model",
    "get_peft_model": "model",
    "load_model": "loading",
    "patch_peft": "peft_patch",
    "unpatch_peft": "peft_patch",
}


class _BitsAndBytesNoiseFilter(_logging.Filter):
    """Two bitsandbytes (the optional "8bit" extra) warnings that say nothing
    to act on: at import, that the optional CPU/MPS kernels of the
    ``kernels-community`` hub repos could not be fetched (8-bit layers work
    without them); and, on every 8-bit layer of every inference call of a model
    that computes in fp32 or bf16 (fastprompt's default on a CPU, see
    ``loading.py``), that activations are cast to fp16 to be quantised, which
    is how its int8 matmul always works. Other bitsandbytes warnings pass.
    Nothing depends on this filter being installed before peft imports
    bitsandbytes: then the import line is bitsandbytes' own."""

    MISSING_KERNELS = "kernels-community"
    FP16_CAST = "MatMul8bitLt: inputs will be cast from"

    def filter(self, record: _logging.LogRecord) -> bool:
        message = str(record.msg)
        return self.MISSING_KERNELS not in message and not message.startswith(self.FP16_CAST)


for _name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.backends.mps.ops", "bitsandbytes.autograd._functions"):
    _logging.getLogger(_name).addFilter(_BitsAndBytesNoiseFilter())


def __getattr__(name):
    # Lazy: importing peft/transformers takes seconds, and `fastprompt --help`
    # or a bad CLI flag should not wait for them.
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
