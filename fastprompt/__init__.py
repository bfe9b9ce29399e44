"""fastprompt: fast soft-prompt tuning (PEFT PROMPT_TUNING) for frozen causal LMs."""

from .loading import load_model
from .model import FastPromptModel, get_peft_model

__all__ = ["FastPromptModel", "get_peft_model", "load_model"]
__version__ = "0.1.0"
