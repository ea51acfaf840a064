"""The benchmarks' own arithmetic, without runs: the comparison's per-method sizes, the 95% intervals, and the docs'
tables against the committed results."""

import argparse
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import common  # noqa: E402
import lora_bench  # noqa: E402
import lora_learning  # noqa: E402
import ma_ppo_bench  # noqa: E402
import multiturn_comparison  # noqa: E402


def settings(task, **given):
    flags = {"token_budget": None, "pairs_per_rank": None, "num_recorded_dialogues": None, "lrs": None, "etas": None,
             "betas": None, "steps": None, "methods": None}
    return multiturn_comparison.task_settings(argparse.Namespace(task=task, **{**flags, **given}))


def test_refuel_iterations_are_smaller_so_its_last_one_overshoots_the_budget_less():
    harvest = settings("harvest")
    assert (harvest.measure, harvest.token_budget, harvest.pairs, harvest.refuel_pairs, harvest.recorded) == (
        "score", 6_000, 128, 12, 32)
    # a REFUEL pair costs about 60 tokens in the harvest game: an iteration is about an eighth of the budget, where
    # the baselines' 128 pairs would be most of it
    assert harvest.refuel_pairs * 60 / harvest.token_budget < 0.13 < 0.9 < harvest.pairs * 60 / harvest.token_budget
    small = settings("harvest", pairs_per_rank=8, num_recorded_dialogues=4)
    assert (small.pairs, small.refuel_pairs, small.recorded) == (8, 8, 4)  # the flag sizes every method alike
    plug_in = settings("tests/custom_task.py:make_task")  # a plug-in has no budget of its own: --token_budget
    assert plug_in.token_budget is None and plug_in.flags == ["--task", "tests/custom_task.py:make_task"]


def test_each_task_has_its_grid_of_at_most_twelve_cells_and_the_flags_replace_it():
    for task, setting in multiturn_comparison.TASKS.items():
        assert set(setting.methods) <= set(multiturn_comparison.METHODS), task
        assert all(len(setting.lrs) * len(c) * len(setting.steps) <= 12 for c in (setting.etas, setting.betas)), task
    chat = settings("chat")
    assert chat.methods == ("REFUEL", "DPO-LT", "REBEL-LT") and len(chat.lrs) * len(chat.etas) == 2
    # the games tune the optimizer steps per token too: REFUEL's passes (the official 4 included), the baselines'
    assert (settings("harvest").lrs, settings("harvest").steps) == ((3e-4, 1e-3), (1, 4))
    # the word allowance: REFUEL at the official 4 passes, where eta acts, tunes it; DPO-LT takes as many steps
    allowance = settings("allowance")
    assert (allowance.methods, allowance.steps, allowance.etas, allowance.betas, allowance.measure) == (
        ("REFUEL", "DPO-LT"), (4,), (0.5, 5.0), (0.1,), "score")
    assert allowance.minibatch // allowance.steps[0] == 1 and allowance.refuel_pairs < allowance.pairs
    assert allowance.extra_rows == () and settings("harvest").extra_rows == ("REFUEL, the paper's h",)
    given = settings("chat", lrs=[1e-3], methods=["DPO-MT"], token_budget=100)
    assert (given.lrs, given.methods, given.token_budget, given.etas) == ((1e-3,), ("DPO-MT",), 100, (0.5,))


def test_tuning_grows_the_grid_past_a_chosen_edge_until_inside_or_at_a_bound():
    extend = multiturn_comparison.extend
    dims = ["lr", "eta", "steps"]
    grid = {(lr, eta, 1): 0.5 for lr in (1e-4, 3e-4, 1e-3) for eta in (0.5, 5.0)}
    # the best at the largest lr and the smallest eta: one step further along each (steps has one value: fixed)
    assert extend({**grid, (1e-3, 0.5, 1): 0.7}, dims, {}, 4) == ([(0.00333, 0.5, 1), (1e-3, 0.05, 1)], [])
    assert extend({**grid, (3e-4, 0.5, 1): 0.7}, dims, {}, 4) == ([(3e-4, 0.05, 1)], [])  # lr inside: eta alone
    # at a bound, or grown as often as allowed, it stops and says where
    assert extend({(3e-3, 0.5, 1): 0.1, (1e-2, 0.5, 1): 0.9}, dims, {}, 4) == ([], ["lr 0.01 (its bound)"])
    assert extend({**grid, (1e-3, 5.0, 1): 0.7}, dims, {"lr": 4}, 4) == (
        [(1e-3, 50.0, 1)], ["lr 0.001 (the extension limit)"])
    # steps grow in whole numbers, clipped to their bound of 8
    grown = {}
    assert extend({(1e-4, 0.5, 1): 0.1, (1e-4, 0.5, 4): 0.2}, dims, grown, 4) == ([(1e-4, 0.5, 8)], [])
    assert grown == {"steps": 1}


