"""Alpaca records → tokenised training examples, padding, and length-grouped batches.

The recipe is the tutorial's: the prompt is ``"Human: {instruction}\\n{input}"``
stripped, then ``"\\n\\nAssistant: "``; the example is prompt ids + response ids +
eos, labels are -100 over the prompt, and everything is cut to ``max_length``
(256). ``Template`` makes the prompt and response field configurable for other
formats. Records with a ``messages`` list are conversations instead, rendered
by the tokenizer's chat template with the loss on the assistant turns
(``chat.py``).

Real data is dirty, and one bad record should not cost a long run: records
with a missing field, a non-string field or an empty response are reported
(with their index or line) and skipped, or raise with ``strict=True``.

Batches are planned by length because the soft prompt is computed once per
batch and every padded position costs a full forward/backward: an optimizer
step takes ``batch_size`` examples of similar length, and those are cut into
micro-batches under a token budget (rows × longest row), so gradient
accumulation happens only when a step does not fit in memory.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..loss import IGNORE_INDEX
from . import chat
from .template import MAX_LENGTH, TUTORIAL_TEMPLATE, Template

log = logging.getLogger("fastprompt")

# How many individual problems are logged before only the count is kept.
REPORTED_PROBLEMS = 10


@dataclass
class DataReport:
    """What happened to each record of a source."""

    source: str
    total: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (where, why)

    @property
    def kept(self) -> int:
        return self.total - len(self.skipped)

    def summary(self) -> str:
        text = f"{self.source}: kept {self.kept} of {self.total} records"
        if self.skipped:
            text += f", skipped {len(self.skipped)}"
        return text


class TokenizedData(torch.utils.data.Dataset):
    """Examples ``{input_ids, attention_mask, labels}`` (lists of ints), usable
    directly as a ``Trainer`` dataset."""

    def __init__(self, examples: list[dict[str, list[int]]], report: DataReport | None = None):
        self.examples = examples
        self.report = report

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]

    @property
    def lengths(self) -> list[int]:
        return [len(example["input_ids"]) for example in self.examples]

    def subset(self, indices: Sequence[int]) -> TokenizedData:
        return TokenizedData([self.examples[i] for i in indices], self.report)


# ------------------------------------------------------------------ reading
@dataclass
class _Entry:
    where: str  # "record 3", "line 7", "row 12": how a user finds it
    value: object
    error: str | None = None


def _read_entries(path: Path) -> Iterator[_Entry]:
    """Records of a JSON list, a JSONL file, or a ``datasets`` directory
    (``save_to_disk``), whatever the file extension says."""
    if path.is_dir():
        yield from _read_dataset_dir(path)
        return
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: {err}") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
        for index, record in enumerate(records):
            yield _Entry(f"record {index}", record)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield _Entry(f"line {number}", json.loads(line))
        except json.JSONDecodeError as err:
            yield _Entry(f"line {number}", None, f"is not valid JSON ({err.msg})")


def _read_dataset_dir(path: Path) -> Iterator[_Entry]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise ValueError(f"{path} is a directory but not a dataset saved with save_to_disk") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" in loaded:
            loaded = loaded["train"]
        elif len(loaded) == 1:
            loaded = next(iter(loaded.values()))
        else:
            raise ValueError(f"{path} holds splits {sorted(loaded)}; expected one split or a 'train' split")
    for index, record in enumerate(loaded):
        yield _Entry(f"row {index}", record)


def read_records(
    path, template: Template = TUTORIAL_TEMPLATE, strict: bool = False
) -> tuple[list[tuple[str, dict]], DataReport]:
    """Valid records of ``path`` with where each was found, and a report of
    the rest. ``strict`` makes the first bad record an error."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    report = DataReport(str(path))
    records = []
    for entry in _read_entries(path):
        report.total += 1
        problem = entry.error or (
            chat.problem_with(entry.value) if chat.is_chat(entry.value) else template.problem_with(entry.value)
        )
        if problem is None:
            records.append((entry.where, entry.value))
        else:
            _reject(report, entry.where, problem, strict)
    return records, report


def _reject(report: DataReport, where: str, problem: str, strict: bool) -> None:
    message = f"{report.source}: {where} {problem}"
    if strict:
        raise ValueError(message)
    if len(report.skipped) < REPORTED_PROBLEMS:
        log.warning("fastprompt: skipping %s", message)
    report.skipped.append((where, problem))


