"""The recipe that made tiny-bloom, the built-in default model shipped in
``fastprompt/resources/tiny-bloom/``.

tiny-bloom has to load with no model hub, yet behave like a pre-trained model:
a soft prompt steers what a model already knows, and on random weights it can
only fight noise. So it is a BLOOM small enough to ship (vocab 512, hidden 256,
2 layers of 2 heads with BLOOM's head size 128: 1.7M parameters, 3.4 MB in
fp16) pre-trained on the bundled demo data, a chatbot that knows 40 answers.

Recipe (:func:`pretrain`):

1. Tokenizer: byte-level BPE with 512 entries (4 special tokens, the 256 bytes,
   252 merges) trained on the 40 records as the chat template renders them.
   Byte-level, so any text (Chinese included) encodes without ``<unk>``; small,
   so that characters and common words are pieces shared across records and
   the model learns them instead of memorising one token per phrase (with
   1024 or 2048 entries, most phrases single tokens, a soft prompt could not
   teach the model ``fastprompt.app.demo``'s task).
2. Model: BLOOM without dropout, initialised from our own seeded generator in a
   fixed parameter order, so the start does not depend on transformers' init code.
3. Training: causal LM loss on every token of every record rendered with the
   tutorial's template (``"Human: {instruction}\\n{input}"`` stripped, then
   ``"\\n\\nAssistant: "``, the output, eos). Each step sees all 40 records, in
   fixed micro-batches of similar length, its loss averaged over all their
   tokens; AdamW (lr 3e-3, betas 0.9/0.95, weight decay 0.01, clip 1.0), 20
   warmup steps then cosine decay, 150 steps; 1 thread. The loss goes from
   about 6.4 to about 0.06: the records are learned almost by heart.
4. Stored: weights as fp16 safetensors (upcast to fp32 on load: the config says
   float32), the config and the tokenizer files.

Rerun it with ``python -m fastprompt.app.tiny_bloom --output DIR``: about 80 s on
one CPU core (``--steps`` shortens it). With the same torch build on the same
kind of CPU the files are identical to the shipped ones, byte for byte;
elsewhere floating-point rounding may move the last bits.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch

from ..loading import demo_data_path
from .data import PadCollator, tokenize_record
from .template import TUTORIAL_TEMPLATE

SEED = 1234
STEPS = 150
# Its matrices are too small to gain from more threads, and with more a shared
# machine stalls the run; a fixed count also fixes how reductions round.
THREADS = 1
PEAK_LR = 3e-3
WARMUP_STEPS = 20
MICRO_BATCHES = 4
STORAGE_DTYPE = torch.float16
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
CONFIG = dict(
    vocab_size=512,
    hidden_size=256,
    n_layer=2,
    n_head=2,  # head_dim 128, as in every released BLOOM
    layer_norm_epsilon=1e-5,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
)


def _records() -> list[dict]:
    return json.loads(demo_data_path().read_text(encoding="utf-8"))


def train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=CONFIG["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [TUTORIAL_TEMPLATE.render_prompt(r) + r[TUTORIAL_TEMPLATE.response_field] for r in _records()]
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",  # BLOOM's convention; generation needs left padding
    )


def initial_model():
    """The recipe's starting point: untrained, the same on every machine."""
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(**CONFIG))
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "layernorm" in name or name.startswith("transformer.ln_f"):
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    return model


def _lr_at(step: int, steps: int) -> float:
    warmup = min(1.0, (step + 1) / WARMUP_STEPS)
    return PEAK_LR * warmup * 0.5 * (1.0 + math.cos(math.pi * step / steps))


def pretrain(steps: int = STEPS, log=None):
    """(model, tokenizer) after ``steps`` steps of the recipe; ``log(step, loss)``
    is called after each step."""
    tokenizer = train_tokenizer()
    examples = []
    for record in _records():
        example = tokenize_record(record, tokenizer)
        example["labels"] = list(example["input_ids"])  # every token, prompt included
        examples.append(example)
    examples.sort(key=lambda example: len(example["input_ids"]))
    collate = PadCollator(tokenizer.pad_token_id)
    size = math.ceil(len(examples) / MICRO_BATCHES)
    micro_batches = [collate(examples[i : i + size]) for i in range(0, len(examples), size)]
    # Labels are shifted inside the model: a sequence of n tokens predicts n - 1.
    predicted = sum(len(example["input_ids"]) - 1 for example in examples)

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        model = initial_model()
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=(0.9, 0.95), weight_decay=0.01)
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, steps)
            loss = 0.0
            for batch in micro_batches:
                part = model(**batch, num_items_in_batch=predicted).loss
                part.backward()
                loss += part.item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if log is not None:
                log(step + 1, loss)
    finally:
        torch.set_num_threads(threads)
    return model.eval(), tokenizer


def save(model, tokenizer, directory) -> None:
    """An ordinary HF model directory whose weights are stored in fp16 but load
    as fp32 (the config's dtype) with a plain ``from_pretrained``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    config.dtype = torch.float32
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)
    weights = {
        name: tensor.to(STORAGE_DTYPE).contiguous()
        for name, tensor in model.state_dict().items()
        if name != "lm_head.weight"
    }  # tied to the embedding
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", required=True, type=Path, help="directory to write the model into")
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps (default: %(default)s)")
    args = parser.parse_args(argv)

    def log(step: int, loss: float) -> None:
        if step % 10 == 0 or step == args.steps:
            print(f"step {step} loss {loss:.4f}", flush=True)

    model, tokenizer = pretrain(args.steps, log)
    save(model, tokenizer, args.output)
    print(f"tiny-bloom written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
