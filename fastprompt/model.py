"""FastPromptModel: PEFT's ``PeftModelForCausalLM`` for soft prompts, with a faster forward and generate.

Prompt tuning, P-tuning and multitask prompt tuning take the fast path: each
puts its prompt in front of the token embeddings, and differs only in how the
prompt is computed from its encoder (``prompt_methods.py``: once per call, as
PEFT's ``get_prompt`` computes it; one prompt per distinct task of a multitask
call). Prefix tuning takes it too: its encoder's output, computed once per
call, is every layer's K/V of the virtual positions, the prefix the others'
prompts produce in the body, handed to every row as it is (a stride-0 view);
its outputs cover the T tokens only, as PEFT's. Everything a PEFT user touches is PEFT's own code: initialisation, the
prompt encoders, adapter bookkeeping, state dicts, saving, loading, ``disable_adapter``,
gradient-checkpointing preparation. This subclass overrides ``forward``,
``generate`` and ``prepare_inputs_for_generation``, and for the files it
writes ``save_pretrained`` and ``push_to_hub`` (``adapter_files.py``: names a
user can load again, a model card, one line for an unreachable hub).

The model decides and dispatches: it builds one ``PromptBatch`` per call
(``batch.py``) and hands it to the path the call takes (``paths/``), which
plans and runs it. The fast forward computes PEFT's numbers with less work:
the prompt's positions run once per batch instead of once per row (their K/V
are shared by every row), and with labels under autograd only labelled
positions go through ``lm_head`` (``loss.py``). The rule for logits:

* labels given and gradients on (a training step): only the loss is computed,
  ``logits`` is None (pass ``return_logits=True`` to get them as well);
* otherwise (no labels, or gradients off as in ``Trainer.evaluate/predict``):
  ``logits`` ``[B, P+T, V]`` as PEFT returns them, and the loss if labels.

Documents flattened into one row by a padding-free collator (``position_ids``
restarting, ``cu_seq_lens_*`` or ``seq_idx``) are served one document at a
time, each behind the prompt, as PEFT's pass over that document alone would
(``documents.py``); PEFT's own forward would let them attend to each other, so
such a call that cannot take the fast path raises instead of running it.

TRL's trainers call with ``fused_lm_head=True`` (their fused LM head on the
base model): the per-token outputs they read come from the same label-only
pass (``trl_head.py``), unless TRL's head is set to compute something else.

A call the fast path cannot serve exactly runs PEFT's own code and says so
once per reason (logger ``fastprompt``): ``inputs_embeds``, ``output_attentions``,
``output_hidden_states``, ``task_ids`` for a method that takes none, unknown
extra arguments, or a model family without a fast path. ``model.fast_path`` names the path a plain call takes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
from typing import NamedTuple

import torch
from peft import (
    PeftModel,
    PeftModelForCausalLM,
    PeftType,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PromptTuningInit,
    TaskType,
)
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.pipelines.base import SUPPORTED_PEFT_TASKS

from . import adapter_check, adapter_files, trl_head
from .batch import PromptBatch, positions_to_keep, with_virtual_tokens
from .documents import BOUNDARY_KWARGS, find_documents
from .eligibility import RandomDraws, has_forward_hooks, module_modes
from .loading import names_a_directory
from .loss import IGNORE_INDEX, prefix_causal_lm_loss, prefix_token_log_probs
from .paths import DRAWS_RANDOM, Path, Paths, Route, make_paths
from .paths.generic_generation import inferred_attention_mask, request_config
from .prefix_cache import PrefixCache
from .prompt_methods import (
    FAST_METHODS,
    ONE_PROMPT_METHODS,
    adapter_prompt,
    distinct_tasks,
    learned_prefix,
    prefix_encoding,
    rows_prompts,
    task_prompts,
)

log = logging.getLogger("fastprompt")

# Keyword arguments the fast forward accepts besides PEFT's named ones; any
# other sends the call to PEFT's code.
FAST_FORWARD_KWARGS = frozenset({"num_items_in_batch", "use_cache"})
# transformers' pipelines accept PEFT models by class name (an ERROR line
# listing every supported class otherwise); ours serves text generation as PEFT's does.
if "FastPromptModel" not in SUPPORTED_PEFT_TASKS["text-generation"]:
    SUPPORTED_PEFT_TASKS["text-generation"].append("FastPromptModel")


def get_peft_model(
    model,
    peft_config: PromptTuningConfig | PromptEncoderConfig | PrefixTuningConfig,
    adapter_name: str = "default",
    **peft_kwargs,
):
    """Drop-in for ``peft.get_peft_model`` (prompt tuning, multitask prompt
    tuning, P-tuning or prefix tuning on a causal LM): returns a
    ``FastPromptModel``, a ``peft.PeftModelForCausalLM``. Prefix tuning is
    accepted on a model with gradient checkpointing on, which PEFT refuses
    (its prefix cache would be dropped by the checkpointed layers; ours is not)."""
    _check_config(model, peft_config)
    if peft_kwargs.get("mixed"):
        raise ValueError("fastprompt does not support mixed=True (PeftMixedModel has no prompt tuning)")
    resolved = _with_local_tokenizer(peft_config)
    try:
        with _checkpointing_hidden_for_prefix(model, peft_config.peft_type) as hidden:
            peft_model = _pefts_get_peft_model()(model, resolved, adapter_name=adapter_name, **peft_kwargs)
        if hidden:
            peft_model.prepare_model_for_gradient_checkpointing(model)
    except OSError as err:
        if resolved.prompt_tuning_init == PromptTuningInit.TEXT:
            raise ValueError(
                f"cannot load the init-text tokenizer {resolved.tokenizer_name_or_path!r}: {' '.join(str(err).split())}"
            ) from None
        raise
    # Recorded as the user gave it (the built-in name, not our cache path).
    if resolved is not peft_config:
        peft_model.peft_config[adapter_name].tokenizer_name_or_path = peft_config.tokenizer_name_or_path
    return FastPromptModel._adopt(peft_model)


# The attribute under which ``patch_peft``'s replacement of ``peft.get_peft_model`` keeps PEFT's function.
PEFTS_OWN = "fastprompt_replaces"


def _pefts_get_peft_model():
    """PEFT's own ``get_peft_model``, also while ``patch_peft`` has replaced it."""
    import peft.mapping_func

    function = peft.mapping_func.get_peft_model
    return getattr(function, PEFTS_OWN, function)


