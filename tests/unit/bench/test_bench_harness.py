"""bench/harness.py: alternation, per-round output checks, ratios of totals."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))

from harness import Alternation  # noqa: E402


class FakeBenchmark:
    def pedantic(self, target, rounds, iterations):
        assert iterations == 1
        for _ in range(rounds):
            target()


def equal(reference, output):
    assert reference == output


def fake_contest(seconds_by_name, outputs=None, reference="theirs", **kwargs):
    """An Alternation on a fake clock: contender ``name`` takes
    ``seconds_by_name[name][round]`` and returns ``outputs[name]`` (0 by
    default). Returns it and the list of (round, name) calls made."""
    now, calls = [0.0], []

    def contender(name):
        def run(index):
            calls.append((index, name))
            now[0] += seconds_by_name[name][index]
            return (outputs or {}).get(name, 0)

        return run

    kwargs.setdefault("check", equal)
    contest = Alternation(
        {name: contender(name) for name in seconds_by_name}, reference=reference, clock=lambda: now[0], **kwargs
    )
    return contest, calls


def test_order_alternates_and_warmup_is_not_recorded():
    contest, calls = fake_contest({"ours": [1] * 4, "theirs": [2] * 4})
    contest.run(FakeBenchmark(), rounds=3)
    assert calls == [
        (0, "ours"),
        (0, "theirs"),
        (1, "theirs"),
        (1, "ours"),
        (2, "ours"),
        (2, "theirs"),
        (3, "theirs"),
        (3, "ours"),
    ]
    assert contest.timed_rounds == [1, 2, 3]
    assert [s["seconds"] for s in contest.samples["ours"]] == [1, 1, 1]


def test_speedup_is_a_ratio_of_totals_and_medians_are_per_call():
    contest, _ = fake_contest({"ours": [9, 1, 1, 4], "theirs": [9, 2, 3, 10]})
    contest.run(FakeBenchmark(), rounds=3)
    assert contest.speedup("ours") == pytest.approx((2 + 3 + 10) / (1 + 1 + 4))
    summary = contest.summary("step")
    assert summary == {"ours_step_s": 1, "theirs_step_s": 3, "speedup": pytest.approx(15 / 6), "rounds": 3}


def test_more_contenders_get_a_speedup_each_and_measured_metrics():
    seconds = {"a": 1, "b": 2, "ref": 4}
    contest, _ = fake_contest(
        {name: [s] * 3 for name, s in seconds.items()},
        outputs=seconds,
        reference="ref",
        check=lambda ref, out: None,
        measure=lambda out: {"half": out / 2},
    )
    contest.run(FakeBenchmark(), rounds=2)
    assert contest.summary("call") == {
        "a_call_s": 1,
        "b_call_s": 2,
        "ref_call_s": 4,
        "a_speedup": 4.0,
        "b_speedup": 2.0,
        "rounds": 2,
    }
    assert contest.speedup("a", "half") == 4.0 and contest.median("b", "half") == 1.0


def test_a_different_output_fails_the_round_by_name():
    contest, _ = fake_contest({"ours": [1] * 3, "theirs": [1] * 3}, outputs={"ours": 1.0, "theirs": 2.0})
    with pytest.raises(AssertionError, match="round 0: ours differs from theirs"):
        contest.run(FakeBenchmark(), rounds=2)


def test_needs_a_reference_among_two_or_more():
    with pytest.raises(ValueError):
        Alternation({"only": lambda i: 0}, reference="only", check=equal)
    with pytest.raises(ValueError):
        Alternation({"a": lambda i: 0, "b": lambda i: 0}, reference="c", check=equal)


def test_a_check_that_returns_a_difference_reports_the_largest():
    differences = iter([0.1, 0.3, 0.2])

    def close(reference, output):
        return next(differences)

    contest, _ = fake_contest({"ours": [1] * 3, "theirs": [1] * 3}, check=close)
    contest.run(FakeBenchmark(), rounds=2)
    assert contest.summary("step")["max_difference"] == 0.3


def test_only_the_checked_contenders_are_compared_with_the_reference():
    # "other" computes something else (LoRA beside prompt tuning): timed, never checked.
    outputs = {"ours": 1.0, "theirs": 1.0, "other": 5.0}
    contest, _ = fake_contest({name: [1] * 4 for name in outputs}, outputs=outputs, checked=("ours",))
    contest.run(FakeBenchmark(), rounds=2)
    assert contest.speedup("other") == 1.0
    outputs["ours"] = 2.0
    with pytest.raises(AssertionError, match="ours differs from theirs"):
        contest.play_round()
    with pytest.raises(ValueError, match="checked"):
        fake_contest({"ours": [1], "theirs": [1]}, checked=("theirs",))


def test_pairs_are_checked_each_against_its_counterpart_and_timed_against_it_too():
    # Two methods, each run by two contenders that must agree with each other (not with the reference).
    outputs = {"fast_a": 1.0, "slow_a": 1.0, "fast_b": 3.0, "slow_b": 3.0}
    seconds = {"fast_a": 1, "slow_a": 4, "fast_b": 2, "slow_b": 3}
    counter = iter(range(100))

    def equal_then_count(reference, output):
        equal(reference, output)
        return next(counter)

    contest, _ = fake_contest(
        {name: [s] * 4 for name, s in seconds.items()},
        outputs=outputs,
        reference="slow_a",
        check=equal_then_count,
        checked={"fast_a": "slow_a", "fast_b": "slow_b"},
    )
    contest.run(FakeBenchmark(), rounds=2)
    assert contest.speedup("fast_b") == 2.0  # over the reference by default
    assert contest.speedup("fast_b", over="slow_b") == 1.5
    # Three rounds (warm-up included), two checks each, in the pairs' order.
    assert contest.differences == {"fast_a": [0, 2, 4], "fast_b": [1, 3, 5]}
    assert contest.max_difference("fast_a") == 4 and contest.max_difference() == 5
    outputs["fast_b"] = 2.0
    with pytest.raises(AssertionError, match="fast_b differs from slow_b"):
        contest.play_round()
    with pytest.raises(ValueError, match="counterpart"):
        fake_contest({"a": [1], "b": [1]}, reference="a", checked={"b": "c"})
