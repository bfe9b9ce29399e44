"""FastPromptModel: PEFT's ``PeftModelForCausalLM`` for prompt tuning, with a faster forward and generate.

Everything a PEFT user touches is PEFT's own code: initialisation, the prompt
encoder (the prompt lives in ``prompt_encoder[<adapter>].embedding.weight``),
adapter bookkeeping, state dicts, saving, loading, ``disable_adapter``,
gradient-checkpointing preparation. This subclass overrides ``forward``,
``generate`` and ``prepare_inputs_for_generation`` only.

The fast forward computes PEFT's numbers with less work (see ``arch/``): the
prompt's positions run once per batch instead of once per row (their K/V are
shared by every row), and with labels under autograd only labelled positions
go through ``lm_head`` (``loss.py``). The rule for logits:

* labels given and gradients on (a training step): only the loss is computed,
  ``logits`` is None (pass ``return_logits=True`` to get them as well);
* otherwise (no labels, or gradients off as in ``Trainer.evaluate/predict``):
  ``logits`` ``[B, P+T, V]`` as PEFT returns them, and the loss if labels.

A call the fast path cannot serve exactly runs PEFT's own code and says so
once per reason (logger ``fastprompt``): ``inputs_embeds``, ``output_attentions``,
``output_hidden_states``, ``task_ids``, unknown extra arguments, or a model
family without a fast path. ``model.fast_path`` names the path a plain call takes.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os

import torch
from peft import PeftModel, PeftModelForCausalLM, PeftType, PromptTuningConfig, PromptTuningInit, TaskType
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import adapter_check, decode, generation
from .arch import block_hooks, dropout_active, make_drivers, placement_hooks
from .loading import names_a_directory
from .loss import prefix_causal_lm_loss
from .prefix_cache import prefix_cache_of

log = logging.getLogger("fastprompt")

# Keyword arguments the fast forward accepts besides PEFT's named ones; any
# other sends the call to PEFT's code.
FAST_FORWARD_KWARGS = frozenset({"num_items_in_batch", "use_cache"})


def get_peft_model(model, peft_config: PromptTuningConfig, adapter_name: str = "default", **peft_kwargs):
    """Drop-in for ``peft.get_peft_model`` (prompt tuning on a causal LM):
    returns a ``FastPromptModel``, a ``peft.PeftModelForCausalLM``."""
    import peft

    _check_config(model, peft_config)
    if peft_kwargs.get("mixed"):
        raise ValueError("fastprompt does not support mixed=True (PeftMixedModel has no prompt tuning)")
    resolved = _with_local_tokenizer(peft_config)
    try:
        peft_model = peft.get_peft_model(model, resolved, adapter_name=adapter_name, **peft_kwargs)
    except OSError as err:
        if resolved.prompt_tuning_init == PromptTuningInit.TEXT:
            raise ValueError(
                f"cannot load the init-text tokenizer {resolved.tokenizer_name_or_path!r}: {' '.join(str(err).split())}"
            ) from None
        raise
    # Recorded as the user gave it (the built-in name, not our cache path).
    peft_model.peft_config[adapter_name].tokenizer_name_or_path = peft_config.tokenizer_name_or_path
    return FastPromptModel._adopt(peft_model)


def _check_config(model, config) -> None:
    """Errors PEFT would raise late or unclearly, raised up front."""
    if not isinstance(config, PromptTuningConfig):
        raise TypeError(
            f"expected a peft.PromptTuningConfig, got {type(config).__name__}; fastprompt implements prompt tuning "
            "only (use peft.get_peft_model for other methods)"
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
    if config.token_dim is not None and config.token_dim != embeddings.embedding_dim:
        raise ValueError(
            f"prompt token_dim {config.token_dim} does not match the model's hidden size {embeddings.embedding_dim}"
        )
    if config.prompt_tuning_init == PromptTuningInit.TEXT and not config.inference_mode:
        if not config.prompt_tuning_init_text:
            raise ValueError("prompt_tuning_init=TEXT needs prompt_tuning_init_text (the text was empty)")
        if not config.tokenizer_name_or_path:
            raise ValueError("prompt_tuning_init=TEXT needs tokenizer_name_or_path to tokenise the init text")


def _with_local_tokenizer(config: PromptTuningConfig) -> PromptTuningConfig:
    """PEFT loads the init-text tokenizer by name: map the built-in model name
    to its directory, and name a missing local directory at once."""
    from .loading import resolve_model_path

    if config.prompt_tuning_init != PromptTuningInit.TEXT or config.inference_mode:
        return config
    path = resolve_model_path(config.tokenizer_name_or_path)
    if names_a_directory(path) and not os.path.isdir(os.path.expanduser(path)):
        raise ValueError(f"cannot load the init-text tokenizer {str(path)!r}: no such directory")
    resolved = copy.copy(config)
    resolved.tokenizer_name_or_path = path
    return resolved


class FastPromptModel(PeftModelForCausalLM):
    """A ``peft.PeftModelForCausalLM`` whose forward and generate take the
    fast path where it is exact. Build it with ``fastprompt.get_peft_model``
    or ``FastPromptModel.from_pretrained`` (or convert a PEFT model with
    ``FastPromptModel.from_peft``)."""

    # --------------------------------------------------------- construction
    @classmethod
    def _adopt(cls, peft_model):
        """Make PEFT's freshly built causal-LM model one of ours. This class adds
        no state of its own (everything is built lazily), so switching the class
        of an instance PEFT constructed is a complete conversion, and PEFT keeps
        building it exactly as it builds its own."""
        if type(peft_model) is not PeftModelForCausalLM:
            raise TypeError(f"expected a peft.PeftModelForCausalLM, got {type(peft_model).__name__}")
        peft_model.__class__ = cls
        if peft_model.fast_path is None:
            log.warning("fastprompt: %s has no fast path; this model runs PEFT's own code (correct, not faster)",
                        type(peft_model.get_base_model()).__name__)
        return peft_model

    @classmethod
    def from_peft(cls, peft_model):
        """Convert an existing ``peft.PeftModelForCausalLM`` (prompt tuning) in place."""
        return cls._adopt(peft_model)

    @classmethod
    def from_pretrained(cls, model, model_id, adapter_name: str = "default", is_trainable: bool = False,
                        config=None, **kwargs):
        """``peft.PeftModel.from_pretrained`` returning a FastPromptModel; takes
        every argument PEFT's does. Loads adapters written by PEFT or by us."""
        if config is None and names_a_directory(model_id):
            adapter_check.check_adapter_directory(model_id, model, kwargs.get("subfolder"))
        loaded = PeftModel.from_pretrained(model, model_id, adapter_name=adapter_name, is_trainable=is_trainable,
                                           config=config, **kwargs)
        return cls._adopt(loaded)

    # ------------------------------------------------------------------ info
    def _drivers(self):
        drivers = self.__dict__.get("_fastprompt_drivers")
        if drivers is None:
            drivers = self.__dict__["_fastprompt_drivers"] = make_drivers(self.get_base_model(), self.word_embeddings)
        return drivers

    @property
    def fast_path(self) -> str | None:
        """The path a plain forward takes: "bloom" (BLOOM's own decoder),
        "generic:<model_type>" (the model's body with a shared prefix), or None
        (no fast path: PEFT's code)."""
        bloom, generic = self._drivers()
        if bloom is not None:
            return "bloom"
        return None if generic is None else f"generic:{generic.family}"

    def _note_peft_path(self, reason: str) -> None:
        said = self.__dict__.setdefault("_fastprompt_said", set())
        if reason not in said:
            said.add(reason)
            log.warning("fastprompt: this call runs PEFT's own code, not the fast path: %s", reason)

    def _call_plan(self) -> tuple:
        """(driver, share): the driver a call runs, and whether the prompt's
        pass may be shared by the rows (computed once, cached when no gradient
        flows). BLOOM's own decoder unless the body has hooks or draws dropout;
        no sharing when dropout must draw per row or hooks must see PEFT's
        single pass over ``cat(prompt, tokens)``."""
        bloom, generic = self._drivers()
        hooked = block_hooks(generic.blocks)
        dropout = dropout_active(self.get_base_model())
        if bloom is not None and not (hooked or dropout or placement_hooks(generic.body)):
            return bloom, True
        return generic, not (hooked or dropout)

    def _prompt(self, adapter: str) -> torch.Tensor:
        return self.prompt_encoder[adapter].embedding.weight

    def _row_adapters(self, adapter_names, batch: int) -> tuple[tuple[str, ...], torch.Tensor | None]:
        """(adapters, rows): the distinct adapters of this batch and, when there
        is more than one, each row's index into them."""
        if adapter_names is None:
            return (self.active_adapter,), None
        if isinstance(adapter_names, str) or len(adapter_names) != batch:
            raise ValueError(f"adapter_names must list one adapter per row ({batch} rows), got {adapter_names!r}")
        adapters = tuple(dict.fromkeys(adapter_names))
        for name in adapters:
            if name not in self.peft_config:
                raise ValueError(f"adapter_names: unknown adapter {name!r} (this model has {sorted(self.peft_config)})")
            if self.peft_config[name].peft_type != PeftType.PROMPT_TUNING:
                raise ValueError(f"adapter_names: {name!r} is a {self.peft_config[name].peft_type} adapter")
        lengths = {self.peft_config[name].num_virtual_tokens for name in adapters}
        if len(lengths) > 1:
            raise ValueError(f"adapter_names: rows' adapters have different num_virtual_tokens {sorted(lengths)}; "
                             "a mixed batch needs prompts of one length")
        if len(adapters) == 1:
            return adapters, None
        index = {name: i for i, name in enumerate(adapters)}
        rows = torch.tensor([index[name] for name in adapter_names], dtype=torch.long, device=self.device)
        return adapters, rows

    def _prefix(self, driver, adapters: tuple[str, ...], prompts: torch.Tensor):
        """The prompts' pass through the body: recomputed under autograd (the
        gradient flows through it), cached otherwise."""
        if _trains(prompts):
            return driver.prefix(prompts)
        return prefix_cache_of(self).get(self.get_base_model(), driver.name, adapters, prompts,
                                          lambda: driver.prefix(prompts))

    # --------------------------------------------------------------- forward
    def _refusal(self, input_ids, inputs_embeds, output_attentions, output_hidden_states, task_ids, kwargs):
        """Why this call cannot take the fast path, or None."""
        if self.active_peft_config.peft_type != PeftType.PROMPT_TUNING:
            return f"the active adapter is {self.active_peft_config.peft_type}, not PROMPT_TUNING"
        if self.fast_path is None:
            return f"{self.get_base_model().config.model_type} has no fast path"
        if inputs_embeds is not None:
            return "inputs_embeds was passed"
        if input_ids is None:
            return "no input_ids"
        if output_attentions:
            return "output_attentions=True"
        if output_hidden_states:
            return "output_hidden_states=True"
        if task_ids is not None:
            return "task_ids was passed"
        extra = sorted(set(kwargs) - FAST_FORWARD_KWARGS)
        if extra:
            return f"extra arguments {extra}"
        return None

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        adapter_names = kwargs.pop("adapter_names", None)
        return_logits = kwargs.pop("return_logits", False)
        reason = self._refusal(input_ids, inputs_embeds, output_attentions, output_hidden_states, task_ids, kwargs)
        if reason is not None:
            if adapter_names is not None:
                raise ValueError(f"adapter_names needs fastprompt's fast path, which this call cannot take: {reason}")
            self._note_peft_path(reason)
            return super().forward(
                input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels,
                output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                return_dict=return_dict, task_ids=task_ids, **kwargs,
            )
        _check_inputs(input_ids, attention_mask, labels)
        want_logits = labels is None or return_logits or not torch.is_grad_enabled()
        out = self._fast_forward(input_ids, attention_mask, labels, want_logits, adapter_names,
                                 kwargs.get("num_items_in_batch"))
        return out if return_dict is not False else out.to_tuple()

    def _fast_forward(self, input_ids, attention_mask, labels, want_logits, adapter_names, num_items_in_batch):
        batch = input_ids.shape[0]
        adapters, rows = self._row_adapters(adapter_names, batch)
        count = self.peft_config[adapters[0]].num_virtual_tokens
        prompts = torch.stack([self._prompt(name) for name in adapters])
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(input_ids.device)
        key_mask = torch.cat([attention_mask.new_ones(batch, count), attention_mask], dim=1)
        driver, share = self._call_plan()
        # One pass over cat(prompt, tokens), as PEFT does, when sharing the
        # prefix would change what happens (dropout, hooks) or cannot help (one row).
        # A prompt in training is recomputed every step: the generic driver may
        # then run it packed with the rows' tokens, in one body call.
        length = input_ids.shape[1]
        packed = batch > 1 and share and _trains(prompts) and driver.packs(len(adapters), count, batch, length)
        whole = not packed and (batch == 1 or not share or not driver.can_share_prefix(count))
        if packed:
            prefix_final, token_final = driver.packed(input_ids, prompts, key_mask, rows)
            if rows is not None:
                prefix_final = prefix_final.index_select(0, rows)
        elif whole:
            if rows is not None and driver.name == "bloom":
                driver = self._drivers()[1]
            row_prompts = prompts if rows is None else prompts.index_select(0, rows)
            final = driver.full(input_ids, row_prompts, key_mask)
            prefix_final, token_final = final[:, :count], final[:, count:]
        else:
            prefix = self._prefix(driver, adapters, prompts)
            token_final = driver.tokens(input_ids, key_mask, prefix, rows)
            prefix_final = prefix.final if rows is None else prefix.final.index_select(0, rows)

        loss = logits = None
        if labels is not None:
            loss = prefix_causal_lm_loss(prefix_final[:, -1], token_final, labels.to(token_final.device),
                                         driver.lm_head, num_items_in_batch, driver.softcap)
        if want_logits:
            hidden = torch.cat([prefix_final.expand(batch, -1, -1).to(token_final.dtype), token_final], dim=1)
            logits = driver.logits(hidden)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    # ------------------------------------------------------------ generation
    def generate(self, *args, **kwargs):
        """PEFT's ``generate`` (every option of transformers' ``generate``), with
        the prompt's K/V taken from the prefix cache instead of recomputed per
        row and request; ``adapter_names`` gives each row its own prompt."""
        adapter_names = kwargs.pop("adapter_names", None)
        if (self._adapters_disabled or self.active_peft_config.peft_type != PeftType.PROMPT_TUNING
                or self.fast_path is None):
            return super().generate(*args, **kwargs)
        call_plan = self._call_plan()
        driver = call_plan[0]
        if driver.name == "bloom":
            plan = decode.plan(self, args, kwargs)
            if isinstance(plan, decode.Plan):
                rows = self._row_adapters(adapter_names, kwargs["input_ids"].shape[0])
                return decode.generate(self, driver, rows, plan, kwargs)
            log.info("fastprompt: generate runs transformers' loop (with the cached prefix) for %s", plan)
        kwargs = generation.with_room_for_prompt(self, args, kwargs)
        with self._generation_call(adapter_names, call_plan, args, kwargs):
            return super().generate(*args, **kwargs)

    @contextlib.contextmanager
    def _generation_call(self, adapter_names, call_plan, args, kwargs):
        """Tell ``prepare_inputs_for_generation``, for the duration of one
        ``generate`` call, which prompt each input row has and the call plan:
        decided once, not per step (walking the modules for hooks and dropout
        costs about a millisecond, per token otherwise)."""
        batch = None
        if adapter_names is not None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            embeds = kwargs.get("inputs_embeds")
            batch = (ids if ids is not None else embeds).shape[0]
        self.__dict__["_fastprompt_generation"] = (self._row_adapters(adapter_names or None, batch), call_plan)
        try:
            yield
        finally:
            self.__dict__["_fastprompt_generation"] = None

    def prepare_inputs_for_generation(self, *args, task_ids=None, **kwargs):
        if self.active_peft_config.peft_type != PeftType.PROMPT_TUNING or self.fast_path is None:
            return super().prepare_inputs_for_generation(*args, task_ids=task_ids, **kwargs)
        rows, call_plan = self.__dict__.get("_fastprompt_generation") or (self._row_adapters(None, 0), self._call_plan())
        return generation.prepare_step_inputs(self, rows, call_plan, *args, **kwargs)


def _trains(prompts: torch.Tensor) -> bool:
    """Whether a gradient flows to the prompts in this call (their pass is then recomputed, not cached)."""
    return torch.is_grad_enabled() and prompts.requires_grad


def _check_inputs(input_ids, attention_mask, labels) -> None:
    if not torch.is_tensor(input_ids):
        raise TypeError(f"input_ids must be a tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"input_ids must be a 2-D integer tensor [batch, tokens], got {input_ids.dim()}-D {input_ids.dtype}"
        )
    shape = tuple(input_ids.shape)
    for name, tensor in (("attention_mask", attention_mask), ("labels", labels)):
        if tensor is None:
            continue
        if not torch.is_tensor(tensor):
            raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} but the inputs have shape {shape}")