@contextlib.contextmanager
def _checkpointing_hidden_for_prefix(model, peft_type):
    """PEFT refuses to set up a prefix-tuning adapter on a model with gradient
    checkpointing on: transformers' checkpointed layers drop the cache its
    prefix travels in. fastprompt's passes give the prefix to the attention
    itself, which recomputation keeps (``paths/segment_attention.py``), so the
    flags are hidden from that check. Yields whether they were: PEFT then saw
    no checkpointing, and its preparation for it is the caller's to run."""
    marked = []
    if peft_type == PeftType.PREFIX_TUNING:
        marked = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    for module in marked:
        module.gradient_checkpointing = False
    try:
        yield bool(marked)
    finally:
        for module in marked:
            module.gradient_checkpointing = True


def _check_config(model, config) -> None:
    """Errors PEFT would raise late or unclearly, raised up front."""
    # MultitaskPromptTuningConfig is a PromptTuningConfig.
    if not isinstance(config, (PromptTuningConfig, PromptEncoderConfig, PrefixTuningConfig)):
        raise TypeError(
            f"expected a peft.PromptTuningConfig, MultitaskPromptTuningConfig, PromptEncoderConfig or "
            f"PrefixTuningConfig, got {type(config).__name__}; fastprompt implements the soft-prompt methods only "
            "(use peft.get_peft_model for other methods)"
        )
    if config.task_type not in (TaskType.CAUSAL_LM, "CAUSAL_LM"):
        raise ValueError(f"task_type must be CAUSAL_LM for fastprompt, got {config.task_type!r}")
    if not isinstance(config.num_virtual_tokens, int) or config.num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens must be an integer >= 1, got {config.num_virtual_tokens!r}")
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if not isinstance(embeddings, torch.nn.Embedding):
        raise TypeError(
            f"{type(model).__name__} has no input embedding layer (get_input_embeddings() returned "
            f"{type(embeddings).__name__}); prompt tuning needs a token-embedding model"
        )
    # A prefix's token_dim is its K/V width (PEFT narrows it for grouped K/V heads).
    prefix = isinstance(config, PrefixTuningConfig)
    if not prefix and config.token_dim is not None and config.token_dim != embeddings.embedding_dim:
        raise ValueError(
            f"prompt token_dim {config.token_dim} does not match the model's hidden size {embeddings.embedding_dim}"
        )
    if getattr(config, "prompt_tuning_init", None) == PromptTuningInit.TEXT and not config.inference_mode:
        if not config.prompt_tuning_init_text:
            raise ValueError("prompt_tuning_init=TEXT needs prompt_tuning_init_text (the text was empty)")
        if not config.tokenizer_name_or_path:
            raise ValueError("prompt_tuning_init=TEXT needs tokenizer_name_or_path to tokenise the init text")


