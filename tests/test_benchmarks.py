"""Each benchmark at toy size, as a subprocess: the tiny random model, one seed, one iteration, a few dialogues, and
the guessing game evaluated on 64 games instead of 1024. Checks the results JSON and the plot, and that `--report`
prints the tables the run printed, from the JSON alone. The numbers mean nothing at this size; the code paths are
the benchmarks' own."""

import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # every test here starts training scripts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_GAME = f"{os.path.abspath(__file__)}:small_guessing_game"


def small_guessing_game(seed: int, model: str | None = None):
    """The guessing game with 64 evaluation games (an evaluation of 1024 takes most of a toy run's time)."""
    from tasks.guess_number import make_task

    return make_task(seed, model=model, num_train=256, num_eval=64, num_recorded=64)


def bench(name, *flags, env):
    """Runs benchmarks/<name>.py with `flags`; returns its stdout."""
    out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", f"{name}.py"), *flags], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-5000:]
    return out


def results(output_dir, name):
    """The JSON the benchmark wrote, after checking that its plot is there too."""
    assert os.path.getsize(os.path.join(output_dir, f"{name}.png")) > 0
    with open(os.path.join(output_dir, f"{name}.json")) as f:
        return json.load(f)


def assert_report_reprints(name, output_dir, run_stdout, env, *flags):
    report = bench(name, "--output_dir", output_dir, "--report", *flags, env=env).stdout
    assert "|---|" in report and report.strip() in run_stdout


def is_score(value):
    return math.isfinite(value) and 0 <= value <= 1


def test_refuel_bench(tmp_path, tiny_model, script_env):
    out = bench("refuel_bench", "--seeds", "1", "--num_iterations", "1", "--first_guess_games", "16", "--output_dir",
                str(tmp_path), "--", "--model", tiny_model, "--task", SMALL_GAME, "--pairs_per_rank", "8",
                "--minibatch_pairs", "4", "--micro_batch_pairs", "4", env=script_env)
    found = results(tmp_path, "refuel_bench")
    assert found["seeds"] == [1] and sorted(found["runs"]) == ["paper", "uniform"]
    for sampling, runs in found["runs"].items():
        assert [r["seed"] for r in runs] == [1] and f"--horizon_sampling {sampling}" in runs[0]["command"]
        initial, final = runs[0]["metrics"]
        assert final["iteration"] == 1 and math.isfinite(final["loss/refuel"]) and final["time/train"] > 0
        assert all(is_score(m[f"eval/score_turn{t}"]) for m in (initial, final) for t in (1, 2, 3))
        assert initial["reference/binary search (optimal)_turn3"] == 1.0
    assert {k: len(v) for k, v in found["first_guesses"].items()} == {
        "initial policy": 16, "REFUEL, paper h": 16, "REFUEL, uniform h": 16}
    assert "| turn h | initial policy |" in out.stdout
    assert_report_reprints("refuel_bench", tmp_path, out.stdout, script_env)


def test_rebel_bench(tmp_path, tiny_model, script_env):
    out = bench("rebel_bench", "--seeds", "1", "--num_iterations", "1", "--model", tiny_model, "--num_prompts", "2",
                "--max_new_tokens", "8", "--repeats", "1", "--output_dir", str(tmp_path), "--", "--pairs_per_rank",
                "2", "--minibatch_pairs", "2", "--micro_batch_pairs", "2", "--max_new_tokens", "8",
                "--num_eval_prompts", "2", "--num_epochs", "1", env=script_env)
    found = results(tmp_path, "rebel_bench")
    for calls in found["throughput"]["calls"].values():
        assert len(calls) == 1 and calls[0]["tokens"] == 16 and calls[0]["seconds"] > 0  # 2 prompts x 8 tokens
    [run] = found["runs"]
    assert run["seed"] == 1 and "--pairs_per_rank 2" in run["command"]
    assert [m["iteration"] for m in run["metrics"]] == [0, 1]
    assert all(math.isfinite(m["eval/score_turn1"]) for m in run["metrics"])
    assert all(run["metrics"][1][f"time/{p}"] >= 0 for p in ("rollout", "reward", "old_logprobs", "train", "sync"))
    assert "vLLM / transformers tokens/s" in out.stdout and "### (c) Learning check (seeds 1;" in out.stdout
    assert_report_reprints("rebel_bench", tmp_path, out.stdout, script_env)