# --------------------------------------------------------------- tokenising
def tokenize_record(
    record: Mapping[str, str], tokenizer, template: Template = TUTORIAL_TEMPLATE, max_length: int = MAX_LENGTH
) -> dict[str, list[int]]:
    """The tutorial's example: prompt ids + response ids + eos, labels -100 on
    the prompt, cut to ``max_length``."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; the response must end with one")
    prompt_ids = tokenizer(template.render_prompt(record))["input_ids"]
    # Special tokens (a BOS, for tokenizers that add one) belong at the start of
    # the text, not in the middle of it. BLOOM adds none, so this is the tutorial.
    response_ids = tokenizer(record[template.response_field], add_special_tokens=False)["input_ids"]
    response_ids = response_ids + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def load_alpaca(
    path, tokenizer, template: Template = TUTORIAL_TEMPLATE, max_length: int = MAX_LENGTH, strict: bool = False
) -> TokenizedData:
    """Read and tokenise an Alpaca-style dataset; records with a ``messages``
    list go through the tokenizer's chat template. Raises ValueError when no
    usable example remains."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    records, report = read_records(path, template, strict)
    if any(chat.is_chat(record) for _, record in records):
        chat.check_template(tokenizer, report.source)
    examples = []
    for where, record in records:
        if chat.is_chat(record):
            try:
                example = chat.tokenize_conversation(record[chat.MESSAGES_FIELD], tokenizer, max_length)
            except chat.UnusableConversation as refused:
                _reject(report, where, str(refused), strict)
                continue
        else:
            example = tokenize_record(record, tokenizer, template, max_length)
        if all(label == IGNORE_INDEX for label in example["labels"]):
            # Only the prompt fits: the record would train nothing.
            _reject(report, where, f"leaves no room for the response within max_length {max_length}", strict)
            continue
        examples.append(example)
    if report.skipped:
        log.warning("fastprompt: %s", report.summary())
    if not examples:
        raise ValueError(f"{report.source}: no usable records (of {report.total})")
    return TokenizedData(examples, report)


def split_holdout(data: TokenizedData, fraction: float, seed: int) -> tuple[TokenizedData, TokenizedData | None]:
    """(train, held-out) with a seeded random ``fraction`` held out; at least
    one example on each side."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return data, None
    count = min(len(data) - 1, max(1, round(fraction * len(data))))
    if count < 1:
        raise ValueError(f"cannot hold out examples from a dataset of {len(data)}")
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    return data.subset(sorted(order[count:])), data.subset(sorted(order[:count]))


# ------------------------------------------------------------------ batching
@dataclass(frozen=True)
class PadCollator:
    """Pads to the longest example: ids with ``pad_token_id``, mask with 0,
    labels with -100; on the right, or the left (BLOOM's generation side)."""

    pad_token_id: int
    padding_side: str = "right"

    def __post_init__(self):
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")

    def __call__(self, examples: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        longest = max(len(example["input_ids"]) for example in examples)
        fills = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        batch = {}
        for name, fill in fills.items():
            rows = []
            for example in examples:
                values = list(example[name])
                padding = [fill] * (longest - len(values))
                rows.append(padding + values if self.padding_side == "left" else values + padding)
            batch[name] = torch.tensor(rows, dtype=torch.long)
        return batch


def length_grouped_steps(lengths: Sequence[int], batch_size: int, seed: int, group_size: int = 16) -> list[list[int]]:
    """One epoch of optimizer steps, ``batch_size`` example indices each.

    A seeded shuffle, then within each group of ``group_size`` steps the
    examples are sorted by length, so a step holds similar lengths (little
    padding) while the data order stays random. The step order is shuffled
    too, so the longest examples do not always come first.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * group_size
    steps = []
    for start in range(0, len(order), span):
        group = sorted(order[start : start + span], key=lambda i: lengths[i], reverse=True)
        steps.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    rng.shuffle(steps)
    return steps


def token_budget_batches(indices: Sequence[int], lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Cut ``indices`` into micro-batches whose padded size (rows × longest
    row) stays within ``max_tokens``. A row longer than the budget goes alone."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in sorted(indices, key=lambda i: lengths[i], reverse=True):
        if current and (len(current) + 1) * max(longest, lengths[index]) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(index)
        longest = max(longest, lengths[index])
    if current:
        batches.append(current)
    return batches
