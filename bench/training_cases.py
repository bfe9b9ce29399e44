"""The three training shapes of the fastprompt-vs-PEFT benchmark, and one
training step for either contender. Shared by the timing benchmark and the
per-process peak-memory probe so both measure exactly the same work."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PromptTuningConfig, TaskType

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_zh_demo.json"

# batch, virtual tokens, real tokens (None: real samples), which labels are kept
SHAPES = {
    "tutorial": dict(batch=1, virtual=8, length=None, labels="response"),
    "chat-batch": dict(batch=8, virtual=20, length=128, labels="second_half"),
    "classify": dict(batch=16, virtual=100, length=32, labels="last"),
}
CONTENDERS = ("fastprompt", "peft")


def tutorial_data_path() -> Path:
    """The 1000 real records when ../shared is present, else the bundled demo."""
    from fastprompt.loading import demo_data_path

    return SHARED_DATA if SHARED_DATA.is_file() else demo_data_path()


def make_batches(shape_name: str, count: int, vocab_size: int, device="cpu") -> list[dict]:
    shape = SHAPES[shape_name]
    if shape["length"] is None:
        import fastprompt
        from fastprompt.data import load_alpaca

        # The tutorial's preprocessing (template, -100 on the instruction, eos,
        # MAX_LENGTH) through tiny-bloom's tokenizer; ids fit bloom-mini's vocab.
        data = load_alpaca(tutorial_data_path(), fastprompt.load_model("tiny-bloom").tokenizer)
        batches = [
            {key: torch.tensor([values]) for key, values in data[index].items()} for index in range(count)
        ]
    else:
        gen = torch.Generator().manual_seed(0)
        batches = []
        for _ in range(count):
            ids = torch.randint(4, vocab_size, (shape["batch"], shape["length"]), generator=gen)
            labels = torch.full_like(ids, -100)
            if shape["labels"] == "second_half":
                labels[:, shape["length"] // 2 :] = ids[:, shape["length"] // 2 :]
            else:
                labels[:, -1] = ids[:, -1]
            batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def trained_tokens(batch: dict) -> int:
    """Real (non-padding) tokens that went through the step."""
    return int(batch["attention_mask"].sum())


def make_contender(name: str, base, virtual: int):
    """(model, optimizer) for 'fastprompt' or 'peft', same seed, same init."""
    import peft

    import fastprompt

    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=virtual)
    factory = {"fastprompt": fastprompt.get_peft_model, "peft": peft.get_peft_model}[name]
    torch.manual_seed(0)
    model = factory(base, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(trainable, lr=1e-3)


def train_step(model, optimizer, batch: dict) -> float:
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()
