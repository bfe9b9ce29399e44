"""``fastprompt demo``: a soft prompt teaches tiny-bloom a task it does not do.

tiny-bloom (``fastprompt/app/tiny_bloom.py``) is a chatbot pre-trained on the
bundled Alpaca records: after ``"Human: ...\\n\\nAssistant: "`` it answers. The
task taught here is to reply with the language of the message instead,
``中文`` or ``English``, and nothing else. The messages are the sentences and
clauses of the bundled records (split after 。，.,:; and the like, mixed-script
ones dropped, each once); a fixed 12 of each language are held out and never
trained on, so the before/after figures measure a learned task, not memorised
answers:

- held-out loss per label token (the label word and eos);
- held-out accuracy of the forced choice between the two label words (the one
  the model gives the higher probability), where chance is 50%.

Then one Chinese and one English held-out message are answered greedily before
and after training, and the adapter is saved in PEFT's format, loaded back with
``peft.PeftModel.from_pretrained`` on a fresh base, and its logits are compared
with fastprompt's on a held-out batch.

    python -m fastprompt.app.demo   # about 20 s, start-up included, on 2 CPU cores
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..loading import TINY_BLOOM, demo_data_path
from ..loss import IGNORE_INDEX
from .data import PadCollator, TokenizedData, tokenize_record
from .template import TUTORIAL_TEMPLATE

LABELS = {"chinese": "中文", "english": "English"}
HELD_OUT_PER_LANGUAGE = 12
INIT_TEXT = "这句话是中文还是English？"
NUM_VIRTUAL_TOKENS = 16
LR = 0.1
EPOCHS = 40
BATCH_SIZE = 8
TRAINING_LOG_LINES = 4
MAX_NEW_TOKENS = 8

_SENTENCE_END = re.compile(r"(?<=[。！？.!?，,；;：:])\s*|\n")
_CJK = re.compile(r"[\u4e00-\u9fff]")
_LATIN = re.compile(r"[A-Za-z]")


def labelled_sentences(records: list[dict]) -> list[tuple[str, str]]:
    """(sentence, language) for every distinct sentence or clause of every
    field, in order; one with both scripts (``Python、Java 和 C++。``) has no
    single answer and is dropped, and so are fragments under 4 characters."""
    seen = {}
    for record in records:
        for text in record.values():
            for sentence in _SENTENCE_END.split(text):
                sentence = sentence.strip()
                chinese, latin = bool(_CJK.search(sentence)), bool(_LATIN.search(sentence))
                if len(sentence) >= 4 and chinese != latin:
                    seen.setdefault(sentence, "chinese" if chinese else "english")
    return list(seen.items())


def split_by_language(
    sentences: list[tuple[str, str]], per_language: int, seed: int = 0
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held-out): a seeded draw of ``per_language`` sentences of each
    language is held out, so held-out chance accuracy is exactly 50%."""
    train, held_out = [], []
    for language in LABELS:
        mine = [pair for pair in sentences if pair[1] == language]
        random.Random(seed).shuffle(mine)
        held_out += mine[:per_language]
        train += mine[per_language:]
    return train, held_out


def _example(sentence: str, label: str, tokenizer) -> dict[str, list[int]]:
    return tokenize_record({"instruction": sentence, "input": "", "output": label}, tokenizer)


def encode(pairs: list[tuple[str, str]], tokenizer) -> TokenizedData:
    return TokenizedData([_example(sentence, LABELS[language], tokenizer) for sentence, language in pairs])


@torch.no_grad()
def label_log_probs(model, examples: list[dict[str, list[int]]], pad_token_id: int) -> torch.Tensor:
    """Per example, the summed log-probability of its labelled tokens."""
    batch = PadCollator(pad_token_id)(examples)
    length = batch["input_ids"].shape[1]
    # The logits cover the virtual tokens too; the last `length` are the text's,
    # and position t predicts token t + 1.
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -length:-1]
    targets = batch["labels"][:, 1:]
    picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (targets != IGNORE_INDEX)).sum(dim=-1)


def accuracy(model, pairs: list[tuple[str, str]], tokenizer, pad_token_id: int) -> float:
    """Share of ``pairs`` whose own label word is more probable than the other."""
    scores = torch.stack(
        [
            label_log_probs(model, [_example(sentence, word, tokenizer) for sentence, _ in pairs], pad_token_id)
            for word in LABELS.values()
        ]
    )
    truth = torch.tensor([list(LABELS).index(language) for _, language in pairs])
    return (scores.argmax(dim=0) == truth).float().mean().item()


@torch.no_grad()
def answers(model, sentences: list[str], tokenizer) -> list[str]:
    prompts = [TUTORIAL_TEMPLATE.render_prompt({"instruction": s, "input": ""}) for s in sentences]
    batch = tokenizer(prompts, padding=True, return_tensors="pt")  # left padding: tiny-bloom's default
    sequences = model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
    )
    new = sequences[:, batch["input_ids"].shape[1] :]
    return [tokenizer.decode(row, skip_special_tokens=True) for row in new]