def test_interval95_uses_students_t():
    mean, half = common.interval95([1.0, 2.0, 3.0])
    # t(0.975, 2 df) * sd / sqrt(n), with t = 4.302653 (printed tables: 4.303)
    assert mean == 2.0 and math.isclose(half, 4.302653 / math.sqrt(3), rel_tol=1e-6)
    assert common.interval95([5.0]) == (5.0, math.inf)  # one seed says nothing about the spread
    assert common.with_interval([5.0]) == "5.000"


def test_paired_tests_match_students_t_tables_and_holm_steps_down():
    # t(0.975) and t(0.8) with 4 and 29 degrees of freedom, from printed tables
    assert math.isclose(common.t_quantile(0.975, 4), 2.776, abs_tol=1e-3)
    assert math.isclose(common.t_quantile(0.8, 4), 0.941, abs_tol=1e-3)
    assert math.isclose(common.t_quantile(0.975, 29), 2.045, abs_tol=1e-3)
    assert math.isclose(common.t_two_sided_p(12.706, 1), 0.05, abs_tol=1e-4)
    assert math.isclose(common.t_two_sided_p(4.604, 4), 0.01, abs_tol=1e-4)
    # mean 0.1, sd 0.1 / sqrt(1.5) over 4 pairs: t = sqrt(6) with 3 degrees of freedom, p = 0.0917 (between the
    # tables' 0.10 at 2.353 and 0.05 at 3.182)
    assert math.isclose(common.paired_p([0.0, 0.1, 0.1, 0.2]), 0.0917, abs_tol=1e-4)
    assert common.paired_p([0.3]) == 1.0 and common.paired_p([0.0, 0.0]) == 1.0
    # sorted 0.01, 0.03, 0.04, 0.2 times 4, 3, 2, 1, each at least the one before
    assert common.holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    # (t(0.975, 4) + t(0.8, 4)) * sd / sqrt(5)
    spread = [0.0, 0.1, 0.2, 0.1, 0.1]
    assert math.isclose(common.detectable_difference(spread), (2.776 + 0.941) * 0.0707107 / math.sqrt(5),
                        rel_tol=1e-3)
    assert common.detectable_difference([0.1]) == math.inf
    # a mean of 0.01 at sd 0.0707: the detectable difference first falls below it at n = 395, about (2.8 sd / 0.01)^2
    needed = common.seeds_to_detect([x - 0.09 for x in spread])
    assert 380 < needed < 410 and common.detectable_difference([0.01] * 2 + [x - 0.09 for x in spread]) > 0.01
    assert common.seeds_to_detect([0.1, -0.1]) is None and common.seeds_to_detect([0.1]) is None


DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def assert_docs_quote(page: str, report, results: dict[str, int]) -> None:
    """`page` (in docs/) quotes the first `count` tables of `report` on each committed results file, and each file
    has its plot: a results file and the docs cannot drift apart."""
    with open(os.path.join(DOCS, page)) as f:
        text = f.read()
    for name, count in results.items():
        tables = [block for block in report(common.load_results(os.path.join(DOCS, name))).split("\n\n")
                  if block.startswith("|")]
        assert len(tables) >= count, name
        for table in tables[:count]:
            assert table in text, f"docs/{page} does not quote this table of {name}:\n{table}"
        assert os.path.exists(os.path.join(DOCS, name.replace(".json", ".png"))), f"{name} has no plot"


def test_the_docs_tables_are_the_committed_results_report():
    """docs/dpo_multiturn.md quotes `--report` on each committed multiturn_comparison JSON, table for table."""
    found = sorted(f for f in os.listdir(DOCS) if f.startswith("multiturn_comparison_") and f.endswith(".json"))
    assert found, "no committed comparison results"
    assert_docs_quote("dpo_multiturn.md", multiturn_comparison.report, {name: 4 for name in found})


def test_the_ma_ppo_docs_quote_the_committed_results_report():
    """docs/ma_ppo.md quotes `--report` on each committed ma_ppo_bench JSON: every table of the main results (the
    digits benchmark, the chat runs) and the score table of the control."""
    assert_docs_quote("ma_ppo.md", ma_ppo_bench.report, {"ma_ppo_bench_digits.json": 3,
                                                         "ma_ppo_chat/ma_ppo_bench_chat.json": 3,
                                                         "ma_ppo_control/ma_ppo_bench_digits.json": 1})


def test_the_lora_docs_quote_the_committed_results_report():
    """docs/scale.md quotes `--report` on the committed LoRA results: the learning check's results and tuning
    tables, and the cost table."""
    assert_docs_quote("scale.md", lora_learning.report, {"lora_learning.json": 2})
    assert_docs_quote("scale.md", lora_bench.report, {"lora_bench.json": 1})
