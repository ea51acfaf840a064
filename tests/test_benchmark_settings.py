"""The benchmarks' own arithmetic, without runs: the comparison's per-method sizes, the 95% intervals, and the docs'
tables against the committed results."""

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import common  # noqa: E402
import multiturn_comparison  # noqa: E402


def settings(task, pairs=None, recorded=None):
    return multiturn_comparison.task_settings(argparse.Namespace(task=task, pairs_per_rank=pairs,
                                                                 num_recorded_dialogues=recorded))


def test_refuel_iterations_are_smaller_so_its_last_one_overshoots_the_budget_less():
    _, measure, budget, pairs, refuel_pairs, recorded = settings("harvest")
    assert (measure, budget, pairs, refuel_pairs, recorded) == ("score", 30_000, 256, 64, 256)
    # a REFUEL pair costs about 70 tokens in the games: an iteration is about 15% of the budget, not 60%
    assert refuel_pairs * 70 / budget < 0.16 < pairs * 70 / budget
    assert settings("harvest", pairs=8, recorded=4)[3:] == (8, 8, 4)  # the flag sizes every method alike
    assert settings("tests/custom_task.py:make_task")[2:] == (None, 256, 64, 256)  # a plug-in has none: --token_budget


def test_interval95_uses_students_t():
    mean, half = common.interval95([1.0, 2.0, 3.0])
    assert mean == 2.0 and math.isclose(half, 4.303 / math.sqrt(3))  # t(0.975, 2 df) * sd / sqrt(n)
    assert common.interval95([5.0]) == (5.0, math.inf)  # one seed says nothing about the spread
    assert common.with_interval([5.0]) == "5.000"


def test_the_docs_tables_are_the_committed_results_report():
    """docs/dpo_multiturn.md quotes `--report` on each committed multiturn_comparison JSON, table for table: a
    results file and the docs cannot drift apart."""
    docs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
    found = sorted(f for f in os.listdir(docs) if f.startswith("multiturn_comparison_") and f.endswith(".json"))
    assert found, "no committed comparison results"
    with open(os.path.join(docs, "dpo_multiturn.md")) as f:
        text = f.read()
    for name in found:
        report = multiturn_comparison.report(common.load_results(os.path.join(docs, name)))
        tables = [block for block in report.split("\n\n") if block.startswith("|")]
        assert len(tables) == 3, name
        for table in tables:
            assert table in text, f"docs/dpo_multiturn.md does not quote this table of {name}:\n{table}"
        assert os.path.exists(os.path.join(docs, name.replace(".json", ".png"))), f"{name} has no plot"
