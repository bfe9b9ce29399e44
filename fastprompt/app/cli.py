"""Command line: ``fastprompt train | generate | bench | demo``.

Defaults reproduce the tutorial (Chinese Alpaca chatbot on BLOOM): its init
text, MAX_LENGTH 256, an effective batch of 8, lr 5e-5; the model defaults to
the built-in ``tiny-bloom`` and the data to the bundled demo set, so every
command runs offline as typed.

A user error (missing file, bad value, unknown model, adapter that does not fit
the model) is one line on stderr and a non-zero exit; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

TUTORIAL_INIT_TEXT = "下面是一段人与机器人的对话。"
TINY_BLOOM = "tiny-bloom"  # fastprompt.loading's built-in name, without importing torch
EXIT_ERROR = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line instead of argparse's usage block + message.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _number(kind, minimum, inclusive=True):
    """argparse type: a ``kind`` number >= (or >) ``minimum``."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {minimum}, got {text}")
        return value

    return parse


def _fraction(text):
    value = _number(float, 0.0)(text)
    if value >= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _top_p(text):
    value = _number(float, 0.0, inclusive=False)(text)
    if value > 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _unescape(text: str) -> str:
    r"""Templates are typed in a shell, where a newline is easiest written ``\n``."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    # Torch-free modules only: --help must answer in well under a second.
    from .template import MAX_LENGTH, TUTORIAL_TEMPLATE
    from .train_config import LR_SCHEDULERS, REPORT_TO, TrainConfig

    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")

    model = _Parser(add_help=False)
    model.add_argument(
        "--model",
        default="tiny-bloom",
        help="built-in 'tiny-bloom', a local model directory, or a hub id (default: %(default)s)",
    )
    quantise = model.add_mutually_exclusive_group()
    quantise.add_argument("--load-in-8bit", action="store_true", help="quantise the base model's linear layers to int8")
    quantise.add_argument("--load-in-4bit", action="store_true", help="quantise the base model's linear layers to nf4")
    model.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="auto: cuda when available (default: %(default)s)",
    )

    template = _Parser(add_help=False)
    template.add_argument(
        "--template",
        default=TUTORIAL_TEMPLATE.prompt,
        help=r"prompt format over record fields; \n is a newline (default: the tutorial's %(default)r)",
    )
    template.add_argument(
        "--response-prefix",
        default=TUTORIAL_TEMPLATE.response_prefix,
        help="text between the prompt and the response (default: %(default)r)",
    )

    chat = _Parser(add_help=False)
    chat.add_argument(
        "--chat-template",
        metavar="FILE",
        help="Jinja chat template replacing the tokenizer's, for 'messages' records and --chat (needed where it "
        "has none, as tiny-bloom's: examples/tutorial_chat_template.jinja is the tutorial's format)",
    )

    parser = _Parser(prog="fastprompt", description="Fast, PEFT-compatible soft-prompt tuning of frozen causal LMs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    defaults = TrainConfig(output=".")

    train = commands.add_parser(
        "train",
        parents=[common, model, template, chat],
        help="train a soft prompt (the tutorial's recipe)",
        description="Train a soft prompt on Alpaca-style data, or chat data ('messages' records, the loss on the "
        "assistant turns); the adapter (PEFT format) lands in --output. "
        "Under torchrun the data is split over the processes.",
    )
    train.add_argument(
        "--data",
        default=None,
        help="JSON list, JSONL, or a datasets save_to_disk directory (default: the bundled demo data)",
    )
    train.add_argument(
        "--response-field",
        default=TUTORIAL_TEMPLATE.response_field,
        help="record field the model learns to produce (default: %(default)s)",
    )
    train.add_argument("--eval-data", help="held-out data for eval loss (same formats as --data)")
    train.add_argument(
        "--eval-fraction",
        type=_fraction,
        default=0.0,
        help="hold out this fraction of --data for eval loss when --eval-data is not given",
    )
    train.add_argument(
        "--max-length",
        type=_number(int, 2),
        default=MAX_LENGTH,
        help="tokens per example after truncation (default: %(default)s)",
    )
    train.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    train.add_argument(
        "--init",
        choices=["text", "random", "sample-vocab"],
        default="text",
        help="prompt initialisation (PEFT's PromptTuningInit; default: %(default)s)",
    )
    train.add_argument("--init-text", default=TUTORIAL_INIT_TEXT, help="text for --init text (default: %(default)s)")
    train.add_argument(
        "--num-virtual-tokens",
        type=_number(int, 1),
        help="prompt length (default: the token count of --init-text, as the tutorial)",
    )
    train.add_argument("--output", required=True, help="directory for the adapter, checkpoints and train_log.jsonl")
    train.add_argument("--epochs", type=_number(int, 1), default=defaults.epochs, help="(default: %(default)s)")
    train.add_argument(
        "--max-steps", type=_number(int, 1), help="stop after this many optimizer steps (overrides --epochs)"
    )
    train.add_argument(
        "--batch-size",
        type=_number(int, 1),
        default=defaults.batch_size,
        help="examples per optimizer step over all processes (default: %(default)s)",
    )
    train.add_argument(
        "--max-tokens",
        type=_number(int, 1),
        default=defaults.max_tokens,
        help="padded tokens per forward pass; a step that does not fit is accumulated (default: %(default)s)",
    )
    train.add_argument(
        "--lr",
        type=_number(float, 0.0, inclusive=False),
        default=defaults.lr,
        help="peak learning rate (default: %(default)s)",
    )
    train.add_argument(
        "--lr-scheduler",
        choices=LR_SCHEDULERS,
        default=defaults.lr_scheduler,
        help="decay after the warmup, as transformers' schedules: linear or cosine to 0, or constant "
        "(default: %(default)s)",
    )
    warmup = train.add_mutually_exclusive_group()
    warmup.add_argument(
        "--warmup-steps",
        type=_number(int, 0),
        default=defaults.warmup_steps,
        help="linear warmup (default: %(default)s)",
    )
    warmup.add_argument(
        "--warmup-ratio",
        type=_fraction,
        default=defaults.warmup_ratio,
        help="linear warmup over this fraction of the steps, rounded up",
    )
    train.add_argument(
        "--weight-decay",
        type=_number(float, 0.0),
        default=defaults.weight_decay,
        help="AdamW weight decay (default: %(default)s)",
    )
    train.add_argument(
        "--max-grad-norm",
        type=_number(float, 0.0),
        default=defaults.max_grad_norm,
        help="gradient clipping, 0 to disable (default: %(default)s)",
    )
    train.add_argument(
        "--log-every",
        type=_number(int, 1),
        default=defaults.log_every,
        metavar="STEPS",
        help="mean loss and gradient norm (before clipping), lr and tokens/s every STEPS (default: %(default)s)",
    )
    train.add_argument(
        "--eval-every",
        type=_number(int, 0),
        default=defaults.eval_every,
        metavar="STEPS",
        help="0: only at the end (default: %(default)s)",
    )
    train.add_argument(
        "--save-every",
        type=_number(int, 0),
        default=defaults.save_every,
        metavar="STEPS",
        help="checkpoint interval, 0: only when interrupted (default: %(default)s)",
    )
    train.add_argument(
        "--keep-checkpoints",
        type=_number(int, 1),
        default=defaults.keep_checkpoints,
        metavar="N",
        help="keep the newest N checkpoints (default: %(default)s)",
    )
    train.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="prompt init, data order and held-out split (default: %(default)s)",
    )
    train.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto: bf16 autocast on a GPU, fp32 on CPU (default: %(default)s)",
    )
    train.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="CHECKPOINT",
        help="continue from the latest checkpoint in --output, or from CHECKPOINT",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    train.add_argument(
        "--report-to",
        choices=REPORT_TO,
        default=defaults.report_to,
        help="also log to TensorBoard (--output/runs) or Weights & Biases (WANDB_MODE=offline works without an "
        "account); needs pip install 'fastprompt[tensorboard]' or '[wandb]' (default: %(default)s)",
    )
    train.set_defaults(run=run_train)

    generate = commands.add_parser(
        "generate",
        parents=[common, model, template, chat],
        help="answer a prompt with a trained adapter",
        description="Apply the template to PROMPT and generate with the base model + adapter.",
    )
    generate.add_argument("prompt", help="the instruction (the template's {instruction})")
    generate.add_argument("--adapter", required=True, help="adapter directory (ours or PEFT's)")
    generate.add_argument("--input", default="", help="the template's {input} (default: empty)")
    generate.add_argument("--max-new-tokens", type=_number(int, 1), default=128, help="(default: %(default)s)")
    generate.add_argument(
        "--chat",
        action="store_true",
        help="PROMPT as a user message through the chat template (implied by --chat-template) instead of --template",
    )
    generate.add_argument("--stream", action="store_true", help="print the answer token by token as it is generated")
    generate.add_argument(
        "--do-sample", "--sample", action="store_true", help="sample instead of greedy (or beam) decoding"
    )
    generate.add_argument(
        "--temperature", type=_number(float, 0.0, inclusive=False), help="with --do-sample (transformers' default: 1)"
    )
    generate.add_argument("--top-p", type=_top_p, help="with --do-sample: nucleus sampling, in (0, 1]")
    generate.add_argument(
        "--top-k", type=_number(int, 0), help="with --do-sample; 0 disables (transformers' default: 50)"
    )
    generate.add_argument("--num-beams", type=_number(int, 1), default=1, help="beam search (default: %(default)s)")
    generate.add_argument(
        "--repetition-penalty", type=_number(float, 0.0, inclusive=False), help="> 1 discourages repeats (CTRL's)"
    )
    generate.add_argument("--seed", type=int, help="random seed for --do-sample")
    generate.set_defaults(run=run_generate)

    bench = commands.add_parser(
        "bench",
        parents=[common],
        help="benchmark fastprompt against PEFT",
        description="Run the benchmark suites (bench/bench_*.py) with pytest-benchmark and print the "
        "fastprompt-vs-PEFT tables of bench/report.py. Arguments after -- go to pytest.",
    )
    bench.add_argument("--bench-dir", default=None, help="benchmark directory (default: bench/ next to the package)")
    bench.add_argument("--json", help="also keep the pytest-benchmark results in this file")
    bench.add_argument("pytest_args", nargs=argparse.REMAINDER, help="extra pytest arguments, after --")
    bench.set_defaults(run=run_bench)

    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="teach tiny-bloom a task with a soft prompt, reload it with PEFT (~20 s)",
        description="On the built-in tiny-bloom (a chatbot pre-trained on the bundled records): train a soft prompt "
        "to answer with the language of a message, print the held-out loss and accuracy before and "
        "after and two answers, save the adapter, load it with peft.PeftModel.from_pretrained and "
        "compare the logits.",
    )
    demo.add_argument("--output", help="adapter directory (default: a new temporary directory)")
    demo.add_argument("--epochs", type=_number(int, 1), default=40, help="(default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    demo.set_defaults(run=run_demo)
    return parser


# ------------------------------------------------------------------ helpers
def _device(choice: str):
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def _model_location(name: str) -> tuple[str, dict]:
    """The path or hub id behind ``--model`` and the keywords that load it,
    checked before any heavy import: a missing local directory, or a hub id that
    cannot be had offline, fails in a second instead of after loading torch and
    a minute of hub retries (``{"local_files_only": True}`` when only the local
    cache can serve it)."""
    from ..loading import names_a_directory
    from . import hub

    if name == TINY_BLOOM:
        return name, {}
    looks_local = names_a_directory(name)
    path = str(Path(name).expanduser()) if looks_local else name
    if looks_local and not Path(path).is_dir():
        raise ValueError(f"model directory {name!r} does not exist")
    return path, hub.from_pretrained_kwargs(path, "config.json", "model")


def _load_base(args, device):
    """The frozen base model on ``device`` (``args.model`` and ``args.model_kwargs`` from ``_model_location``)."""
    import fastprompt

    path, quantized = args.model, args.load_in_8bit or args.load_in_4bit
    device_map = {"": device} if quantized else None
    base = fastprompt.load_model(
        path, load_in_8bit=args.load_in_8bit, load_in_4bit=args.load_in_4bit, device_map=device_map, **args.model_kwargs
    )
    if not quantized:
        base.to(device)
    if base.tokenizer is None:
        raise ValueError(f"model {path!r} has no tokenizer next to its weights")
    return base


def _read_chat_template(args) -> str | None:
    """The text of ``--chat-template``, read before the model loads (a bad path fails at once)."""
    if not args.chat_template:
        return None
    path = Path(args.chat_template).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"chat template {args.chat_template!r} does not exist")
    return path.read_text(encoding="utf-8")


def _template(args):
    from .template import Template

    return Template(
        _unescape(args.template), _unescape(args.response_prefix), getattr(args, "response_field", "output")
    )


# ----------------------------------------------------------------- commands
def run_train(args) -> int:
    import torch
    from peft import PromptTuningConfig, PromptTuningInit, TaskType

    import fastprompt

    from ..loading import demo_data_path
    from . import distributed
    from .data import load_alpaca, split_holdout
    from .reporting import check_installed
    from .train import TrainConfig, train

    device = _device(args.device)
    ranks = distributed.init_from_env(use_cuda=device.type == "cuda")
    try:
        if device.type == "cuda":
            device = torch.device("cuda", ranks.local_rank)
            torch.cuda.set_device(device)
        # Read the data before loading a large model: a bad path fails in seconds.
        template = _template(args)
        data_path = args.data or demo_data_path()
        if not Path(data_path).exists():
            raise FileNotFoundError(f"data {str(data_path)!r} does not exist")
        chat_template = _read_chat_template(args)
        check_installed(args.report_to)
        base = _load_base(args, device)
        tokenizer = base.tokenizer
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        data = load_alpaca(data_path, tokenizer, template, args.max_length, args.strict)
        if args.eval_data:
            eval_data = load_alpaca(args.eval_data, tokenizer, template, args.max_length, args.strict)
        else:
            data, eval_data = split_holdout(data, args.eval_fraction, args.seed)

        init = {
            "text": PromptTuningInit.TEXT,
            "random": PromptTuningInit.RANDOM,
            "sample-vocab": PromptTuningInit.SAMPLE_VOCAB,
        }[args.init]
        num_virtual_tokens = args.num_virtual_tokens or len(tokenizer(args.init_text)["input_ids"])
        config = PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            prompt_tuning_init=init,
            num_virtual_tokens=num_virtual_tokens,
            prompt_tuning_init_text=args.init_text if init == PromptTuningInit.TEXT else None,
            tokenizer_name_or_path=os.path.expanduser(args.model) if init == PromptTuningInit.TEXT else None,
        )
        torch.manual_seed(args.seed)
        model = fastprompt.get_peft_model(base, config)
        bf16 = args.precision == "bf16" or (
            # 8-bit layers already compute in fp16; autocasting them to bf16 would only add casts.
            args.precision == "auto"
            and device.type == "cuda"
            and torch.cuda.is_bf16_supported()
            and not args.load_in_8bit
        )
        train_config = TrainConfig(
            output=Path(args.output),
            epochs=args.epochs,
            max_steps=args.max_steps,
            batch_size=args.batch_size,
            max_tokens=args.max_tokens,
            lr=args.lr,
            lr_scheduler=args.lr_scheduler,
            warmup_steps=args.warmup_steps,
            warmup_ratio=args.warmup_ratio,
            weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm,
            log_every=args.log_every,
            eval_every=args.eval_every,
            save_every=args.save_every,
            keep_checkpoints=args.keep_checkpoints,
            seed=args.seed,
            bf16=bf16,
            resume=args.resume,
            progress=not args.no_progress,
            report_to=args.report_to,
        )
        trainable, total = model.get_nb_trainable_parameters()
        if ranks.is_main:
            print(
                f"model {args.model}: {num_virtual_tokens} virtual tokens, trainable {trainable:,d} of {total:,d} "
                f"parameters; {len(data)} training examples"
                + (f", {len(eval_data)} held out" if eval_data is not None else "")
                + (f"; {ranks.world_size} processes" if ranks.world_size > 1 else ""),
                flush=True,
            )
        result = train(model, data, train_config, pad_token_id=_pad_id(tokenizer), eval_data=eval_data, ranks=ranks)
        if ranks.is_main:
            print(f"trained {result.steps} steps; adapter saved to {args.output}")
        return 0
    finally:
        distributed.shutdown()


def _pad_id(tokenizer) -> int:
    # The value never reaches the model (masked), but it must be a valid id.
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _generation_settings(args) -> dict:
    """``generate`` keywords from the flags; flags that would be silently ignored are errors."""
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    given = [f"--{name.replace('_', '-')}" for name, value in sampling.items() if value is not None]
    if given and not args.do_sample:
        raise ValueError(f"{', '.join(given)} only apply with --do-sample")
    if args.stream and args.num_beams > 1:
        raise ValueError("--stream cannot show beam search (--num-beams > 1): the best beam is only known at the end")
    if args.input and (args.chat or args.chat_template):
        raise ValueError("--input fills --template's {input}; with --chat, PROMPT is the whole user message")
    # Only the settings given: one the fast path's decode loop does not serve (beams, a repetition
    # penalty) sends the call to transformers' loop, even at its default value.
    settings = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    settings.update({name: value for name, value in sampling.items() if value is not None})
    if args.num_beams > 1:
        settings["num_beams"] = args.num_beams
    if args.repetition_penalty is not None:
        settings["repetition_penalty"] = args.repetition_penalty
    return settings


def _prompt_ids(args, template, tokenizer) -> dict:
    """PROMPT as input ids: through ``template``, or the chat template when ``template`` is None."""
    if template is None:
        if not tokenizer.chat_template:
            raise ValueError("--chat: the model's tokenizer has no chat template; pass --chat-template FILE")
        message = [{"role": "user", "content": args.prompt}]
        text = tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True)
        # The template writes its own special tokens (training tokenises the same way).
        return tokenizer(text, add_special_tokens=False, return_tensors="pt")
    text = template.render_prompt({"instruction": args.prompt, "input": args.input})
    return tokenizer(text, return_tensors="pt")


def run_generate(args) -> int:
    import torch
    from transformers import TextStreamer

    import fastprompt

    if not Path(args.adapter).is_dir():
        raise FileNotFoundError(f"adapter directory {args.adapter!r} does not exist")
    settings = _generation_settings(args)
    chat_template = _read_chat_template(args)
    template = None if args.chat or chat_template is not None else _template(args)
    base = _load_base(args, _device(args.device))
    tokenizer = base.tokenizer
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    model = fastprompt.FastPromptModel.from_pretrained(base, args.adapter)
    encoded = _prompt_ids(args, template, tokenizer).to(model.device)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    # TextStreamer prints each piece as soon as it decodes to whole characters, and a newline at the end.
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if args.stream else None
    sequences = model.generate(
        input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"], streamer=streamer, **settings
    )
    if streamer is None:
        print(tokenizer.decode(sequences[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True))
    return 0


def run_bench(args) -> int:
    bench_dir = Path(args.bench_dir) if args.bench_dir else Path(__file__).resolve().parents[2] / "bench"
    suites = sorted(bench_dir.glob("bench_*.py"))
    report = bench_dir / "report.py"
    if not suites or not report.is_file():
        raise FileNotFoundError(
            f"no benchmark suites (bench_*.py and report.py) in {str(bench_dir)!r}; "
            "run from a source checkout or pass --bench-dir"
        )
    extra = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    with tempfile.TemporaryDirectory(prefix="fastprompt-bench-") as scratch:
        results = Path(args.json) if args.json else Path(scratch) / "results.json"
        command = [
            sys.executable,
            "-m",
            "pytest",
            *map(str, suites),
            "--benchmark-only",
            "-q",
            f"--benchmark-json={results}",
            *extra,
        ]
        print("running:", " ".join(command), flush=True)
        code = subprocess.call(command, cwd=bench_dir.parent)
        if results.exists():
            code = subprocess.call([sys.executable, str(report), str(results)]) or code
    return code


def run_demo(args) -> int:
    from .demo import run

    return run(Path(args.output) if args.output else None, epochs=args.epochs, seed=args.seed)


# --------------------------------------------------------------------- main
def _quiet_libraries() -> None:
    """Library progress bars and warnings would bury the one line that matters."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "model"):
            args.model, args.model_kwargs = _model_location(args.model)
    except ValueError as err:
        print(f"fastprompt {args.command}: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    handler = logging.StreamHandler(sys.stderr)
    # The library's messages name fastprompt themselves (they reach users without a handler too).
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("fastprompt")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    if not args.debug:
        _quiet_libraries()
    from .train import TrainingDiverged, TrainingInterrupted

    try:
        return args.run(args)
    except TrainingInterrupted as stopped:
        print(f"fastprompt {args.command}: {stopped}", file=sys.stderr)
        return 128 + stopped.signum
    except KeyboardInterrupt:
        print(f"fastprompt {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        if not isinstance(err, (ValueError, OSError, TrainingDiverged)):
            message = f"{type(err).__name__}: {message} (rerun with --debug for the traceback)"
        print(f"fastprompt {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        logger.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
