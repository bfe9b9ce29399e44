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
FAST_PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING")
TASK_KEYS = ("prefix_task_cols", "prefix_task_rows")


def check_adapter_directory(directory, model, subfolder: str | None = None) -> None:
    """Raise ValueError naming the problem if ``directory`` (a local path) is
    not a prompt-tuning, P-tuning or multitask prompt-tuning adapter that fits
    ``model``'s hidden size."""
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
    hidden = model.get_input_embeddings().embedding_dim
    if config.get("token_dim") != hidden:
        raise ValueError(
            f"adapter in {str(directory)!r} has token_dim {config.get('token_dim')}, "
            f"but the model's hidden size is {hidden}"
        )
    virtual = config["num_virtual_tokens"] * (config.get("num_transformer_submodules") or 1)
    expected = {PROMPT_KEY: (virtual, config["token_dim"])}
    if config["peft_type"] == "MULTITASK_PROMPT_TUNING":
        tasks, ranks = config.get("num_tasks"), config.get("num_ranks")
        expected.update(zip(TASK_KEYS, ((tasks, virtual, ranks), (tasks, ranks, config["token_dim"]))))
    shapes = _shapes(directory, tuple(expected))
    for key, shape in expected.items():
        if shapes[key] != shape:
            raise ValueError(f"{key} in {str(directory)!r} has shape {shapes[key]}, but its config says {shape}")


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
