"""FastPromptModel: PEFT prompt tuning for a frozen causal LM, computed faster.

Semantics are PEFT's ``PeftModelForCausalLM`` with ``PROMPT_TUNING``: the
prompt is prepended to every row, the attention mask gets a prefix of ones,
labels get a prefix of -100. For BLOOM the prefix is run once at batch 1 and
its K/V shared by all rows (see ``arch/bloom.py``) and the loss is computed only
on labelled positions (``loss.py``). Other architectures take PEFT's own path
(``cat`` + full forward) so they are correct, just not faster.
"""

from __future__ import annotations

import torch
from peft import PromptTuningConfig
from transformers.modeling_outputs import CausalLMOutput

from . import generation
from . import prompt as prompt_io
from .arch.bloom import BloomDecoder, KVSegment
from .loss import IGNORE_INDEX, prefix_causal_lm_loss
from .ops import embed_concat


def get_peft_model(model, peft_config: PromptTuningConfig, adapter_name: str = "default", **_ignored):
    """Drop-in for ``peft.get_peft_model`` (prompt tuning on a causal LM)."""
    return FastPromptModel(model, peft_config, adapter_name=adapter_name)


def _decoder_for(base_model):
    if getattr(base_model.config, "model_type", None) == "bloom" and hasattr(base_model, "transformer"):
        return BloomDecoder(base_model)
    return None


