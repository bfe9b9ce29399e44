"""Draw the scaling sweep (``bench_scaling.py``) as one PNG: step times of both
contenders (top) and the measured speedup beside the FLOP bound (bottom), as
the prompt grows (left) and as the batch grows (right).

    python bench/plot_scaling.py bench/results/scaling.json bench/results/scaling.png [more.png ...]
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on benchmark machines
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

SWEEPS = {"prompt": ("prompt length P (virtual tokens)", "batch"), "batch": ("batch size B", "prompt")}
COLOURS = {"fastprompt": "tab:blue", "peft": "tab:orange", "bound": "tab:gray"}


def points(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    rows = [b["extra_info"] for b in data["benchmarks"] if b.get("extra_info", {}).get("sweep")]
    if not rows:
        raise SystemExit(f"{path}: no scaling points (run bench/bench_scaling.py with --benchmark-json)")
    return rows


def draw(rows: list[dict]):
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex="col", constrained_layout=True)
    for column, (sweep, (xlabel, fixed)) in enumerate(SWEEPS.items()):
        series = sorted((r for r in rows if r["sweep"] == sweep), key=lambda r: r[sweep])
        if not series:
            continue
        x = [r[sweep] for r in series]
        top, bottom = axes[0][column], axes[1][column]
        for name in ("fastprompt", "peft"):
            top.plot(x, [r[f"{name}_step_s"] for r in series], "o-", color=COLOURS[name], label=name)
        top.set_yscale("log")
        # Ticks at 1, 2, 5 x 10^k written plainly (20, not 2×10¹).
        top.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        top.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        top.yaxis.set_minor_formatter(NullFormatter())
        top.set_ylabel("median step time (s)")
        top.set_title(f"as {sweep} grows ({fixed} {series[0][fixed]}, T {series[0]['tokens']})")
        bottom.plot(x, [r["speedup"] for r in series], "o-", color=COLOURS["fastprompt"], label="measured speedup")
        bottom.plot(x, [r["flop_bound"] for r in series], "s--", color=COLOURS["bound"], label="FLOP-count bound")
        bottom.axhline(1.0, color="black", linewidth=0.6)
        bottom.set_ylabel("PEFT time / fastprompt time")
        bottom.set_ylim(bottom=0)
        bottom.set_xlabel(xlabel)
        for axis in (top, bottom):
            axis.set_xscale("log", base=2)
            axis.set_xticks(x, [str(v) for v in x])
            axis.grid(True, which="major", alpha=0.3)
            axis.legend(loc="upper left")
    heading = (
        f"Prompt-tuning training step, fastprompt vs PEFT, on {rows[0]['model']}; "
        f"{rows[0]['rounds']} alternated round(s) per point, labels on the second half of T"
    )
    fig.suptitle("\n".join(textwrap.wrap(heading, 120)), fontsize=10)
    return fig


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file", type=Path)
    parser.add_argument("png_files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    fig = draw(points(args.json_file))
    for png in args.png_files:
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png, dpi=110)
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
