"""The prompts a call reads, for each prompt-learning method with a fast path, computed as PEFT's ``get_prompt`` does.

Every fast pass takes prompts as tensors [A, P, H], so a method only decides
how its adapter turns into them:

* prompt tuning (``PROMPT_TUNING``): the prompt is the encoder's table,
  ``prompt_encoder[adapter].embedding.weight``;
* P-tuning (``P_TUNING``, MLP or LSTM reparameterisation): the encoder run once
  on the virtual-token indices, ``prompt_encoder(prompt_tokens[:1])``, as PEFT
  runs it before repeating it for the rows; so its random draws (LSTM dropout in
  training) are PEFT's. In inference mode PEFT keeps no encoder heads and reads
  the saved output from ``embedding.weight``, as here;
* multitask prompt tuning (``MULTITASK_PROMPT_TUNING``): one prompt per distinct
  task of the call, ``embedding(indices) * (prefix_task_cols[t] @ prefix_task_rows[t])``,
  by the encoder's own forward; rows of one task share it.

Prefix tuning (``PREFIX_TUNING``) puts no prompt in front of the embeddings:
its encoder's output is every layer's key and value for P virtual positions,
which no layer computes (``learned_prefix``), the prefix a prompt's pass would
otherwise produce. The encoder runs once per call, on one row, where PEFT
runs it on every row of the batch.
"""

from __future__ import annotations

import torch
from peft import PeftType

from .prefix import Prefix

FAST_METHODS = frozenset(
    {PeftType.PROMPT_TUNING, PeftType.P_TUNING, PeftType.MULTITASK_PROMPT_TUNING, PeftType.PREFIX_TUNING}
)
# Methods whose adapter has one prompt, whatever the row: they mix in one batch through ``adapter_names``.
ONE_PROMPT_METHODS = frozenset({PeftType.PROMPT_TUNING, PeftType.P_TUNING})


def _prompt_tokens(peft_model, adapter: str, rows: int) -> torch.Tensor:
    encoder = peft_model.prompt_encoder[adapter]
    return peft_model.prompt_tokens[adapter].to(encoder.embedding.weight.device).expand(rows, -1)


def adapter_prompt(peft_model, adapter: str) -> torch.Tensor:
    """[P, H]: the prompt every row of a prompt-tuning or P-tuning ``adapter`` reads."""
    config = peft_model.peft_config[adapter]
    encoder = peft_model.prompt_encoder[adapter]
    if config.peft_type == PeftType.PROMPT_TUNING or (config.peft_type == PeftType.P_TUNING and config.inference_mode):
        return encoder.embedding.weight
    if config.peft_type == PeftType.P_TUNING:
        return encoder(_prompt_tokens(peft_model, adapter, 1))[0]
    if config.peft_type == PeftType.MULTITASK_PROMPT_TUNING:
        raise ValueError(f"{adapter!r} is a multitask prompt tuning adapter: its prompt depends on the task")
    raise ValueError(
        f"{adapter!r} is a {config.peft_type} adapter, which has no prompt in front of the tokens (its encoder gives "
        "every layer's keys and values)"
    )


def prefix_encoding(peft_model, adapter: str) -> torch.Tensor:
    """[1, P, layers * 2 * kv_dim]: a prefix-tuning ``adapter``'s encoder output
    for one row, as PEFT's ``get_prompt`` computes it for each row (the saved
    table in inference mode), in the base model's dtype."""
    config = peft_model.peft_config[adapter]
    encoder = peft_model.prompt_encoder[adapter]
    if config.inference_mode:
        encoding = encoder.embedding.weight[None]
    else:
        tokens = peft_model.prompt_tokens[adapter][: config.num_virtual_tokens]
        encoding = encoder(tokens.to(encoder.embedding.weight.device)[None])
    dtype = peft_model.base_model_torch_dtype
    return encoding if dtype is None else encoding.to(dtype)


def learned_prefix(config, encoding: torch.Tensor) -> Prefix:
    """A prefix-tuning encoding [1, P, layers * 2 * kv_dim] as the per-layer
    (key, value) [1, kv_heads, P, head_dim] it stands for, laid out as PEFT's
    ``get_prompt`` lays it out for the cache: layer l's key is slice 2l, its
    value 2l + 1. Views of the encoding: its gradient reaches the encoder."""
    heads = config.num_attention_heads
    per_layer = encoding.view(
        1, config.num_virtual_tokens, config.num_layers * 2, heads, config.token_dim // heads
    ).permute(2, 0, 3, 1, 4)
    return Prefix(None, [(per_layer[2 * layer], per_layer[2 * layer + 1]) for layer in range(config.num_layers)])


def task_prompts(peft_model, adapter: str, tasks: tuple[int, ...]) -> torch.Tensor:
    """[len(tasks), P, H]: the multitask ``adapter``'s prompt of each task."""
    encoder = peft_model.prompt_encoder[adapter]
    task_ids = torch.tensor(tasks, dtype=torch.long, device=encoder.embedding.weight.device)
    return encoder(_prompt_tokens(peft_model, adapter, len(tasks)), task_ids)


def rows_prompts(peft_model, adapter: str, task_ids: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows, P, H]: the multitask ``adapter``'s prompts as PEFT's ``get_prompt``
    makes them, one encoder call over every row (what a hook on the encoder
    must see)."""
    encoder = peft_model.prompt_encoder[adapter]
    return encoder(_prompt_tokens(peft_model, adapter, rows), task_ids.to(encoder.embedding.weight.device))


def distinct_tasks(task_ids, rows: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(tasks, task_of_row): the distinct tasks of ``task_ids`` in order of
    first appearance, and each row's index into them. ``task_ids`` holds one
    task per row, or one for every row (PEFT broadcasts it). Reads the ids to
    the host once: the rows' layout is planned there."""
    if not torch.is_tensor(task_ids):
        raise TypeError(f"task_ids must be a tensor of one task per row, got {type(task_ids).__name__}")
    if task_ids.dim() != 1 or task_ids.dtype not in (torch.int64, torch.int32) or task_ids.numel() not in (1, rows):
        raise ValueError(
            f"task_ids must be a 1-D integer tensor of one task per row ({rows} rows) or one for all, "
            f"got shape {tuple(task_ids.shape)} {task_ids.dtype}"
        )
    per_row = task_ids.tolist()
    tasks = tuple(dict.fromkeys(per_row))
    index = {task: i for i, task in enumerate(tasks)}
    return tasks, tuple(index[task] for task in per_row) if len(per_row) == rows else (0,) * rows
