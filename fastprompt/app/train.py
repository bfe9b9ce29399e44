"""The training loop: AdamW on the soft prompt only, and nothing lost on a crash.

A step is ``batch_size`` examples (the tutorial's effective batch of 8) of
similar length, run as micro-batches under a token budget (``data.py``). Every
micro-batch's loss is its label-token sum divided by the label count of the
whole step (``num_items_in_batch``, as the HF Trainer does), so the step's
gradient is the same however it is cut up: into micro-batches, or over ranks.

A checkpoint is a directory ``checkpoint-<step>`` in the output: the adapter in
PEFT format plus ``training_state.pt`` (optimizer, RNG, step, and what the run
was planned on). It is written to a temporary directory and renamed into
place, so a crash leaves either the old checkpoint or the new one, never half
of one. The batch plan of an epoch is a function of (seed, epoch) and the
learning rate a function of the step, so step + optimizer + RNG is all a resume
needs to continue bit for bit where the run stopped.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapter_files import record_training
from ..loss import IGNORE_INDEX
from .data import PadCollator, TokenizedData, length_grouped_steps, token_budget_batches
from .distributed import Ranks
from .reporting import open_reporter
from .train_config import TrainConfig

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "training_state.pt"
LOG_FILE = "train_log.jsonl"


@dataclass
class TrainResult:
    steps: int
    history: list[dict] = field(default_factory=list)


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM: a checkpoint was written and the run can resume."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(
            f"interrupted by {signal.Signals(signum).name} after step {step}; "
            f"checkpoint written to {checkpoint}; continue with --resume"
        )


class TrainingDiverged(RuntimeError):
    """The loss or gradient stopped being finite; the prompt was not updated."""


def lr_at(step: int, total: int, warmup: int, peak: float, schedule: str = "linear") -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warmup,
    then transformers' ``linear`` (to 0), ``cosine`` (half a cosine to 0) or
    ``constant_with_warmup``, as ``transformers.get_scheduler`` computes them."""
    if step < warmup:
        return peak * (step / warmup)
    if schedule == "linear":
        return peak * max(0.0, (total - step) / max(1, total - warmup))
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return peak * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if schedule == "constant":
        return peak
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


def warmup_steps(config: TrainConfig, total: int) -> int:
    """``warmup_steps``, or ``warmup_ratio`` of the run rounded up (as ``TrainingArguments``)."""
    return config.warmup_steps or math.ceil(config.warmup_ratio * total)


# ------------------------------------------------------------ checkpoints
def list_checkpoints(output: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint, oldest first."""
    found = []
    for path in Path(output).glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = path.name[len(CHECKPOINT_PREFIX) :]
        if suffix.isdigit() and (path / STATE_FILE).is_file():
            found.append((int(suffix), path))
    return sorted(found)


def _fsync_tree(directory: Path) -> None:
    """Data on disk before the rename that publishes it (survives power loss)."""
    for path in [*directory.iterdir(), directory]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _publish(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``, replacing an older ``target`` (a resume
    from an earlier checkpoint re-reaches its step)."""
    if target.exists():
        stale = target.with_name(f".stale-{target.name}-{os.getpid()}")
        os.rename(target, stale)
        os.rename(staging, target)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.rename(staging, target)


def write_checkpoint(output: Path, step: int, model, optimizer, plan: dict, keep: int) -> Path:
    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_PREFIX}{step}-", dir=output))
    try:
        model.save_pretrained(staging)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"step": step, "plan": plan, "optimizer": optimizer.state_dict(), "rng": rng}, staging / STATE_FILE)
        _fsync_tree(staging)
        target = output / f"{CHECKPOINT_PREFIX}{step}"
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for _, old in list_checkpoints(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def resolve_checkpoint(resume: str, output: Path) -> Path:
    if resume == "latest":
        found = list_checkpoints(output)
        if not found:
            raise ValueError(f"--resume: no checkpoint in {str(output)!r} to resume from")
        return found[-1][1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"--resume: {str(path)!r} is not a checkpoint directory (no {STATE_FILE})")
    return path


def load_checkpoint(path: Path, model, optimizer, plan: dict) -> int:
    """Restore prompt, optimizer and RNG from ``path``; returns its step."""
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    differences = [
        f"{key} {state['plan'].get(key)!r} there, {value!r} now"
        for key, value in plan.items()
        if state["plan"].get(key) != value
    ]
    if differences:
        raise ValueError(f"checkpoint {str(path)!r} belongs to a different run: " + "; ".join(differences))
    from peft.utils import load_peft_weights

    prompt = load_peft_weights(str(path), device="cpu")["prompt_embeddings"]
    target = model.soft_prompt()
    if prompt.shape != target.shape:
        raise ValueError(
            f"checkpoint {str(path)!r} holds a prompt of shape {tuple(prompt.shape)}, "
            f"the model's is {tuple(target.shape)}"
        )
    with torch.no_grad():
        target.copy_(prompt)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]


