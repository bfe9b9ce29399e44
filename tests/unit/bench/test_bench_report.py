"""bench/report.py: provenance first, run-wide keys above their table, wide
tables transposed."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))

import report  # noqa: E402

MACHINE = {
    "fastprompt_bench": {
        "cpu_model": "Some CPU",
        "logical_cpus": 2,
        "usable_cpus": 2,
        "torch_threads": 2,
        "load_average_1min_start_end": [0.5, 1.5],
        "gpu": None,
        "versions": {"torch": "2.13.0", "peft": "0.21.2"},
        "pack_embed_backend": {"cpu": "native"},
    }
}


def bench(case, **extra):
    return {"name": f"test_step[{case}]", "fullname": f"bench/bench_x.py::test_step[{case}]", "extra_info": extra}


def test_report_names_provenance_model_and_data_and_transposes_wide_tables(tmp_path):
    keys = {f"metric_{i}": float(i) for i in range(12)}
    data = {
        "machine_info": MACHINE,
        "commit_info": {"id": "0123456789abcdef", "dirty": True},
        "benchmarks": [
            bench("a", model="mini (quick run)", data="real samples", speedup=1.5, flop_bound=1.25, **keys),
            bench("b", model="mini (quick run)", data="random ids", speedup=2.0, flop_bound=2.5, **keys),
        ],
    }
    path = tmp_path / "x.json"
    path.write_text(json.dumps(data))
    lines = report.report([path]).splitlines()
    assert lines[0].startswith("machine: Some CPU, 2 logical CPUs (2 usable), 2 torch threads, GPU: none")
    assert "versions: torch 2.13.0, peft 0.21.2" in lines[1]
    assert lines[2] == "commit: 0123456789ab + uncommitted changes"
    assert "model: mini (quick run)" in lines
    assert "data: step[a]: real samples; step[b]: random ids" in lines
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.startswith(("case", "speedup", "flop_bound"))}
    assert rows == {"case": ["step[a]", "step[b]"], "speedup": ["1.5", "2"], "flop_bound": ["1.25", "2.5"]}


def test_contenders_of_their_own_get_one_row_each_below_the_case_table(tmp_path):
    contenders = {
        "fastprompt": {"tokens_per_s": 300.0, "flop_bound": 2.5},
        "peft_lora": {"tokens_per_s": 200.0, "flop_bound": 1.75, "published_tokens_per_s": 6800.0},
    }
    data = {
        "machine_info": MACHINE,
        "commit_info": {"id": "0123456789abcdef"},
        "benchmarks": [bench("mc", model="llama", published="PEFT's table", rounds=2, contenders=contenders)],
    }
    path = tmp_path / "x.json"
    path.write_text(json.dumps(data))
    lines = report.report([path]).splitlines()
    assert "published: PEFT's table" in lines
    header = next(line for line in lines if line.startswith("case"))
    assert header.split() == ["case", "rounds"]  # the contenders are no column of the case table
    start = lines.index("step[mc], per contender:")
    assert lines[start + 1].split() == ["contender", "tokens_per_s", "flop_bound", "published_tokens_per_s"]
    assert lines[start + 3].split() == ["fastprompt", "300", "2.5"]
    assert lines[start + 4].split() == ["peft_lora", "200", "1.75", "6.8e+03"]
