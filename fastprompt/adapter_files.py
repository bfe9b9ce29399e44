"""What an adapter directory says about itself, beyond PEFT's own saving.

PEFT's ``save_pretrained`` writes ``adapter_config.json``, the weights and a
``README.md``. Left alone, for a model fastprompt loaded, those files say too
little or something PEFT cannot use: the model card is PEFT's placeholder
("More Information Needed"), ``base_model_name_or_path`` is the built-in
model's directory inside this installation, and a text init names the
built-in tokenizer, which PEFT cannot load by name (a PEFT model built from
the saved config, to train further, failed). ``FastPromptModel.save_pretrained``
runs PEFT's own save on the configs of :func:`config_to_save`, then names
the base as the user did (:func:`name_base_as_user_did`) and writes the card
of :func:`model_card`;
``fastprompt train`` adds what it knows of the run (:func:`record_training`).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from peft import PromptTuningInit

from .adapter_check import ADAPTER_CONFIG
from .loading import TINY_BLOOM, tiny_bloom_path

CARD_FILE = "README.md"
# The line that marks a card as ours: a README.md anyone else wrote is left to PEFT to update.
CARD_MARKER = "<!-- written by fastprompt -->"
TRAINING_HEADING = "## Training"
NOT_RECORDED = "Not recorded: the adapter was saved by the library, outside `fastprompt train`."


def user_model_name(name_or_path) -> str | None:
    """The base model's name as a user would type it again: the built-in
    model's directory inside the installation is ``"tiny-bloom"``."""
    if not name_or_path:
        return None
    name = str(name_or_path)
    try:
        if Path(name).resolve() == tiny_bloom_path().resolve():
            return TINY_BLOOM
    except OSError:
        pass
    return name


def config_to_save(config):
    """The config PEFT's save writes: no text init whose tokenizer PEFT
    cannot load by name (the built-in one), and the built-in base by its
    directory, which PEFT's save looks up (its config.json, to tell whether
    the vocabulary was resized; the name would send it to the hub).
    PEFT loads an adapter in inference mode, with the saved prompt and no
    init, so only the record of how training began is lost, and the model
    card keeps it; a config read back can start a training run again."""
    saved = copy.copy(config)
    if saved.base_model_name_or_path == TINY_BLOOM:
        saved.base_model_name_or_path = str(tiny_bloom_path())
    if getattr(config, "prompt_tuning_init", None) == PromptTuningInit.TEXT and not _loadable_by_name(
        config.tokenizer_name_or_path
    ):
        saved.prompt_tuning_init = PromptTuningInit.RANDOM
        saved.prompt_tuning_init_text = None
        saved.tokenizer_name_or_path = None
        saved.tokenizer_kwargs = None
    return saved


def base_model_name(config, base_model) -> str | None:
    """The base as the adapter records it: as the user named it. PEFT fills
    a missing name from the base model at save time, as here."""
    return user_model_name(config.base_model_name_or_path or base_model.__dict__.get("name_or_path"))


def name_base_as_user_did(directory, model, adapters) -> None:
    """Rewrite ``base_model_name_or_path`` in the saved configs of
    ``adapters`` under ``directory`` (PEFT's layout: "default" at the top, others
    in a subdirectory each), after PEFT's save (see :func:`config_to_save`)."""
    for adapter in adapters:
        config_file = Path(directory) / ("" if adapter == "default" else adapter) / ADAPTER_CONFIG
        if not config_file.is_file():
            continue
        saved = json.loads(config_file.read_text(encoding="utf-8"))
        name = base_model_name(model.peft_config[adapter], model.get_base_model())
        if saved.get("base_model_name_or_path") != name:
            saved["base_model_name_or_path"] = name
            # As PEFT writes it (PeftConfigMixin.save_pretrained).
            config_file.write_text(json.dumps(saved, indent=2, sort_keys=True), encoding="utf-8")


def _loadable_by_name(tokenizer: str | None) -> bool:
    return bool(tokenizer) and str(tokenizer) != TINY_BLOOM