def _with_local_tokenizer(config):
    """PEFT loads the init-text tokenizer by name: map the built-in model name
    to its directory, and name a missing local directory at once."""
    from .loading import resolve_model_path

    if getattr(config, "prompt_tuning_init", None) != PromptTuningInit.TEXT or config.inference_mode:
        return config
    path = resolve_model_path(config.tokenizer_name_or_path)
    if names_a_directory(path) and not os.path.isdir(os.path.expanduser(path)):
        raise ValueError(f"cannot load the init-text tokenizer {str(path)!r}: no such directory")
    resolved = copy.copy(config)
    resolved.tokenizer_name_or_path = path
    return resolved


class CallRecord(NamedTuple):
    """What the last ``forward`` or ``generate`` call ran: ``path`` (a fast
    path's name, None for PEFT's code), ``run`` ("shared", "packed", "whole" —
    PEFT's single pass over ``cat(prompt, tokens)`` on the fast path's modules —
    "decode loop", "transformers' loop", or "peft"), and ``reason``, why a
    faster route was not taken (None when none was refused)."""

    path: str | None
    run: str
    reason: str | None


class _State:
    """Everything fastprompt keeps on a model, in one object the model alone
    touches: its paths (built on first use), the prefix cache, the reasons
    already logged, the train/eval patterns seen to draw random numbers, the
    ``generate`` call in progress and the last call's record. Copying or
    pickling a model starts its copy with a fresh state: the paths hold the
    modules and the cache holds weak references, which must not be duplicated."""

    def __init__(self):
        self.paths: Paths | None = None
        self.prefixes = PrefixCache()
        self.said: set[str] = set()
        self.random_modes: set[tuple[bool, ...]] = set()
        self.generating: tuple[Path, PromptBatch] | None = None
        self.last_call: CallRecord | None = None

    def __reduce__(self):
        return (_State, ())


