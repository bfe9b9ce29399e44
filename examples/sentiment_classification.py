"""Sentiment classification with a soft prompt: the class is a label word the
frozen model predicts at the last position of "Review: ...\\nSentiment:".

Only that position carries a label (-100 everywhere else), so training is the
ordinary prompt-tuning loop of ``fastprompt.app.train`` on examples built by hand,
and prediction compares the logits of the label words (" positive" vs
" negative") at the last position of a left-padded batch.

The data is a small synthetic set of English reviews. The built-in tiny-bloom
was pre-trained on 40 bundled records and knows little English sentiment, so
expect the loss to fall and the accuracy to move little; point --model at a
pretrained causal LM for a real classifier (``fastprompt demo`` shows a task
tiny-bloom does learn).

    python examples/sentiment_classification.py [--model DIR] [--epochs N]
"""

from __future__ import annotations

import argparse
import itertools
import random
import tempfile

import torch
from peft import PromptTuningConfig, PromptTuningInit, TaskType

import fastprompt
from fastprompt.app.data import PadCollator, TokenizedData
from fastprompt.app.train import TrainConfig, evaluate, train

SUBJECTS = ["The food", "The service", "This phone", "The hotel room", "The movie", "This book"]
WORDS = {
    "positive": ["great", "wonderful", "excellent", "lovely", "delightful"],
    "negative": ["terrible", "awful", "disappointing", "horrible", "broken"],
}
INIT_TEXT = "Classify the sentiment of the review as positive or negative."


def reviews(seed: int) -> list[tuple[str, str]]:
    pairs = [
        (f"{subject} was {word}.", label)
        for label, words in WORDS.items()
        for subject, word in itertools.product(SUBJECTS, words)
    ]
    random.Random(seed).shuffle(pairs)
    return pairs


def label_token_ids(tokenizer) -> dict[str, int]:
    """The first token of each label word; they must differ to be told apart."""
    ids = {label: tokenizer(" " + label, add_special_tokens=False)["input_ids"][0] for label in WORDS}
    if len(set(ids.values())) != len(ids):
        raise ValueError(f"label words share their first token: {ids}")
    return ids


def encode(text: str, label_id: int, tokenizer) -> dict[str, list[int]]:
    ids = tokenizer(f"Review: {text}\nSentiment:")["input_ids"]
    return {
        "input_ids": ids + [label_id],
        "attention_mask": [1] * (len(ids) + 1),
        "labels": [-100] * len(ids) + [label_id],
    }


@torch.no_grad()
def accuracy(model, data: TokenizedData, label_ids: dict[str, int], pad_id: int) -> float:
    # Drop the label token and pad on the left: the last position predicts it.
    unlabelled = [{name: values[:-1] for name, values in example.items()} for example in data.examples]
    batch = PadCollator(pad_id, padding_side="left")(unlabelled)
    candidates = list(label_ids.values())
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -1, candidates]
    predicted = torch.tensor(candidates)[logits.argmax(dim=-1)]
    gold = torch.tensor([example["labels"][-1] for example in data.examples])
    return (predicted == gold).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-bloom")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--num-virtual-tokens", type=int, default=16)
    parser.add_argument("--output", default=None, help="adapter directory (default: a temporary directory)")
    args = parser.parse_args()

    base = fastprompt.load_model(args.model)
    tokenizer = base.tokenizer
    label_ids = label_token_ids(tokenizer)
    examples = [encode(text, label_ids[label], tokenizer) for text, label in reviews(seed=0)]
    train_data, test_data = TokenizedData(examples[:44]), TokenizedData(examples[44:])
    pad_id = tokenizer.pad_token_id

    torch.manual_seed(0)
    model = fastprompt.get_peft_model(
        base,
        PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=args.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT,
            prompt_tuning_init_text=INIT_TEXT,
            tokenizer_name_or_path=args.model,
        ),
    )
    model.eval()
    loss_before = evaluate(model, train_data, pad_id)
    accuracy_before = accuracy(model, test_data, label_ids, pad_id)
    output = args.output or tempfile.mkdtemp(prefix="fastprompt-sentiment-")
    train(
        model,
        train_data,
        TrainConfig(output=output, epochs=args.epochs, lr=args.lr, save_every=0, log_every=6),
        pad_token_id=pad_id,
    )
    model.eval()
    loss_after = evaluate(model, train_data, pad_id)
    accuracy_after = accuracy(model, test_data, label_ids, pad_id)
    print(f"label-token loss on the training reviews: {loss_before:.4f} -> {loss_after:.4f}")
    print(f"accuracy on {len(test_data)} held-out reviews: {accuracy_before:.2f} -> {accuracy_after:.2f}")
    print(f"adapter saved to {output}")


if __name__ == "__main__":
    main()
