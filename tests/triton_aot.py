"""Compile the Triton `pack_embed` kernels for CUDA GPUs ahead of time, on a machine without one.

The launches come from the real host code, not from a copy of it: while `pack_embed_forward` and
`pack_embed_backward` run on small CPU tensors, every kernel of the module is swapped for a
recorder. They run once per hidden size asked for and per input the host accepts: table and prompt
dtype, and LayerNorm off / weight only / weight and bias. Each recorded launch is then specialised
the way Triton's launcher specialises it on a GPU of the target capability, and compiled by
`triton.compile` (ptxas ships with Triton).
Launches that specialise identically, such as hidden sizes sharing a BLOCK_H, compile once.

Run it with TRITON_INTERPRET unset; the interpreter replaces `triton.jit` when triton is imported.
It prints one JSON object per compiled kernel:
    python tests/triton_aot.py --capabilities 80 90 --hidden 1024 4096 [--shard 0 --shards 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from fastprompt.ops import pack_embed_triton

LAYER_NORMS = ("none", "weight", "weight+bias")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHORT_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32"}
# Triton specialises integer arguments equal to 1 or divisible by 16 (a launch with such a value
# compiles other code). The integer arguments the launches pass are the prompt row count A*P (and
# hidden plus the table's row stride, both the hidden size); the kept count K and the batch only
# size the grid. Each (A, P, B, T) below puts A*P in one class: the general case (15), equal to 1,
# divisible by 16; the batch rows are 1 and 16 alongside.
ROW_SHAPES = ((3, 5, 2, 7), (1, 1, 1, 1), (1, 16, 16, 16))


def input_dtypes(all_dtypes: bool) -> list[tuple[torch.dtype, torch.dtype, torch.dtype]]:
    """(ids, table, prompt) dtypes. By default the pairs fastprompt produces: its model keeps an
    fp32 prompt in front of a table of any dtype, and the op is also called with both in one
    dtype. `all_dtypes` adds every other prompt dtype and int32 ids, which the host also takes."""
    id_dtypes = (torch.int64, torch.int32) if all_dtypes else (torch.int64,)
    pairs = [
        (table, prompt)
        for table in FLOAT_DTYPES
        for prompt in FLOAT_DTYPES
        if all_dtypes or prompt in (table, torch.float32)
    ]
    return [(ids, table, prompt) for ids in id_dtypes for table, prompt in pairs]


@dataclass(frozen=True)
class Launch:
    kernel: JITFunction
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def recorded_launches():
    """Replace every kernel of the module by a recorder for the duration of the block."""
    launches: list[Launch] = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(Launch(self.kernel, args, kwargs))

    kernels = {name: value for name, value in vars(pack_embed_triton).items() if isinstance(value, JITFunction)}
    if not kernels:
        raise RuntimeError("no compilable kernels: TRITON_INTERPRET must be unset when triton is imported")
    for name, kernel in kernels.items():
        setattr(pack_embed_triton, name, Recorder(kernel))
    try:
        yield launches
    finally:
        for name, kernel in kernels.items():
            setattr(pack_embed_triton, name, kernel)


def host_launches(
    hidden: int, ids_dtype, table_dtype, prompt_dtype, layer_norm: str, shape: tuple[int, ...] = ROW_SHAPES[0]
) -> list[Launch]:
    """Every kernel launch of one forward and one backward (the prompts' gradient) for A prompts
    of P rows in front of a batch of B rows of T tokens, `shape` = (A, P, B, T), every token kept."""
    prompts_count, prompt_rows, batch, tokens = shape
    ids = torch.zeros(batch, tokens, dtype=ids_dtype)
    token_index = torch.arange(batch * tokens)
    weight = torch.zeros(2, hidden, dtype=table_dtype)
    prompts = torch.zeros(prompts_count, prompt_rows, hidden, dtype=prompt_dtype)
    ln_weight = None if layer_norm == "none" else torch.ones(hidden, dtype=table_dtype)
    ln_bias = torch.zeros(hidden, dtype=table_dtype) if layer_norm == "weight+bias" else None
    with recorded_launches() as launches:
        out = pack_embed_triton.pack_embed_forward(ids, token_index, prompts, weight, ln_weight, ln_bias, 1e-5)
        pack_embed_triton.pack_embed_backward(out, prompts, ln_weight, 1e-5)
    return launches


@dataclass
class CompileJob:
    kernel: JITFunction
    capability: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    hidden: set[int] = field(default_factory=set)
    dtypes: set[str] = field(default_factory=set)
    shapes: set[str] = field(default_factory=set)

    def describe(self) -> dict:
        named = {self.kernel.arg_names[path[0]]: value for path, value in self.constexprs.items()}
        return {
            "kernel": self.kernel.__name__,
            "cc": self.capability,
            "dtypes": " ".join(sorted(self.dtypes)),
            "flags": " ".join(name for name, value in named.items() if value is True),
            "hidden": sorted(self.hidden),
            "shapes": sorted(self.shapes),
            "block_h": named["BLOCK_H"],
            "num_warps": self.options["num_warps"],
            # Which fastprompt was compiled: the test checks it is the checkout's.
            "source": pack_embed_triton.__file__,
        }


class Specialiser:
    """What `JITFunction.run` does before it compiles, for a target without a driver: the
    signature, constexprs (None arguments included), divisibility attributes and options that a
    launch on a GPU of that capability would compile with. These are Triton internals; a Triton
    upgrade that changes them fails here loudly rather than compiling something else."""

    def __init__(self, capability: int):
        self.capability = capability
        self.backend = make_backend(GPUTarget("cuda", capability, 32))
        self.binders = {}

    def key(self, launch: Launch):
        kernel = launch.kernel
        if kernel not in self.binders:
            self.binders[kernel] = create_function_from_signature(kernel.signature, kernel.params, self.backend)
        bound, specialization, options = self.binders[kernel](*launch.args, **launch.kwargs)
        return kernel._pack_args(self.backend, launch.kwargs, bound, specialization, options)


def compile_jobs(capabilities, hidden_sizes, all_dtypes: bool) -> list[CompileJob]:
    specialisers = [Specialiser(capability) for capability in capabilities]
    jobs: dict[tuple, CompileJob] = {}
    # The row counts' specialisation classes (equal to 1, divisible by 16) are compiled at the smallest
    # hidden size: they change the integer arguments' specialisation, which is the same at every block
    # width, and compiling each at every size tripled the test's time.
    smallest = min(hidden_sizes)
    cases = [
        (hidden, dtypes, layer_norm, shape)
        for hidden, dtypes, layer_norm in itertools.product(hidden_sizes, input_dtypes(all_dtypes), LAYER_NORMS)
        for shape in (ROW_SHAPES if hidden == smallest else ROW_SHAPES[:1])
    ]
    for hidden, (ids_dtype, table_dtype, prompt_dtype), layer_norm, shape in cases:
        # table/prompt dtypes, plus the ids dtype when it is not the usual int64
        case = "/".join(SHORT_NAMES[dtype] for dtype in (table_dtype, prompt_dtype, ids_dtype) if dtype != torch.int64)
        for launch in host_launches(hidden, ids_dtype, table_dtype, prompt_dtype, layer_norm, shape):
            for specialiser in specialisers:
                options, signature, constexprs, attrs = specialiser.key(launch)
                identity = (
                    launch.kernel.__name__,
                    specialiser.capability,
                    repr(signature),
                    repr(constexprs),
                    repr(attrs),
                    repr(options),
                )
                job = jobs.setdefault(
                    identity,
                    CompileJob(launch.kernel, specialiser.capability, signature, constexprs, attrs, options.__dict__),
                )
                job.hidden.add(hidden)
                job.dtypes.add(case)
                job.shapes.add("x".join(map(str, shape)))
    # Widest blocks first: they take longest, so shards taking every n-th job stay balanced.
    return sorted(jobs.values(), key=lambda job: (-job.describe()["block_h"], repr(job.describe())))


RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)")


def cubin_resources(cubin: bytes) -> dict:
    """Registers and per-thread stack/local bytes of the one kernel in a cubin, read by the
    cuobjdump Triton ships. ptxas puts spills in the stack frame; these kernels have no local
    arrays, so a nonzero stack means spilling."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        dump = subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", file.name],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    ((regs, stack, local),) = RESOURCES.findall(dump)
    return {"regs": int(regs), "stack_bytes": int(stack), "local_bytes": int(local)}


def compile_one(job: CompileJob) -> dict:
    row = job.describe()
    source = ASTSource(job.kernel, job.signature, job.constexprs, job.attrs)
    try:
        # Triton prints the whole PTX to stdout when ptxas fails; the error message suffices.
        with contextlib.redirect_stdout(io.StringIO()):
            compiled = triton.compile(source, target=GPUTarget("cuda", job.capability, 32), options=job.options)
    except Exception as exc:  # any failure to compile is a result to report, not a crash
        return {**row, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    return {**row, **cubin_resources(compiled.asm["cubin"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capabilities", type=int, nargs="+", required=True)
    parser.add_argument("--hidden", type=int, nargs="+", required=True)
    parser.add_argument("--all-dtypes", action="store_true", help="every prompt dtype and int32 ids too")
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1)
    args = parser.parse_args()
    jobs = compile_jobs(args.capabilities, args.hidden, args.all_dtypes)
    for job in jobs[args.shard :: args.shards]:
        print(json.dumps(compile_one(job)), flush=True)


if __name__ == "__main__":
    main()