def test_multiturn_comparison_and_reuse_of_finished_runs(tmp_path, tiny_model, script_env):
    runs_dir = str(tmp_path / "runs")
    flags = ["--seeds", "1", "--num_iterations", "1", "--baseline_iterations", "1", "--token_budget", "100000",
             "--per_iteration", "8", "--recorded", "8", "--task", SMALL_GAME, "--methods", "REFUEL", "DPO-LT",
             "--output_dir", str(tmp_path), "--runs_dir", runs_dir, "--", "--model", tiny_model, "--minibatch_pairs",
             "4", "--micro_batch_pairs", "4"]
    out = bench("multiturn_comparison", *flags, env=script_env)
    found = results(tmp_path, "multiturn_comparison")
    assert found["seeds"] == [1] and found["token_budget"] == 100000 and list(found["runs"]) == ["REFUEL", "DPO-LT"]
    for method, [run] in found["runs"].items():
        assert run["seed"] == 1 and run["iterations"] == 1 and 0 < run["generated_tokens"] < 100000
        assert all(is_score(run[when][t]) for when in ("initial", "final") for t in ("1", "2", "3"))
    assert "| REFUEL |" in out.stdout and "| DPO-LT |" in out.stdout
    assert_report_reprints("multiturn_comparison", tmp_path, out.stdout, script_env)

    again = bench("multiturn_comparison", *flags, env=script_env)  # the finished runs are read, none is started
    assert "python refuel.py" not in again.stderr and results(tmp_path, "multiturn_comparison")["runs"] == found["runs"]
    changed = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "multiturn_comparison.py"),
                              *flags[:-1], "2"], env=script_env, capture_output=True, text=True, timeout=120)
    assert changed.returncode != 0 and "give another --runs_dir" in changed.stderr


def test_ma_ppo_bench(tmp_path, tiny_model, script_env):
    size = f"--model {tiny_model} --task {SMALL_GAME} --pairs_per_rank 8 --minibatch_pairs 4 --micro_batch_pairs 4"
    out = bench("ma_ppo_bench", "--seeds", "1", "--num_iterations", "1", "--ngram", "2", "--tasks",
                "guessing game (3 turns)", "--refuel_iterations", "1", "--refuel_flags", size, "--output_dir",
                str(tmp_path), "--", "--model", tiny_model, "--task", SMALL_GAME, "--dialogues_per_rank", "8",
                "--minibatch_dialogues", "4", "--micro_batch_dialogues", "4", env=script_env)
    found = results(tmp_path, "ma_ppo_bench")
    assert found["seeds"] == [1] and list(found["tasks"]) == ["guessing game (3 turns)"]
    by_n = found["tasks"]["guessing game (3 turns)"]
    assert sorted(by_n) == ["1", "2"]
    for n, [run] in by_n.items():
        assert run["seed"] == 1 and f"--ngram {n}" in run["command"]
        assert len(run["curve"]) == 2 and all(map(is_score, run["curve"]))  # iterations 0 and 1
        assert all(math.isfinite(s) and s >= 0 for s in run["seconds"].values())
    assert found["refuel"]["seconds"]["train"] > 0 and len(found["refuel"]["curve"]) == 2
    assert "| refuel.py, guessing game (3 turns) |" in out.stdout
    assert_report_reprints("ma_ppo_bench", tmp_path, out.stdout, script_env)


def test_scale_bench(tmp_path, tiny_model, script_env):
    out = bench("scale_bench", "--model", tiny_model, "--repeats", "1", "--anchor_dialogues", "2", "--anchor_horizon",
                "2", "--output_dir", str(tmp_path), env=script_env)
    anchor = results(tmp_path, "scale_anchor")
    assert anchor["work"]["dialogues"] == 2 and anchor["work"]["horizon"] == 2
    assert anchor["identical_to_fresh"]["fresh"] == 4
    for design in ("fresh", "two passes", "one pass"):
        assert anchor[design]["generated_tokens"] > 0
        assert all(math.isfinite(s) and s >= 0 for s in anchor[design]["seconds"].values())
    # branch turns h = 0 and 1: in two passes the dialogues take 2 policy calls and 1 user call, the branches (from
    # turn 0 and turn 1) 2 and 1 more, the later ones smaller; in one pass both sides share each call, the second
    # branch joining at turn 2
    assert anchor["fresh"]["calls"] == anchor["two passes"]["calls"] == {"policy": [2, 2, 2, 1], "user": [2, 1]}
    assert anchor["one pass"]["calls"] == {"policy": [3, 4], "user": [3]}
    assert "| engine starts | 6 |" in out.stdout  # a new engine for each of the 6 role turns of the fresh design

    with open(os.path.join(tmp_path, "scale_bench.json")) as f:
        memory = json.load(f)
    assert os.path.getsize(os.path.join(tmp_path, "scale.png")) > 0
    assert [r["case"] for r in memory["results"]] == ["sync_full", "sync_stream", "train", "train_checkpointed"]
    assert all(r["peak_bytes"] > 0 and r["seconds"] > 0 and r["parameters"] > 0 for r in memory["results"])
    for part in ("anchor", "memory"):
        assert_report_reprints("scale_bench", tmp_path, out.stdout, script_env, "--part", part)
