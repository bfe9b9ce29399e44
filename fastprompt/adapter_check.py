"""Clear errors for a local adapter directory that cannot be loaded, before PEFT tries.

PEFT reads and loads adapters itself (``FastPromptModel.from_pretrained`` is
its ``from_pretrained``); its errors for a damaged directory are a
``KeyError`` deep in a state-dict load or a prompt of the wrong width that
fails only at the first forward. These checks name the file at fault instead.
"""

from __future__ import annotations

import json
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
PROMPT_KEY = "prompt_embeddings"
# What PEFT saves of each method with a fast path: the prompt (P-tuning's is its
# encoder's output, which PEFT loads into ``embedding.weight`` in inference mode)
# and a multitask adapter's per-task factors.
FAST_PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "PREFIX_TUNING")
TASK_KEYS = ("prefix_task_cols", "prefix_task_rows")


def check_adapter_directory(directory, model, subfolder: str | None = None) -> str:
    """Raise ValueError naming the problem if ``directory`` (a local path) is
    not a prompt-tuning, P-tuning, multitask or prefix-tuning adapter that fits
    ``model`` (its hidden size; a prefix, its layers and K/V width). Returns
    its ``peft_type``."""
    directory = Path(directory).expanduser() / (subfolder or "")
    if not directory.is_dir():
        raise ValueError(f"adapter directory {str(directory)!r} does not exist")
    config_file = directory / ADAPTER_CONFIG
    if not config_file.is_file():
        raise ValueError(f"adapter directory {str(directory)!r} has no {ADAPTER_CONFIG}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from None
    if config.get("peft_type") not in FAST_PEFT_TYPES:
        raise ValueError(
            f"{config_file} describes a {config.get('peft_type')!r} adapter; fastprompt loads "
            f"{', '.join(FAST_PEFT_TYPES)} adapters (use peft.PeftModel.from_pretrained for other methods)"
        )
    hidden, what = model.get_input_embeddings().embedding_dim, "hidden size"
    if config["peft_type"] == "PREFIX_TUNING":
        hidden, what = _prefix_width(model.config.get_text_config()), "key/value width"
        layers = model.config.get_text_config().num_hidden_layers
        if config.get("num_layers") != layers:
            raise ValueError(
                f"prefix adapter in {str(directory)!r} has num_layers {config.get('num_layers')}, "
                f"but the model has {layers} layers"
            )
    if config.get("token_dim") != hidden:
        raise ValueError(
            f"adapter in {str(directory)!r} has token_dim {config.get('token_dim')}, but the model's {what} is {hidden}"
        )
    virtual = config["num_virtual_tokens"] * (config.get("num_transformer_submodules") or 1)
    width = config["token_dim"]
    if config["peft_type"] == "PREFIX_TUNING":
        width *= 2 * config["num_layers"]  # saved as the encoder's output: every layer's key and value
    expected = {PROMPT_KEY: (virtual, width)}
    if config["peft_type"] == "MULTITASK_PROMPT_TUNING":
        tasks, ranks = config.get("num_tasks"), config.get("num_ranks")
        expected.update(zip(TASK_KEYS, ((tasks, virtual, ranks), (tasks, ranks, config["token_dim"]))))
    shapes = _shapes(directory, tuple(expected))
    for key, shape in expected.items():
        if shapes[key] != shape:
            raise ValueError(f"{key} in {str(directory)!r} has shape {shapes[key]}, but its config says {shape}")
    return config["peft_type"]


def _prefix_width(config) -> int:
    """A layer's key (or value) width, as PEFT sizes a prefix: head size times K/V heads."""
    heads = config.num_attention_heads
    return config.hidden_size // heads * (getattr(config, "num_key_value_heads", None) or heads)


def _shapes(directory: Path, keys: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """The shapes of the tensors ``keys`` in the adapter's weights file."""
    safetensors_file = directory / ADAPTER_WEIGHTS
    bin_file = directory / ADAPTER_WEIGHTS_BIN
    if safetensors_file.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(safetensors_file), framework="pt") as handle:
                for key in keys:
                    if key not in handle.keys():
                        raise ValueError(f"{safetensors_file} has no {key!r} tensor (keys: {sorted(handle.keys())})")
                return {key: tuple(handle.get_slice(key).get_shape()) for key in keys}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{safetensors_file} is corrupt or unreadable: {err}") from None
    if bin_file.is_file():
        import torch

        try:
            state = torch.load(bin_file, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a damaged pickle/zip
            raise ValueError(f"{bin_file} is corrupt or unreadable: {err}") from None
        for key in keys:
            if key not in state:
                raise ValueError(f"{bin_file} has no {key!r} tensor (keys: {sorted(state)})")
        return {key: tuple(state[key].shape) for key in keys}
    raise ValueError(f"adapter directory {str(directory)!r} has no {ADAPTER_WEIGHTS} or {ADAPTER_WEIGHTS_BIN}")