@torch.no_grad()
def max_logit_difference(ours, theirs, data: TokenizedData, pad_token_id: int) -> tuple[float, tuple[int, int]]:
    """Largest |logit| difference over the real (unpadded) positions of a batch
    of ``data``, and the batch's shape."""
    batch = PadCollator(pad_token_id)(data.examples)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    ours_logits, theirs_logits = ours(**inputs).logits, theirs(**inputs).logits
    virtual = ours_logits.shape[1] - batch["input_ids"].shape[1]
    real = torch.cat([torch.ones(len(data), virtual, dtype=torch.bool), batch["attention_mask"].bool()], dim=1)
    return (ours_logits - theirs_logits).abs()[real].max().item(), tuple(batch["input_ids"].shape)


def run(output: Path | None = None, epochs: int = EPOCHS, seed: int = 0) -> int:
    """Train, measure, save, reload with PEFT; prints each step. ``output``
    receives the adapter (a temporary directory when None)."""
    threads = torch.get_num_threads()
    # tiny-bloom's matrices are too small to gain from a second thread, and on
    # a shared machine threads that wait for each other stall every step.
    torch.set_num_threads(1)
    try:
        return _run(output, epochs, seed)
    finally:
        torch.set_num_threads(threads)


def _run(output: Path | None, epochs: int, seed: int) -> int:
    from peft import PeftModel, PromptTuningConfig, PromptTuningInit, TaskType

    import fastprompt

    from .train import evaluate, train
    from .train_config import TrainConfig

    started = time.perf_counter()
    base = fastprompt.load_model(TINY_BLOOM)
    tokenizer = base.tokenizer
    pad_id = tokenizer.pad_token_id
    records = json.loads(demo_data_path().read_text(encoding="utf-8"))
    train_pairs, held_out_pairs = split_by_language(labelled_sentences(records), HELD_OUT_PER_LANGUAGE)
    train_data, held_out = encode(train_pairs, tokenizer), encode(held_out_pairs, tokenizer)
    shown = [next(s for s, language in held_out_pairs if language == wanted) for wanted in LABELS]

    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        prompt_tuning_init=PromptTuningInit.TEXT,
        num_virtual_tokens=NUM_VIRTUAL_TOKENS,
        prompt_tuning_init_text=INIT_TEXT,
        tokenizer_name_or_path=TINY_BLOOM,
    )
    torch.manual_seed(seed)
    model = fastprompt.get_peft_model(base, config)
    print(
        f"task: answer with the language of the message ({' / '.join(LABELS.values())}); tiny-bloom, "
        f"a {NUM_VIRTUAL_TOKENS}-token prompt, {len(train_data)} training and {len(held_out)} held-out "
        f"sentences of the bundled records",
        flush=True,
    )
    before_loss = evaluate(model, held_out, pad_id)
    before_accuracy = accuracy(model, held_out_pairs, tokenizer, pad_id)
    before_answers = answers(model, shown, tokenizer)

    steps_per_epoch = math.ceil(len(train_data) / BATCH_SIZE)
    with tempfile.TemporaryDirectory(prefix="fastprompt-demo-run-") as scratch:
        train(
            model,
            train_data,
            TrainConfig(
                output=Path(scratch),
                epochs=epochs,
                batch_size=BATCH_SIZE,
                lr=LR,
                save_every=0,
                seed=seed,
                log_every=steps_per_epoch * max(1, epochs // TRAINING_LOG_LINES),
                progress=False,
            ),
            pad_token_id=pad_id,
        )
    model.eval()
    after_loss = evaluate(model, held_out, pad_id)
    after_accuracy = accuracy(model, held_out_pairs, tokenizer, pad_id)
    print(
        f"1. held-out loss: {before_loss:.3f} -> {after_loss:.3f} nats per label token "
        f"({after_loss - before_loss:+.3f})"
    )
    print(f"   held-out accuracy: {before_accuracy:.1%} -> {after_accuracy:.1%} (chance {1 / len(LABELS):.1%})")
    print("2. greedy answers to held-out messages, before -> after training:")
    for sentence, before, after in zip(shown, before_answers, answers(model, shown, tokenizer)):
        print(f"   {sentence!r}: {before!r} -> {after!r}")

    with tempfile.TemporaryDirectory(prefix="fastprompt-demo-") as scratch:
        directory = Path(output) if output is not None else Path(scratch)
        model.save_pretrained(str(directory))
        saved = ", ".join(sorted(p.name for p in directory.iterdir() if p.is_file()))
        # PEFT gets a fresh base: the saved files alone must carry the prompt.
        peft_model = PeftModel.from_pretrained(fastprompt.load_model(TINY_BLOOM), str(directory)).eval()
        difference, shape = max_logit_difference(model, peft_model, held_out, pad_id)
    print(
        f"3. saved {'to ' + str(directory) if output is not None else 'to a temporary directory'} ({saved}); "
        f"reloaded with peft.PeftModel.from_pretrained: max |logit diff| fastprompt vs PEFT = {difference:.2e} "
        f"on a batch of {shape} tokens"
    )
    print(f"done in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    import warnings

    import transformers

    # The demo prints its own steps: loading bars on stderr would read as
    # problems, and so would the deprecation warning peft 0.21 triggers by
    # reading transformers' `is_gradient_checkpointing`.
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    sys.exit(run())
