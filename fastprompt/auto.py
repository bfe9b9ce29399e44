"""Load an adapter and the base it names in one call, as PEFT's ``AutoPeftModelForCausalLM`` does."""

from __future__ import annotations

from .loading import load_model
from .model import FastPromptModel

# Keywords that say where the adapter is as much as where the base is: both loads get them.
SHARED_HUB_KWARGS = ("token", "local_files_only", "cache_dir")


class AutoFastPromptModelForCausalLM:
    """``AutoFastPromptModelForCausalLM.from_pretrained(adapter)``: the base
    model named in the adapter's ``adapter_config.json`` (``base_model_name_or_path``,
    at the adapter's ``revision`` of it; the built-in ``"tiny-bloom"`` too),
    loaded by ``fastprompt.load_model``, with the adapter on it: a ``FastPromptModel``."""

    def __init__(self):
        raise TypeError("use AutoFastPromptModelForCausalLM.from_pretrained(adapter_dir_or_id)")

    @classmethod
    def from_pretrained(
        cls,
        adapter_dir_or_id,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config=None,
        revision: str | None = None,
        subfolder: str | None = None,
        **kwargs,
    ) -> FastPromptModel:
        """``adapter_name``, ``is_trainable``, ``config``, ``revision`` and
        ``subfolder`` are the adapter's, as in ``FastPromptModel.from_pretrained``;
        other keywords go to ``load_model`` for the base (``load_in_8bit``,
        ``load_in_4bit``, ``dtype``, ``device_map``, ...); ``token``,
        ``local_files_only`` and ``cache_dir`` to both."""
        from peft import PeftConfig

        shared = {key: kwargs[key] for key in SHARED_HUB_KWARGS if key in kwargs}
        adapter_kwargs = {**shared, **({"subfolder": subfolder} if subfolder else {})}
        saved = config
        if saved is None:
            try:
                saved = PeftConfig.from_pretrained(str(adapter_dir_or_id), revision=revision, **adapter_kwargs)
            except ValueError as err:
                raise ValueError(f"cannot read the adapter config of {str(adapter_dir_or_id)!r}: {err}") from None
        base_name = saved.base_model_name_or_path
        if not base_name:
            raise ValueError(
                f"the adapter config of {str(adapter_dir_or_id)!r} names no base model (base_model_name_or_path); "
                "load the base yourself and use FastPromptModel.from_pretrained(base, adapter)"
            )
        if saved.revision is not None:
            kwargs.setdefault("revision", saved.revision)
        base = load_model(base_name, **kwargs)
        if revision is not None:
            adapter_kwargs["revision"] = revision
        return FastPromptModel.from_pretrained(
            base,
            adapter_dir_or_id,
            adapter_name=adapter_name,
            is_trainable=is_trainable,
            config=config,
            **adapter_kwargs,
        )
