"""fastprompt: fast soft-prompt tuning (PEFT PROMPT_TUNING) for frozen causal LMs."""

__all__ = ["FastPromptModel", "get_peft_model", "load_model"]
__version__ = "0.1.0"

_EXPORTS = {"FastPromptModel": "model", "get_peft_model": "model", "load_model": "loading"}


def __getattr__(name):
    # Lazy: importing peft/transformers takes seconds, and `fastprompt --help`
    # or a bad CLI flag should not wait for them.
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