class FastPromptModel(torch.nn.Module):
    def __init__(
        self,
        base_model,
        peft_config: PromptTuningConfig,
        prompt: torch.Tensor | None = None,
        adapter_name: str = "default",
    ):
        super().__init__()
        if not isinstance(base_model, torch.nn.Module) or not hasattr(base_model, "config"):
            raise TypeError(f"base model must be a transformers model, got {type(base_model).__name__}")
        config = prompt_io.prepare_config(peft_config, base_model)
        embeddings = prompt_io.input_embeddings(base_model)
        if prompt is None:
            prompt = prompt_io.initial_prompt(config, embeddings)
        elif tuple(prompt.shape) != (config.num_virtual_tokens, config.token_dim):
            raise ValueError(
                f"prompt has shape {tuple(prompt.shape)}, expected "
                f"({config.num_virtual_tokens}, {config.token_dim})"
            )
        base_model.requires_grad_(False)
        self.base_model = base_model
        self.adapter_name = adapter_name
        self.peft_config = {adapter_name: config}
        self.prompt_embeddings = torch.nn.Parameter(
            prompt.detach().to(device=embeddings.weight.device, dtype=torch.float32).clone(),
            requires_grad=not config.inference_mode,
        )
        self._decoder = _decoder_for(base_model)

    # ------------------------------------------------------------------ info
    @property
    def active_peft_config(self) -> PromptTuningConfig:
        return self.peft_config[self.adapter_name]

    @property
    def num_virtual_tokens(self) -> int:
        return self.active_peft_config.num_virtual_tokens

    @property
    def config(self):
        return self.base_model.config

    @property
    def device(self) -> torch.device:
        return self.prompt_embeddings.device

    def get_base_model(self):
        return self.base_model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    # The base model is frozen and loaded separately; checkpoints (e.g. the
    # Trainer's) need only the prompt, and a full state dict of a tied-weight
    # model cannot even be written as safetensors.
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        tensor = self.prompt_embeddings if keep_vars else self.prompt_embeddings.detach()
        state = {} if destination is None else destination
        state[prefix + "prompt_embeddings"] = tensor
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        keys = set(state_dict)
        if strict and keys != {"prompt_embeddings"}:
            raise ValueError(f"expected only 'prompt_embeddings' in the state dict, got {sorted(keys)}")
        if "prompt_embeddings" in state_dict:
            with torch.no_grad():
                self.prompt_embeddings.copy_(state_dict["prompt_embeddings"])
        return torch.nn.modules.module._IncompatibleKeys([], [])

    # Trainer calls these names; transformers 5 renamed them on the base model.
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        kwargs = gradient_checkpointing_kwargs or {"use_reentrant": False}
        enable = getattr(self.base_model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def gradient_checkpointing_disable(self):
        disable = getattr(self.base_model, "activation_checkpointing_disable", None)
        (disable or self.base_model.gradient_checkpointing_disable)()

    # --------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        task_ids=None,
        return_logits: bool | None = None,
        num_items_in_batch=None,
        **kwargs,
    ) -> CausalLMOutput:
        """PEFT's forward. With ``labels`` only the loss is computed unless
        ``return_logits=True``; without labels ``logits`` is ``[B, P+T, V]``."""
        _check_inputs(input_ids, inputs_embeds, attention_mask, labels)
        want_logits = labels is None if return_logits is None else return_logits
        # Attentions, hidden states or extra base-model arguments exist only on the base model's own path.
        wants_base_outputs = output_attentions or output_hidden_states or kwargs
        if self._decoder is None or inputs_embeds is not None or wants_base_outputs:
            return self._peft_forward(
                input_ids, attention_mask, inputs_embeds, labels, num_items_in_batch,
                output_attentions=output_attentions, output_hidden_states=output_hidden_states, **kwargs,
            )
        return self._bloom_forward(input_ids, attention_mask, labels, want_logits, num_items_in_batch)

    def _peft_forward(self, input_ids, attention_mask, inputs_embeds, labels, num_items_in_batch, **kwargs):
        """The reference semantics, for architectures without a fast decoder."""
        if inputs_embeds is None:
            inputs_embeds = self.base_model.get_input_embeddings()(input_ids)
        batch = inputs_embeds.shape[0]
        count = self.num_virtual_tokens
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(batch, count), attention_mask], dim=1)
        if labels is not None:
            labels = torch.cat([labels.new_full((batch, count), IGNORE_INDEX), labels], dim=1)
        if num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        prompts = self.prompt_embeddings.to(inputs_embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        out = self.base_model(
            inputs_embeds=torch.cat([prompts, inputs_embeds], dim=1),
            attention_mask=attention_mask,
            labels=labels,
            **{k: v for k, v in kwargs.items() if v is not None},
        )
        return CausalLMOutput(loss=out.loss, logits=out.logits)

    def _embed(self, input_ids, prompt) -> torch.Tensor:
        """BLOOM's embedding + ``word_embeddings_layernorm`` of ``cat(prompt,
        weight[ids])`` in one fused op (Triton on CUDA, native or torch on CPU)."""
        norm = self._decoder.embedding_layernorm
        return embed_concat(
            input_ids, self._decoder.word_embeddings.weight, prompt, norm.weight, norm.bias, norm.eps
        )

    def _embed_prompt(self) -> torch.Tensor:
        """Post-LayerNorm hidden states of the virtual tokens, [1, P, H]."""
        no_tokens = torch.empty(1, 0, dtype=torch.long, device=self.device)
        return self._embed(no_tokens, self.prompt_embeddings)

    def _embed_tokens(self, input_ids) -> torch.Tensor:
        """Post-LayerNorm hidden states of the real tokens, [B, T, H]."""
        return self._embed(input_ids, self.prompt_embeddings[:0])

    def prefix_states(self):
        """Run the virtual tokens once, at batch 1: final hidden [1, P, H] and,
        per layer, the K/V segment every row attends to."""
        key_mask = torch.ones(1, self.num_virtual_tokens, dtype=torch.long, device=self.device)
        final, kv = self._decoder.forward(self._embed_prompt(), key_mask)
        return final, [[KVSegment(key, value, shared=True)] for key, value in kv]

    def _bloom_forward(self, input_ids, attention_mask, labels, want_logits, num_items_in_batch):
        """BLOOM: the prefix once per batch (shared K/V), label-only loss."""
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        count = self.num_virtual_tokens
        key_mask = torch.cat([attention_mask.new_ones(batch, count), attention_mask], dim=1)
        if batch == 1:
            # Nothing to share with one row: one pass over cat(prompt, tokens)
            # from the fused embed+concat op beats two passes of smaller GEMMs.
            final, _ = self._decoder.forward(self._embed(input_ids, self.prompt_embeddings), key_mask)
            prefix_final, token_final = final[:, :count], final[:, count:]
        else:
            prefix_final, prefix_kv = self.prefix_states()
            token_final, _ = self._decoder.forward(self._embed_tokens(input_ids), key_mask, past=prefix_kv)

        loss = logits = None
        if labels is not None:
            loss = prefix_causal_lm_loss(
                prefix_final[0, -1], token_final, labels, self.base_model.get_output_embeddings(), num_items_in_batch
            )
        if want_logits:
            hidden = torch.cat([prefix_final.expand(batch, -1, -1), token_final], dim=1)
            logits = self.base_model.get_output_embeddings()(hidden)
        return CausalLMOutput(loss=loss, logits=logits)

    def generate(self, input_ids=None, attention_mask=None, **kwargs) -> torch.Tensor:
        """HF-style generation behind the soft prompt (see ``generation.py``):
        ``[B * num_return_sequences, T + new]`` ids, inputs left-padded."""
        return generation.generate(self, input_ids, attention_mask, **kwargs)

    # ------------------------------------------------------------------- io
    def save_pretrained(self, save_directory, **_trainer_kwargs) -> None:
        """PEFT format; ``peft.PeftModel.from_pretrained`` loads it."""
        prompt_io.save_adapter(save_directory, self.active_peft_config, self.prompt_embeddings)

    @classmethod
    def from_pretrained(cls, base_model, adapter_directory, is_trainable: bool = False, adapter_name="default"):
        """Load an adapter written by PEFT or by ``save_pretrained``. As in PEFT,
        the prompt is frozen unless ``is_trainable``."""
        config, prompt = prompt_io.load_adapter(adapter_directory)
        config.inference_mode = not is_trainable
        embeddings = prompt_io.input_embeddings(base_model)
        if config.token_dim != embeddings.embedding_dim:
            raise ValueError(
                f"adapter in {str(adapter_directory)!r} has token_dim {config.token_dim}, but the model's "
                f"hidden size is {embeddings.embedding_dim}"
            )
        return cls(base_model, config, prompt=prompt, adapter_name=adapter_name)


def _check_inputs(input_ids, inputs_embeds, attention_mask, labels) -> None:
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
        if not torch.is_tensor(input_ids):
            raise TypeError(f"input_ids must be a tensor, got {type(input_ids).__name__}")
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"input_ids must be a 2-D integer tensor [batch, tokens], got {input_ids.dim()}-D {input_ids.dtype}"
            )
        shape = tuple(input_ids.shape)
    else:
        if not torch.is_tensor(inputs_embeds) or inputs_embeds.dim() != 3:
            raise ValueError("inputs_embeds must be a 3-D tensor [batch, tokens, hidden]")
        shape = tuple(inputs_embeds.shape[:2])
    for name, tensor in (("attention_mask", attention_mask), ("labels", labels)):
        if tensor is None:
            continue
        if not torch.is_tensor(tensor):
            raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} but the inputs have shape {shape}")