class FastPromptModel(PeftModelForCausalLM):
    """A ``peft.PeftModelForCausalLM`` whose forward and generate take the
    fast path where it is exact. Build it with ``fastprompt.get_peft_model``
    or ``FastPromptModel.from_pretrained`` (or convert a PEFT model with
    ``FastPromptModel.from_peft``)."""

    # --------------------------------------------------------- construction
    @classmethod
    def _adopt(cls, peft_model):
        """Make PEFT's freshly built causal-LM model one of ours. The class's
        only state is ``_State``, made on first use, so switching the class of
        an instance PEFT constructed is a complete conversion, and PEFT keeps
        building it exactly as it builds its own."""
        if type(peft_model) is not PeftModelForCausalLM:
            raise TypeError(f"expected a peft.PeftModelForCausalLM, got {type(peft_model).__name__}")
        if not any(config.is_prompt_learning for config in peft_model.peft_config.values()):
            methods = sorted({str(config.peft_type.value) for config in peft_model.peft_config.values()})
            raise TypeError(
                f"fastprompt serves soft-prompt adapters; this model's are {', '.join(methods)}: "
                "use it as the PEFT model it is"
            )
        peft_model.__class__ = cls
        if peft_model.paths.generic is None:
            log.warning(
                "fastprompt: %s has no fast path; this model runs PEFT's own code (correct, not faster)",
                type(peft_model.get_base_model()).__name__,
            )
        return peft_model

    @classmethod
    def from_peft(cls, peft_model):
        """Convert an existing ``peft.PeftModelForCausalLM`` in place (its
        prompt-tuning, multitask and P-tuning adapters take the fast path)."""
        return cls._adopt(peft_model)

    @classmethod
    def from_pretrained(
        cls, model, model_id, adapter_name: str = "default", is_trainable: bool = False, config=None, **kwargs
    ):
        """``peft.PeftModel.from_pretrained`` returning a FastPromptModel; takes
        every argument PEFT's does. Loads adapters written by PEFT or by us."""
        peft_type = getattr(config, "peft_type", None)
        if config is None and names_a_directory(model_id):
            peft_type = adapter_check.check_adapter_directory(model_id, model, kwargs.get("subfolder"))
        with _checkpointing_hidden_for_prefix(model, peft_type) as hidden:
            loaded = PeftModel.from_pretrained(
                model, model_id, adapter_name=adapter_name, is_trainable=is_trainable, config=config, **kwargs
            )
        if hidden:
            loaded.prepare_model_for_gradient_checkpointing(model)
        return cls._adopt(loaded)

    # ---------------------------------------------------------------- saving
    def save_pretrained(self, save_directory, *args, **kwargs):
        """PEFT's ``save_pretrained``, with the base named as the user named it,
        no init tokenizer PEFT cannot load, and our model card (``adapter_files.py``)."""
        live = dict(self.peft_config)
        self.peft_config.update({name: adapter_files.config_to_save(config) for name, config in live.items()})
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.peft_config.update(live)
        if kwargs.get("is_main_process", True):
            adapters = kwargs.get("selected_adapters") or list(live)
            adapter_files.name_base_as_user_did(save_directory, self, adapters)
            # From the live configs: the card tells the text init a saved config may leave out.
            adapter_files.write_model_card(self, save_directory)

    def create_or_update_model_card(self, output_dir: str):
        """PEFT's update of a README.md someone else wrote; ours is written
        after the files (``save_pretrained``)."""
        if adapter_files.has_foreign_card(output_dir):
            super().create_or_update_model_card(output_dir)

    def push_to_hub(self, *args, **kwargs):
        """PEFT's ``push_to_hub``; a hub that cannot be reached is one
        ``ConnectionError`` naming it, not the HTTP client's traceback."""
        from huggingface_hub import constants

        try:
            return super().push_to_hub(*args, **kwargs)
        except Exception as err:
            unreachable = adapter_files.hub_unreachable(err, constants.ENDPOINT)
            if unreachable is None:
                raise
            raise unreachable from None

    # ------------------------------------------------------------------ info
    @property
    def _state(self) -> _State:
        state = self.__dict__.get("_fastprompt")
        if state is None:
            state = self.__dict__["_fastprompt"] = _State()
        return state

    @property
    def paths(self) -> Paths:
        """This model's fast paths (``paths.Paths``): BLOOM's own and the generic one."""
        state = self._state
        if state.paths is None:
            state.paths = make_paths(self.get_base_model(), self.word_embeddings)
        return state.paths

    @property
    def prefix_cache(self) -> PrefixCache:
        """The prompts' prefixes kept for calls without gradients (``prefix_cache.py``)."""
        return self._state.prefixes

    @property
    def fast_path(self) -> str | None:
        """The path a plain call takes with the model as it is now: "bloom"
        (BLOOM's own decoder), "generic:<model_type>" (the model's body), or
        None (no fast path: PEFT's code). ``last_call`` says what a call ran."""
        if self.paths.generic is None or self.active_peft_config.peft_type not in FAST_METHODS:
            return None
        return self._route().path.name

    @property
    def last_call(self) -> CallRecord | None:
        """What the last ``forward`` or ``generate`` ran, and why not faster (``CallRecord``)."""
        return self._state.last_call

    def soft_prompt(self, adapter: str | None = None, task: int | None = None) -> torch.Tensor:
        """The soft prompt [P, H] that rows of ``adapter`` (default: the active
        one) read now. Prompt tuning: the parameter itself, where PEFT keeps it
        (``prompt_encoder[adapter].embedding.weight``). P-tuning: its encoder's
        output, computed now (a tensor whose gradient flows to the encoder; in
        inference mode the saved output, ``embedding.weight``). Multitask prompt
        tuning: the prompt of ``task``, computed now (``task`` is required)."""
        adapter = adapter or self.active_adapter
        if self.peft_config[adapter].peft_type == PeftType.MULTITASK_PROMPT_TUNING:
            if task is None:
                raise ValueError(f"{adapter!r} is a multitask prompt tuning adapter: soft_prompt needs its task")
            return task_prompts(self, adapter, (task,))[0]
        return adapter_prompt(self, adapter)

    def _say_once(self, message: str) -> None:
        said = self._state.said
        if message not in said:
            said.add(message)
            log.warning("fastprompt: %s", message)

    def _record(self, path: str | None, run: str, reason: str | None) -> None:
        self._state.last_call = CallRecord(path, run, reason)
        if reason is not None:
            self._say_once(
                f"this call runs PEFT's own code, not the fast path: {reason}"
                if path is None
                else f"{path} runs {run}: {reason}"
            )

    def _route(self) -> Route:
        """The route of a call now; randomness an earlier call saw in this train/eval pattern counts."""
        draws_random = (
            bool(self._state.random_modes) and module_modes(self.get_base_model()) in self._state.random_modes
        )
        return self.paths.choose(draws_random)

    def _row_adapters(self, adapter_names, rows: int) -> tuple[tuple[str, ...], tuple[int, ...] | None]:
        """(adapters, row_adapters): the distinct adapters of this batch and,
        when there is more than one, each row's index into them."""
        if adapter_names is None:
            return (self.active_adapter,), None
        if isinstance(adapter_names, str) or len(adapter_names) != rows:
            raise ValueError(f"adapter_names must list one adapter per row ({rows} rows), got {adapter_names!r}")
        adapters = tuple(dict.fromkeys(adapter_names))
        for name in adapters:
            if name not in self.peft_config:
                raise ValueError(f"adapter_names: unknown adapter {name!r} (this model has {sorted(self.peft_config)})")
            if self.peft_config[name].peft_type not in ONE_PROMPT_METHODS:
                raise ValueError(
                    f"adapter_names: {name!r} is a {self.peft_config[name].peft_type} adapter; adapter_names "
                    "lists prompt-tuning or P-tuning adapters (a multitask adapter's rows choose their task with "
                    "task_ids)"
                )
        lengths = {self.peft_config[name].num_virtual_tokens for name in adapters}
        if len(lengths) > 1:
            raise ValueError(
                f"adapter_names: rows' adapters have different num_virtual_tokens {sorted(lengths)}; "
                "a mixed batch needs prompts of one length"
            )
        if len(adapters) == 1:
            return adapters, None
        index = {name: i for i, name in enumerate(adapters)}
        return adapters, tuple(index[name] for name in adapter_names)

    def _prompts(
        self, adapter_names, task_ids, rows: int
    ) -> tuple[tuple[str, ...], torch.Tensor, tuple[int, ...] | None]:
        """(names, prompts [A, P, H], row_prompts): the call's distinct prompts,
        each computed once as PEFT's ``get_prompt`` computes it, and, when there
        is more than one, each row's index into them. A multitask adapter's
        prompts are its tasks' (named ``adapter[task t]``), otherwise the
        adapters'; a prefix-tuning adapter's, its encoder output [1, P, layers
        * 2 * kv_dim]."""
        if self.active_peft_config.peft_type == PeftType.PREFIX_TUNING and adapter_names is None:
            return (self.active_adapter,), prefix_encoding(self, self.active_adapter), None
        if self.active_peft_config.peft_type == PeftType.MULTITASK_PROMPT_TUNING and adapter_names is None:
            if task_ids is None:
                raise ValueError("task_ids cannot be None: multitask prompt tuning needs one task per row (as in PEFT)")
            tasks, task_of_row = distinct_tasks(task_ids, rows)
            encoder = self.prompt_encoder[self.active_adapter]
            if any(has_forward_hooks(module) for module in encoder.modules()):
                # A hook on the encoder must see PEFT's one call over every row, not one per task.
                names = tuple(f"{self.active_adapter}[row {row}]" for row in range(rows))
                prompts = rows_prompts(self, self.active_adapter, task_ids, rows)
                return names, prompts, tuple(range(rows)) if rows > 1 else None
            names = tuple(f"{self.active_adapter}[task {task}]" for task in tasks)
            return names, task_prompts(self, self.active_adapter, tasks), task_of_row if len(tasks) > 1 else None
        adapters, row_adapters = self._row_adapters(adapter_names, rows)
        return adapters, torch.stack([adapter_prompt(self, name) for name in adapters]), row_adapters

    def _call(
        self,
        adapter_names,
        task_ids,
        rows: int,
        attention_mask: torch.Tensor | None,
        keep: torch.Tensor | None = None,
    ) -> tuple[Route, PromptBatch]:
        """The route this call takes and its ``PromptBatch``, decided once."""
        route = self._route()
        names, prompts, row_prompts = self._prompts(adapter_names, task_ids, rows)
        prompt_of_row = None
        if row_prompts is not None:
            prompt_of_row = torch.tensor(row_prompts, dtype=torch.long, device=self.device)
        key_mask = None if attention_mask is None else with_virtual_tokens(attention_mask, prompts.shape[1])
        learned = None
        if self.active_peft_config.peft_type == PeftType.PREFIX_TUNING and adapter_names is None:
            learned = learned_prefix(self.active_peft_config, prompts)
        return route, PromptBatch(
            names, prompt_of_row, prompts, key_mask, route.shares_prefix, keep, row_prompts, learned
        )

    def _hidden_states(self, route: Route, batch: PromptBatch, input_ids: torch.Tensor):
        """The route's pass; where it shares the prompt's pass, a check that the
        model drew no random numbers, which would have to be drawn as in PEFT's
        single pass. If it did (or failed doing so: a layer skipped by layer
        drop leaves the prefix incomplete), the generators are set back and the
        call runs that single pass, on the same prompts (a P-tuning encoder
        has drawn its numbers already); this train/eval pattern is remembered."""
        prefixes = self._state.prefixes
        if not route.shares_prefix:
            return route, *route.path.hidden_states(batch, input_ids, prefixes)
        draws = RandomDraws(input_ids.device)
        try:
            result = route.path.hidden_states(batch, input_ids, prefixes)
        except Exception:
            if not draws.drew():
                raise
            result = None
        else:
            if not draws.drew():
                return route, *result
        self._state.random_modes.add(module_modes(self.get_base_model()))
        if result is not None and result[2] == "whole" and route.path is self.paths.generic:
            # That was PEFT's single pass through the model's own modules already.
            return route._replace(reason=DRAWS_RANDOM), *result
        draws.undo()
        route = self._route()
        batch = dataclasses.replace(batch, shares_prefix=route.shares_prefix)
        return route, *route.path.hidden_states(batch, input_ids, prefixes)

    # --------------------------------------------------------------- forward
    def _refusal(
        self,
        input_ids,
        inputs_embeds,
        labels,
        output_attentions,
        output_hidden_states,
        return_dict,
        task_ids,
        fused_lm_head,
        kwargs,
    ):
        """Why this call cannot take the fast path, or None."""
        peft_type = self.active_peft_config.peft_type
        if peft_type not in FAST_METHODS:
            return f"the active adapter is {peft_type}, a method without a fast path"
        if self.paths.generic is None:
            return f"{self.get_base_model().config.model_type} has no fast path"
        if inputs_embeds is not None:
            return "inputs_embeds was passed"
        if input_ids is None:
            return "no input_ids"
        if torch.is_tensor(input_ids) and input_ids.dim() == 2 and input_ids.shape[1] == 0:
            return "input_ids has no tokens"
        if output_attentions:
            return "output_attentions=True"
        if output_hidden_states:
            return "output_hidden_states=True"
        if labels is not None and has_forward_hooks(self.get_output_embeddings()):
            return "forward hooks on the output embeddings must see PEFT's single call on every position"
        if task_ids is not None and peft_type != PeftType.MULTITASK_PROMPT_TUNING:
            return "task_ids was passed"
        if kwargs.get("use_cache"):
            return "use_cache=True (PEFT's forward returns its cache)"
        if return_dict is False:
            return "return_dict=False (PEFT's tuple holds its cache)"
        if fused_lm_head:
            if labels is None:
                return "fused_lm_head=True without labels"
            reason = trl_head.refusal(self.get_base_model())
            if reason is not None:
                return reason
        extra = sorted(set(kwargs) - FAST_FORWARD_KWARGS)
        if extra:
            return f"extra arguments {extra}"
        return None

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        task_ids=None,
        **kwargs,
    ):
        adapter_names = kwargs.pop("adapter_names", None)
        return_logits = kwargs.pop("return_logits", False)
        boundaries = {name: kwargs.pop(name) for name in BOUNDARY_KWARGS if name in kwargs}
        # TRL's fused LM head (trl_head.py): per-token outputs instead of logits.
        fused = {"fused_lm_head": kwargs.pop("fused_lm_head")} if "fused_lm_head" in kwargs else {}
        fused_lm_head = bool(fused.get("fused_lm_head"))
        reason = self._refusal(
            input_ids,
            inputs_embeds,
            labels,
            output_attentions,
            output_hidden_states,
            return_dict,
            task_ids,
            fused_lm_head,
            kwargs,
        )
        documents = None
        if torch.is_tensor(input_ids) and input_ids.dim() == 2 and any(v is not None for v in boundaries.values()):
            documents = find_documents(input_ids, attention_mask, boundaries)
        if reason is not None:
            if adapter_names is not None:
                raise ValueError(f"adapter_names needs fastprompt's fast path, which this call cannot take: {reason}")
            if documents is not None:
                raise ValueError(
                    f"documents flattened into a row need fastprompt's fast path, which this call cannot take: "
                    f"{reason} (PEFT's forward would let them attend to each other)"
                )
            self._record(None, "peft", reason)
            return super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                labels=labels,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=return_dict,
                task_ids=task_ids,
                **kwargs,
                **boundaries,
                **fused,
            )
        _check_inputs(input_ids, attention_mask, labels)
        rows = input_ids.shape[0]
        flat_labels = labels
        if documents is not None:
            # One right-padded row per document, each behind its own copy of the prompt.
            input_ids = documents.unflatten(input_ids, fill=0)
            attention_mask = documents.padding_mask()
            if labels is not None:
                labels = documents.unflatten(labels.to(input_ids.device), fill=IGNORE_INDEX)
            if adapter_names is not None:
                adapter_names = [adapter_names[row] for row in documents.rows]
            if torch.is_tensor(task_ids) and task_ids.dim() == 1 and task_ids.numel() == rows > 1:
                task_ids = task_ids[torch.as_tensor(documents.rows, device=task_ids.device)]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(input_ids.device)
        # Only the loss is computed (logits None): a packed pass may leave out pads no label needs.
        keep = None
        if labels is not None and (torch.is_grad_enabled() or fused_lm_head) and not return_logits:
            keep = positions_to_keep(attention_mask, labels.to(input_ids.device), IGNORE_INDEX)
        route, batch = self._call(adapter_names, task_ids, input_ids.shape[0], attention_mask, keep)
        route, prefix_final, token_final, ran, unshared = self._hidden_states(route, batch, input_ids)
        self._record(route.path.name, ran, route.reason or unshared)
        path = route.path

        if fused_lm_head:
            per_label = prefix_token_log_probs(
                None if prefix_final is None else prefix_final[:, -1],
                token_final,
                labels.to(token_final.device),
                path.lm_head,
                path.softcap,
            )
            if documents is not None:
                per_label = tuple(documents.flatten(values) for values in per_label)
            return trl_head.fused_output(
                self.get_base_model(),
                per_label,
                flat_labels,
                0 if batch.learned is not None else batch.num_virtual_tokens,
                kwargs.get("num_items_in_batch"),
            )
        loss = logits = None
        if labels is not None:
            loss = prefix_causal_lm_loss(
                None if prefix_final is None else prefix_final[:, -1],
                token_final,
                labels.to(token_final.device),
                path.lm_head,
                kwargs.get("num_items_in_batch"),
                path.softcap,
            )
        if labels is None or return_logits or not torch.is_grad_enabled():
            if documents is not None:
                token_final = documents.flatten(token_final)
                if prefix_final is not None and prefix_final.shape[0] > 1:
                    prefix_final = prefix_final[documents.first_of_each_row()]
            hidden = token_final
            if prefix_final is not None:
                hidden = torch.cat([prefix_final.expand(rows, -1, -1).to(token_final.dtype), token_final], dim=1)
            logits = path.logits(hidden)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    # ------------------------------------------------------------ generation
    def generate(self, *args, **kwargs):
        """PEFT's ``generate`` (every option of transformers' ``generate``), with
        the prompt's K/V taken from the prefix cache instead of recomputed per
        row and request; ``adapter_names`` gives each row its own prompt, and
        a multitask adapter's ``task_ids`` each row its task's."""
        adapter_names = kwargs.pop("adapter_names", None)
        if (
            self._adapters_disabled
            or self.active_peft_config.peft_type not in FAST_METHODS
            or self.paths.generic is None
        ):
            return super().generate(*args, **kwargs)
        task_ids = None
        if self.active_peft_config.peft_type == PeftType.MULTITASK_PROMPT_TUNING:
            task_ids = kwargs.pop("task_ids", None)
        ids = kwargs.get("input_ids", args[0] if args else None)
        inputs = ids if ids is not None else kwargs.get("inputs_embeds")
        rows = 0 if inputs is None else inputs.shape[0]
        mask = kwargs.get("attention_mask")
        if mask is None and torch.is_tensor(ids):
            config = request_config(self.generation_config, kwargs)
            mask = inferred_attention_mask(ids, config.pad_token_id, config.eos_token_id)
        route, batch = self._call(adapter_names or None, task_ids, rows, mask)
        path = route.path
        sequences = path.generate(batch, args, kwargs, self._state.prefixes)
        if sequences is not None:
            self._record(path.name, "decode loop", route.reason)
            return sequences
        self._record(path.name, "transformers' loop", route.reason)
        kwargs = path.generation_kwargs(batch, args, kwargs)
        with self._generating(path, batch):
            return super().generate(*args, **kwargs)

    @contextlib.contextmanager
    def _generating(self, path: Path, batch: PromptBatch):
        """Tell ``prepare_inputs_for_generation``, for the duration of one
        ``generate`` call, its path and batch: decided once, not per step
        (walking the modules for hooks and dropout costs about a millisecond,
        per token otherwise)."""
        self._state.generating = (path, batch)
        try:
            yield
        finally:
            self._state.generating = None

    def prepare_inputs_for_generation(self, *args, task_ids=None, **kwargs):
        if self.active_peft_config.peft_type not in FAST_METHODS or self.paths.generic is None:
            return super().prepare_inputs_for_generation(*args, task_ids=task_ids, **kwargs)
        if self._state.generating is not None:
            path, batch = self._state.generating
        else:
            rows = task_ids.numel() if torch.is_tensor(task_ids) else 0
            route, batch = self._call(None, task_ids, rows, None)
            path = route.path
        return path.prepare_step_inputs(
            batch, self._state.prefixes, self.base_model_prepare_inputs_for_generation, *args, **kwargs
        )


def _check_inputs(input_ids, attention_mask, labels) -> None:
    if not torch.is_tensor(input_ids):
        raise TypeError(f"input_ids must be a tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"input_ids must be a 2-D integer tensor [batch, tokens], got {input_ids.dim()}-D {input_ids.dtype}"
        )
    shape = tuple(input_ids.shape)
    if shape[0] == 0:
        raise ValueError("input_ids has no rows: an empty batch (PEFT's forward fails on it too)")
    for name, tensor in (("attention_mask", attention_mask), ("labels", labels)):
        if tensor is None:
            continue
        if not torch.is_tensor(tensor):
            raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} but the inputs have shape {shape}")