def training_facts(result: TrainResult, config: TrainConfig, examples: int) -> dict[str, object]:
    """What the model card says of a finished run."""
    facts: dict[str, object] = {
        "optimizer steps": result.steps,
        "training examples": examples,
        "examples per step": config.batch_size,
        "peak learning rate": config.lr,
        "seed": config.seed,
    }
    losses = [entry for entry in result.history if "loss" in entry]
    if losses:
        last = losses[-1]
        facts["final training loss"] = f"{last['loss']:.4f} (mean of the steps logged up to step {last['step']})"
    evals = [entry for entry in result.history if "eval_loss" in entry]
    if evals:
        facts["final eval loss"] = f"{evals[-1]['eval_loss']:.4f} (step {evals[-1]['step']})"
    return facts


def save_final_adapter(model, output: Path, facts: dict[str, object] | None = None) -> None:
    """The adapter files into ``output`` itself (so ``PeftModel.from_pretrained
    (base, output)`` works), each replaced atomically; ``facts`` of the run
    go into its model card."""
    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".adapter-", dir=output))
    try:
        model.save_pretrained(staging)
        if facts:
            record_training(staging, facts)
        _fsync_tree(staging)
        for path in staging.iterdir():
            os.replace(path, output / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------- signals
class _StopRequest:
    """Ctrl-C and SIGTERM ask the loop to stop at the end of the current step
    and write a checkpoint; a second signal acts as usual (kills)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        # Handlers can only be installed from the main thread (not, e.g., in a
        # notebook worker); elsewhere signals keep their usual effect.
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.signum = signum
        self._restore()

    def _restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *_exc):
        self._restore()


# -------------------------------------------------------------------- loop
def _truncate_log(log_file: Path, after_step: int) -> None:
    """Drop log entries past the step a run (re)starts from: a fresh run
    starts an empty log, a resumed one forgets the steps it will redo."""
    if not log_file.exists():
        return
    lines = log_file.read_text(encoding="utf-8").splitlines(keepends=True)
    log_file.write_text("".join(line for line in lines if json.loads(line)["step"] <= after_step), encoding="utf-8")


def _to_device(batch: dict, device) -> dict:
    return {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}


def fingerprint(data: TokenizedData) -> str:
    digest = hashlib.sha256()
    for example in data.examples:
        digest.update(json.dumps([example["input_ids"], example["labels"]]).encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def evaluate(
    model, data: TokenizedData, pad_token_id: int, max_tokens: int = 4096, ranks: Ranks = Ranks(), bf16: bool = False
) -> float:
    """Mean loss per label token over ``data`` (sharded over ranks)."""
    was_training = model.training
    model.eval()
    collate = PadCollator(pad_token_id)
    totals = torch.zeros(2, dtype=torch.float64, device=model.device)
    mine = list(range(ranks.rank, len(data), ranks.world_size))
    for micro in token_budget_batches(mine, data.lengths, max_tokens):
        batch = _to_device(collate([data[i] for i in micro]), model.device)
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
            # num_items_in_batch=1 turns the mean into the sum we accumulate.
            totals[0] += model(**batch, num_items_in_batch=1).loss.double()
        totals[1] += (batch["labels"] != IGNORE_INDEX).sum()
    model.train(was_training)
    ranks.sum_(totals)
    return float(totals[0] / totals[1])


def _accumulate_gradients(
    model, data: TokenizedData, indices: list[int], step_items: int, config: TrainConfig, collate: PadCollator
) -> tuple[torch.Tensor, int]:
    """Forward and backward this rank's share of a step, in micro-batches under
    the token budget; gradients add up in ``.grad``. Returns the summed loss
    and the number of real tokens."""
    device = model.soft_prompt().device
    loss_sum = torch.zeros((), device=device)
    tokens = 0
    for micro in token_budget_batches(indices, data.lengths, config.max_tokens):
        batch = _to_device(collate([data[i] for i in micro]), device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            loss = model(**batch, num_items_in_batch=step_items).loss
        loss.backward()
        loss_sum += loss.detach().float()
        tokens += int(batch["attention_mask"].sum())
    return loss_sum, tokens


def _sum_over_ranks(
    prompt, loss_sum: torch.Tensor, tokens: int, signum: int | None, ranks: Ranks
) -> tuple[float, float, bool]:
    """One all-reduce for the gradient and the step's numbers, so that every
    rank sees the same loss and the same stop request. Returns (step loss,
    step tokens, stop requested)."""
    grad = prompt.grad if prompt.grad is not None else torch.zeros_like(prompt)  # a rank may get no example
    numbers = torch.stack([loss_sum, loss_sum.new_tensor(float(tokens)), loss_sum.new_tensor(float(signum or 0))])
    shared = ranks.sum_(torch.cat([grad.flatten(), numbers]))
    prompt.grad = shared[: prompt.numel()].view_as(prompt)
    step_loss, step_tokens, stop = (float(x) for x in shared[prompt.numel() :])
    return step_loss, step_tokens, stop > 0


def train(
    model,
    data: TokenizedData,
    config: TrainConfig,
    *,
    pad_token_id: int,
    eval_data: TokenizedData | None = None,
    ranks: Ranks = Ranks(),
) -> TrainResult:
    """Train the active adapter's prompt on ``data``; the final adapter lands in
    ``config.output``. Raises TrainingInterrupted (checkpoint written) on
    Ctrl-C/SIGTERM and TrainingDiverged on a non-finite loss."""
    prompt = model.soft_prompt()
    if not prompt.requires_grad:
        raise ValueError("the prompt is frozen (loaded with is_trainable=False?); nothing to train")
    output = config.output
    lengths = data.lengths
    items = [sum(label != IGNORE_INDEX for label in example["labels"]) for example in data.examples]
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    total = config.max_steps or config.epochs * steps_per_epoch
    warmup = warmup_steps(config, total)
    plan = {
        "seed": config.seed,
        "batch_size": config.batch_size,
        "total_steps": total,
        "examples": len(data),
        "data": fingerprint(data),
    }
    optimizer = torch.optim.AdamW([prompt], lr=config.lr, weight_decay=config.weight_decay)
    if config.resume:
        start = load_checkpoint(resolve_checkpoint(config.resume, output), model, optimizer, plan)
    else:
        existing = list_checkpoints(output)
        if existing:
            raise ValueError(
                f"{str(output)!r} already holds checkpoints of a run (up to step {existing[-1][0]}); "
                "pass --resume to continue it, or choose another --output"
            )
        start = 0

    collate = PadCollator(pad_token_id)
    log_file = output / LOG_FILE
    if ranks.is_main:
        output.mkdir(parents=True, exist_ok=True)
        _truncate_log(log_file, after_step=start)
    result = TrainResult(steps=start)

    @functools.lru_cache(maxsize=1)
    def epoch_plan(epoch: int) -> list[list[int]]:
        return length_grouped_steps(lengths, config.batch_size, seed=config.seed * 100_003 + epoch)

    settings = dict(asdict(config), output=str(output), warmup_steps=warmup, total_steps=total, examples=len(data))
    reporter = open_reporter(config.report_to if ranks.is_main else "none", output, start, settings)
    last_saved = None
    window_loss, window_grad_norm, window_steps, window_tokens = 0.0, 0.0, 0, 0.0
    window_start = time.perf_counter()

    def record(entry: dict) -> None:
        result.history.append(entry)
        if ranks.is_main:
            with open(log_file, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")
            reporter.log(entry)
            bar.write("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items()))
            sys.stdout.flush()  # a pipe is block-buffered: a watcher would see nothing until exit

    model.train()
    with (
        contextlib.closing(reporter),
        _StopRequest() as stop,
        tqdm(
            total=total,
            initial=start,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not (config.progress and ranks.is_main),
        ) as bar,
    ):
        for step in range(start, total):
            epoch, offset = divmod(step, steps_per_epoch)
            indices = epoch_plan(epoch)[offset]
            loss_sum, tokens = _accumulate_gradients(
                model, data, indices[ranks.rank :: ranks.world_size], sum(items[i] for i in indices), config, collate
            )
            step_loss, step_tokens, stop_requested = _sum_over_ranks(prompt, loss_sum, tokens, stop.signum, ranks)

            # The norm before clipping (clip_grad_norm_ returns it), as Trainer logs it.
            grad_norm = float(
                torch.nn.utils.clip_grad_norm_([prompt], config.max_grad_norm)
                if config.max_grad_norm
                else prompt.grad.norm()
            )
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                checkpoint = list_checkpoints(output)
                kept = (
                    f"the last good checkpoint is {checkpoint[-1][1]}"
                    if checkpoint
                    else "no checkpoint was written yet"
                )
                raise TrainingDiverged(
                    f"loss {step_loss} / grad norm {grad_norm} at step {step + 1}: training diverged and "
                    f"stopped before updating the prompt; {kept} (try a lower --lr)"
                )
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup, config.lr, config.lr_scheduler)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = result.steps = step + 1

            window_loss += step_loss
            window_grad_norm += grad_norm
            window_steps += 1
            window_tokens += step_tokens
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", grad_norm=f"{grad_norm:.3g}", refresh=False)
            if done % config.log_every == 0 or done == total:
                elapsed = time.perf_counter() - window_start
                record(
                    {
                        "step": done,
                        "epoch": round(done / steps_per_epoch, 3),
                        "loss": window_loss / window_steps,
                        "lr": optimizer.param_groups[0]["lr"],
                        "grad_norm": window_grad_norm / window_steps,
                        "tokens_per_s": round(window_tokens / elapsed, 1),
                    }
                )
                bar.set_postfix(
                    loss=f"{window_loss / window_steps:.4f}",
                    grad_norm=f"{window_grad_norm / window_steps:.3g}",
                    tok_s=f"{window_tokens / elapsed:.0f}",
                )
                window_loss, window_grad_norm, window_steps, window_tokens = 0.0, 0.0, 0, 0.0
                window_start = time.perf_counter()
            if eval_data is not None and ((config.eval_every and done % config.eval_every == 0) or done == total):
                loss = evaluate(model, eval_data, pad_token_id, config.max_tokens, ranks, config.bf16)
                record({"step": done, "eval_loss": loss})
            if config.save_every and done % config.save_every == 0:
                if ranks.is_main:
                    write_checkpoint(output, done, model, optimizer, plan, config.keep_checkpoints)
                last_saved = done
                ranks.barrier()
            if stop_requested and done < total:
                if ranks.is_main and last_saved != done:
                    write_checkpoint(output, done, model, optimizer, plan, config.keep_checkpoints)
                ranks.barrier()
                raise TrainingInterrupted(
                    int(stop.signum or signal.SIGTERM), done, output / f"{CHECKPOINT_PREFIX}{done}"
                )

    if ranks.is_main:
        save_final_adapter(model, output, training_facts(result, config, len(data)))
    ranks.barrier()
    return result
