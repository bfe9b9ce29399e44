"""The soft prompt: PEFT-exact initialisation and PEFT-format adapter files.

Initialisation follows PEFT's ``PromptEmbedding`` step for step, including the
order in which it draws from the global RNG (an ``nn.Embedding`` is built
first, then SAMPLE_VOCAB draws its ids), so the same ``torch.manual_seed``
gives the same tensor bit for bit — and leaves the RNG in the same state.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from peft import PeftConfig, PromptTuningConfig, PromptTuningInit, TaskType

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
PROMPT_KEY = "prompt_embeddings"


def prepare_config(config: PromptTuningConfig, base_model) -> PromptTuningConfig:
    """Validate ``config`` for ``base_model`` and fill the model-derived fields
    (token_dim, num_layers, ...) the way ``peft.get_peft_model`` does."""
    from peft.utils.other import _prepare_prompt_learning_config

    if not isinstance(config, PromptTuningConfig):
        raise TypeError(
            f"expected a peft.PromptTuningConfig, got {type(config).__name__}; "
            "fastprompt implements prompt tuning only"
        )
    if config.task_type not in (TaskType.CAUSAL_LM, "CAUSAL_LM"):
        raise ValueError(f"task_type must be CAUSAL_LM for fastprompt, got {config.task_type!r}")
    if not isinstance(config.num_virtual_tokens, int) or config.num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens must be an integer >= 1, got {config.num_virtual_tokens!r}")
    if config.num_transformer_submodules not in (None, 1):
        raise ValueError("a causal LM has one transformer submodule; num_transformer_submodules must be 1")
    embeddings = input_embeddings(base_model)
    config = copy.deepcopy(config)
    config.num_transformer_submodules = 1
    _prepare_prompt_learning_config(config, base_model.config)
    if config.token_dim != embeddings.embedding_dim:
        raise ValueError(
            f"prompt token_dim {config.token_dim} does not match the model's hidden size "
            f"{embeddings.embedding_dim}"
        )
    if config.prompt_tuning_init == PromptTuningInit.TEXT and not config.inference_mode:
        if not config.prompt_tuning_init_text:
            raise ValueError("prompt_tuning_init=TEXT needs prompt_tuning_init_text (the text was empty)")
        if not config.tokenizer_name_or_path:
            raise ValueError("prompt_tuning_init=TEXT needs tokenizer_name_or_path to tokenise the init text")
    return config


def input_embeddings(base_model) -> torch.nn.Embedding:
    get = getattr(base_model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if not isinstance(embeddings, torch.nn.Embedding):
        raise TypeError(
            f"{type(base_model).__name__} has no input embedding layer (get_input_embeddings() "
            f"returned {type(embeddings).__name__}); prompt tuning needs a token-embedding model"
        )
    return embeddings


def initial_prompt(config: PromptTuningConfig, embeddings: torch.nn.Embedding) -> torch.Tensor:
    """[P, H] fp32 prompt on the embeddings' device, exactly as PEFT initialises it."""
    count = config.num_virtual_tokens
    # PEFT constructs this Embedding before any init mode; doing the same keeps
    # the RNG stream (and so every later random draw) identical to PEFT's.
    prompt = torch.nn.Embedding(count, config.token_dim).weight.detach()
    if config.inference_mode:
        return prompt.to(embeddings.weight.device)
    if config.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB:
        ids = torch.randint(0, embeddings.num_embeddings, (count,), dtype=torch.long)
        return _embedding_rows(embeddings, ids)
    if config.prompt_tuning_init == PromptTuningInit.TEXT:
        return _embedding_rows(embeddings, _init_text_ids(config, count))
    return prompt.to(embeddings.weight.device)


def _init_text_ids(config: PromptTuningConfig, count: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    from .loading import resolve_model_path

    tokenizer_kwargs = dict(config.tokenizer_kwargs or {})
    tokenizer_kwargs.pop("trust_remote_code", None)
    path = resolve_model_path(config.tokenizer_name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **tokenizer_kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load the init-text tokenizer {path!r}: {err}") from None
    ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
    if not ids:
        raise ValueError("prompt_tuning_init_text tokenised to zero tokens")
    ids = (ids * math.ceil(count / len(ids)))[:count]
    return torch.tensor(ids, dtype=torch.long)


def _embedding_rows(embeddings: torch.nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        rows = embeddings(ids.to(embeddings.weight.device))
    return rows.detach().clone().to(torch.float32)


def save_adapter(directory, config: PromptTuningConfig, prompt: torch.Tensor) -> None:
    """Write PEFT's format: adapter_config.json + adapter_model.safetensors
    holding the single key ``prompt_embeddings``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    saved = copy.deepcopy(config)
    saved.inference_mode = True  # as PeftModel.save_pretrained records it
    saved.save_pretrained(str(directory))
    save_file(
        {PROMPT_KEY: prompt.detach().to(torch.float32).cpu().contiguous()},
        str(directory / ADAPTER_WEIGHTS),
        metadata={"format": "pt"},
    )


def load_adapter(directory) -> tuple[PromptTuningConfig, torch.Tensor]:
    """Read an adapter written by PEFT or by us. Errors name the file at fault."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"adapter directory {str(directory)!r} does not exist")
    config_file = directory / ADAPTER_CONFIG
    if not config_file.is_file():
        raise ValueError(f"adapter directory {str(directory)!r} has no {ADAPTER_CONFIG}")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from None
    if raw.get("peft_type") != "PROMPT_TUNING":
        raise ValueError(f"{config_file} describes a {raw.get('peft_type')!r} adapter, not PROMPT_TUNING")
    config = PeftConfig.from_pretrained(str(directory))
    prompt = _read_prompt_tensor(directory)
    expected = (config.num_virtual_tokens * (config.num_transformer_submodules or 1), config.token_dim)
    if tuple(prompt.shape) != expected:
        raise ValueError(
            f"{PROMPT_KEY} in {str(directory)!r} has shape {tuple(prompt.shape)}, "
            f"but its config says {expected}"
        )
    return config, prompt


def _read_prompt_tensor(directory: Path) -> torch.Tensor:
    safetensors_file = directory / ADAPTER_WEIGHTS
    bin_file = directory / ADAPTER_WEIGHTS_BIN
    if safetensors_file.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(safetensors_file))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{safetensors_file} is corrupt or unreadable: {err}") from None
        source = safetensors_file
    elif bin_file.is_file():
        try:
            state = torch.load(bin_file, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a damaged pickle/zip
            raise ValueError(f"{bin_file} is corrupt or unreadable: {err}") from None
        source = bin_file
    else:
        raise ValueError(f"adapter directory {str(directory)!r} has no {ADAPTER_WEIGHTS} or {ADAPTER_WEIGHTS_BIN}")
    if PROMPT_KEY not in state:
        raise ValueError(f"{source} has no {PROMPT_KEY!r} tensor (keys: {sorted(state)})")
    return state[PROMPT_KEY]