def _init(config) -> str:
    init = getattr(config, "prompt_tuning_init", None)
    if init is None:
        return f"prompt encoder ({getattr(config, 'encoder_reparameterization_type', '')})"
    init = getattr(init, "value", init)
    if init == PromptTuningInit.TEXT.value:
        return f"text {config.prompt_tuning_init_text!r} (tokenizer `{user_model_name(config.tokenizer_name_or_path)}`)"
    return str(init).lower()


def model_card(model) -> str:
    """A card for the adapters of ``model``: base, method, prompt, how to load
    it; training not recorded (:func:`record_training` adds it)."""
    from peft import __version__ as peft_version

    from . import __version__

    configs = model.peft_config
    base = base_model_name(next(iter(configs.values())), model.get_base_model()) or "unknown"
    quantization = getattr(model.get_base_model().config, "quantization_config", None)
    quantized = ""
    if quantization is not None:
        bits = "4-bit" if getattr(quantization, "load_in_4bit", False) else "8-bit"
        quantized = f" ({bits}, bitsandbytes)"
    rows = "\n".join(
        f"| {name} | {getattr(config.peft_type, 'value', config.peft_type)} | {config.num_virtual_tokens} | "
        f"{_init(config)} |"
        for name, config in configs.items()
    )
    return f"""---
library_name: peft
base_model: {json.dumps(base)}
pipeline_tag: text-generation
tags:
- peft
- fastprompt
- prompt-tuning
- {json.dumps(f"base_model:adapter:{base}")}
---
{CARD_MARKER}
# Soft prompt for `{base}`

Soft-prompt adapters (PEFT format) for the causal LM `{base}`{quantized}, written by
fastprompt {__version__} with PEFT {peft_version}.

| adapter | method | virtual tokens | initialised from |
|---|---|---|---|
{rows}

{TRAINING_HEADING}

{NOT_RECORDED}

## Use

```python
import fastprompt

model = fastprompt.AutoFastPromptModelForCausalLM.from_pretrained("path/to/this/adapter")
```

or with PEFT itself, on a base loaded as `fastprompt.load_model("{base}")` (or by transformers):
`peft.PeftModel.from_pretrained(base, "path/to/this/adapter")`.
"""


def has_foreign_card(directory) -> bool:
    """Whether ``directory`` holds a README.md that someone else wrote (which PEFT updates, and we leave)."""
    card = Path(directory) / CARD_FILE
    return card.is_file() and CARD_MARKER not in card.read_text(encoding="utf-8")


def write_model_card(model, directory) -> None:
    """Our card into ``directory``, unless someone else's is there."""
    if not has_foreign_card(directory):
        os.makedirs(directory, exist_ok=True)
        (Path(directory) / CARD_FILE).write_text(model_card(model), encoding="utf-8")


def record_training(directory, facts: dict[str, object]) -> None:
    """Replace the training section of our card in ``directory`` with
    ``facts`` (one bullet each: steps, final loss, ...)."""
    card = Path(directory) / CARD_FILE
    text = card.read_text(encoding="utf-8")
    if CARD_MARKER not in text or NOT_RECORDED not in text:
        return
    lines = "\n".join(f"- {name}: {value}" for name, value in facts.items())
    card.write_text(text.replace(NOT_RECORDED, f"Trained with `fastprompt train`:\n\n{lines}"), encoding="utf-8")


def hub_unreachable(err: BaseException, endpoint: str) -> ConnectionError | None:
    """One line for a push that failed to reach the hub (the HTTP client's
    connect or transport error, or ``HF_HUB_OFFLINE``), or None for other errors."""
    names = {cls.__name__ for cls in type(err).__mro__}
    if not (isinstance(err, ConnectionError) or names & {"TransportError", "ConnectionError"}):
        return None
    reason = " ".join(str(err).split()) or type(err).__name__
    return ConnectionError(f"cannot push to the Hugging Face hub: {endpoint} cannot be reached ({reason})")
