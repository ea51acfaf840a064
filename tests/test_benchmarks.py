"""Each benchmark at toy size, as a subprocess (two at a time, started by one module fixture): the tiny random model,
one seed, one iteration, a few dialogues, and the games' evaluations cut to 16 games instead of 1024. Checks the
results JSON and the plot, and that `--report` prints the tables the run printed, from the JSON alone. The numbers
mean nothing at this size; the code paths are the benchmarks' own."""

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
    """The guessing game with 16 evaluation games (an evaluation of 1024 takes most of a toy run's time)."""
    from tasks.guess_number import make_task

    return make_task(seed, model=model, num_train=256, num_eval=16, num_recorded=64)


SMALL_HARVEST = f"{os.path.abspath(__file__)}:small_harvest_game"


def small_harvest_game(seed: int, model: str | None = None):
    """The harvest game with 16 evaluation games."""
    from tasks.harvest import make_task

    return make_task(seed, model=model, num_train=256, num_eval=16, num_recorded=64)


def bench(name, *flags, env, timeout=600):
    """Runs benchmarks/<name>.py with `flags`; returns its stdout."""
    out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", f"{name}.py"), *flags], env=env,
                         capture_output=True, text=True, timeout=timeout)
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


def chat_flags(tiny_model):
    """The chat settings' own sizes: the tiny model in SmolLM2's place, a few tokens and evaluation prompts."""
    return ["--", "--model", tiny_model, "--user_max_tokens", "4", "--max_new_tokens", "4", "--num_eval_prompts", "4"]


def harvest_comparison_flags(output_dir, tiny_model):
    """The harvest game at toy size: two methods (REFUEL with a grid of two etas, grown once past its chosen edge;
    DPO-MT with one cell) on one tuning seed, one reported seed (seven runs with REFUEL's extra row), two at a
    time. DPO-MT records one dialogue, about 90 tokens of the 150 (dpo_multiturn.py refuses a budget its recording
    spends whole)."""
    return ["--task", SMALL_HARVEST, "--jobs", "2", "--methods", "REFUEL", "DPO-MT", "--lrs", "1e-3", "--etas", "2",
            "5", "--betas", "0.1", "--tuning_seeds", "0", "--max_extensions", "1", "--seeds", "1", "--token_budget",
            "150", "--pairs_per_rank", "8", "--num_recorded_dialogues", "1", "--output_dir", str(output_dir),
            "--runs_dir", str(output_dir / "runs"), "--", "--model", tiny_model, "--minibatch_pairs", "4",
            "--micro_batch_pairs", "4"]


@pytest.fixture(scope="module")
def bench_runs(tmp_path_factory, tiny_model, script_env):
    """Every benchmark run of this file, each in an output folder of its own, two at a time: each benchmark runs
    its scripts one after the other, one process on one core for most of their time (Python imports, a toy run), so
    two side by side on 2 cores take little more than one. The longest first. {name: (folder, exit status,
    stdout, stderr)}; the tests check them, and run the cheap `--report` (and the comparison's second pass) after."""
    from conftest import run_side_by_side  # here: the benchmarked scripts import this file for its small games

    chat = chat_flags(tiny_model)
    folders = {name: tmp_path_factory.mktemp(name) for name in (
        "multiturn_comparison", "scale_bench", "ma_ppo_bench", "chat_comparison", "refuel_bench", "chat_ma_ppo_bench",
        "rebel_bench", "load_bench", "lora_learning", "lora_bench")}
    flags = {
        "multiturn_comparison": harvest_comparison_flags(folders["multiturn_comparison"], tiny_model),
        "scale_bench": ["--model", tiny_model, "--repeats", "1", "--anchor_dialogues", "2", "--anchor_horizon", "2"],
        # two variants on one seed (two ma_ppo.py runs). The report over several seeds (intervals, paired
        # differences, the seeds that reach a target) is checked without runs, on the committed results of 5 seeds
        # (test_benchmark_settings.py: test_the_ma_ppo_docs_quote_the_committed_results_report)
        "ma_ppo_bench": ["--seeds", "1", "--num_iterations", "1", "--variants", "ppo", "randomized", "--",
                         "--model", tiny_model, "--dialogues_per_rank", "8", "--minibatch_dialogues", "4",
                         "--micro_batch_dialogues", "4"],
        "chat_comparison": ["--task", "chat", "--methods", "DPO-LT", "--lrs", "1e-3", "--betas", "0.1",
                            "--tuning_seeds", "0", "--seeds", "1",
                            "--token_budget", "200", "--pairs_per_rank", "4", "--num_recorded_dialogues", "4", *chat,
                            "--minibatch_pairs", "4", "--micro_batch_pairs", "4"],
        "refuel_bench": ["--seeds", "1", "--num_iterations", "1", "--first_guess_games", "16", "--", "--model",
                         tiny_model, "--task", SMALL_GAME, "--pairs_per_rank", "8", "--minibatch_pairs", "4",
                         "--micro_batch_pairs", "4"],
        "chat_ma_ppo_bench": ["--task", "chat", "--variants", "ppo", "--seeds", "1", "--num_iterations", "1", *chat,
                              "--dialogues_per_rank", "4", "--minibatch_dialogues", "4", "--micro_batch_dialogues", "4",
                              "--critic_warmup_steps", "0"],
        "rebel_bench": ["--seeds", "1", "--num_iterations", "1", "--model", tiny_model, "--num_prompts", "2",
                        "--max_new_tokens", "8", "--repeats", "1", "--", "--pairs_per_rank", "2", "--minibatch_pairs",
                        "2", "--micro_batch_pairs", "2", "--max_new_tokens", "8", "--num_eval_prompts", "2",
                        "--num_epochs", "1"],
        "load_bench": ["--model", tiny_model],
        # one learning rate a side: two tuning runs, then one reported seed a side
        "lora_learning": ["--seeds", "1", "--num_iterations", "1", "--full_lrs", "1e-3", "--lora_lrs", "1e-2", "--",
                          "--model", tiny_model, "--task", SMALL_GAME, "--pairs_per_rank", "8", "--minibatch_pairs",
                          "4", "--micro_batch_pairs", "4"],
        "lora_bench": ["--repeats", "1", "--num_iterations", "2", "--", "--model", tiny_model, "--pairs_per_rank", "2",
                       "--minibatch_pairs", "2", "--micro_batch_pairs", "2", "--max_new_tokens", "8",
                       "--num_eval_prompts", "2", "--num_epochs", "1"],
    }
    script = {"chat_comparison": "multiturn_comparison", "chat_ma_ppo_bench": "ma_ppo_bench"}
    commands = {}
    for name, given in flags.items():
        if "--output_dir" not in given:  # among the benchmark's own flags, before `--` and the script's flags
            split = given.index("--") if "--" in given else len(given)
            given = [*given[:split], "--output_dir", str(folders[name]), *given[split:]]
        commands[name] = [sys.executable, os.path.join(REPO, "benchmarks", f"{script.get(name, name)}.py"), *given]
    finished = run_side_by_side(commands, script_env, tmp_path_factory.mktemp("bench_logs"), timeout=3600)
    return {name: (folders[name], *finished[name]) for name in commands}


def bench_run(bench_runs, name):
    """A benchmark run of `bench_runs`: its output folder and its stdout, after checking that it succeeded."""
    folder, returncode, stdout, stderr = bench_runs[name]
    assert returncode == 0, stderr[-5000:]
    return folder, stdout


def test_refuel_bench(bench_runs, script_env):
    tmp_path, stdout = bench_run(bench_runs, "refuel_bench")
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
    assert "| turn h | initial policy |" in stdout
    assert_report_reprints("refuel_bench", tmp_path, stdout, script_env)


def test_rebel_bench(bench_runs, script_env):
    tmp_path, stdout = bench_run(bench_runs, "rebel_bench")
    found = results(tmp_path, "rebel_bench")
    for calls in found["throughput"]["calls"].values():
        assert len(calls) == 1 and calls[0]["tokens"] == 16 and calls[0]["seconds"] > 0  # 2 prompts x 8 tokens
    [run] = found["runs"]
    assert run["seed"] == 1 and "--pairs_per_rank 2" in run["command"]
    assert [m["iteration"] for m in run["metrics"]] == [0, 1]
    assert all(math.isfinite(m["eval/score_turn1"]) for m in run["metrics"])
    assert all(run["metrics"][1][f"time/{p}"] >= 0 for p in ("rollout", "reward", "old_logprobs", "train", "sync"))
    assert "vLLM / transformers tokens/s" in stdout and "### (c) Learning check (seeds 1;" in stdout
    assert_report_reprints("rebel_bench", tmp_path, stdout, script_env)


def test_multiturn_comparison_tunes_then_reports_paired_seeds_at_an_equal_budget(bench_runs, tiny_model,
                                                                                  script_env):
    """The harvest game at toy size: two methods (REFUEL with a grid of two etas, DPO-MT with one cell) on the
    tuning seed, one reported seed, REFUEL's extra row with the paper's h; then the same command again reads every
    finished run."""
    tmp_path, stdout = bench_run(bench_runs, "multiturn_comparison")  # seven runs
    flags = harvest_comparison_flags(tmp_path, tiny_model)
    runs_dir = str(tmp_path / "runs")
    name = "multiturn_comparison_test_benchmarks_py_small_harvest_game"
    found = results(tmp_path, name)
    assert found["seeds"] == [1] and found["tuning_seeds"] == [0] and found["token_budget"] == 150
    # eta 2 and 5, then one step past the better one (0.8 or 12.5), where the extension limit of 1 stops it
    refuel_grid = found["grid"]["REFUEL"]
    assert [(r["eta"], r["seeds"], r["steps"]) for r in refuel_grid[:2]] == [(2.0, [0], 1), (5.0, [0], 1)]
    assert len(refuel_grid) == 3 and refuel_grid[2]["eta"] == (0.8 if refuel_grid[0]["final"]["3"] >=
                                                               refuel_grid[1]["final"]["3"] else 12.5)
    assert [(r["lr"], r["beta"]) for r in found["grid"]["DPO-MT"]] == [(1e-3, 0.1)]
    best = max(refuel_grid, key=lambda r: r["final"]["3"])  # the grid's best at the last turn
    assert found["chosen"]["REFUEL"] == {"lr": 1e-3, "eta": best["eta"], "steps": 1}
    assert found["stopped_at_bounds"]["DPO-MT"] == [] and (
        found["stopped_at_bounds"]["REFUEL"] in ([], [f"eta {best['eta']:g} (the extension limit)"]))
    assert list(found["runs"]) == ["REFUEL", "DPO-MT", "REFUEL, the paper's h"]
    for method, [run] in found["runs"].items():
        # every run stops at the budget: the iteration that reaches it is the last, whatever the method's tokens
        assert run["seed"] == 1 and run["stopped_by_budget"] and run["generated_tokens"] >= 150
        chosen = found["chosen"][method.split(",")[0]]
        assert "--schedule_over token_budget" in run["command"] and f"--lr {chosen['lr']}" in run["command"]
        # one optimizer step per pass: REFUEL passes once, a baseline takes the setting's minibatch (the flags after
        # `--` give both 4 pairs)
        assert ("--num_epochs 1" if "REFUEL" in method else "--minibatch_pairs 64") in run["command"]
        assert "--eval_budget_points 4" in run["command"]
        # both logged measures are kept: the score reported, and the win rate against pi_0 beside it
        assert run["final_by_measure"]["score"] == run["final"] and set(run["final_by_measure"]) == {
            "score", "winrate_vs_initial"}
        assert all(0 <= run[when][t] <= 1 for when in ("initial", "final") for t in ("1", "2", "3"))
        assert "--horizon_sampling paper" in run["command"] if "paper" in method else "uniform" in run["command"]
        # the curve: the initial evaluation, any budget quarter an iteration crossed, and the final one
        curve = run["curve"]
        assert curve[0]["tokens"] < 150 <= curve[-1]["tokens"] and curve[-1]["measure"] == run["final"]
        assert [p["tokens"] for p in curve] == sorted(p["tokens"] for p in curve)
    assert "| REFUEL − DPO-MT |" in stdout and "| DPO-MT (chosen) |" in stdout and "| DPO-MT − π₀ |" in stdout
    assert "Curves: the evaluation score at turn 3" in stdout and "Each method's own diagnostics" in stdout
    assert "The final win rate against the initial policy by turn" in stdout
    # a tuning run (seed 0) is evaluated at its start and end only: its curve is not reported
    tuning = [json.loads(done.read_text())["command"] for done in (tmp_path / "runs").glob("*_s0.done.json")]
    assert len(tuning) == 4 and all("--eval_budget_points 0" in command for command in tuning)
    refuel_run = found["runs"]["REFUEL"][0]
    assert set(refuel_run["diagnostics"]) == {"reward/score", "dpo/rewards_chosen", "dpo/rewards_rejected",
                                              "dpo/accuracy", "val/sign_align"}
    assert all(math.isfinite(v) for v in refuel_run["diagnostics"]["reward/score"])
    assert all(math.isnan(v) for v in refuel_run["diagnostics"]["dpo/accuracy"])  # REFUEL logs no DPO diagnostics
    assert_report_reprints("multiturn_comparison", tmp_path, stdout, script_env, "--task", SMALL_HARVEST)
    # a finished run keeps its metrics, not its checkpoints
    assert all(not os.path.exists(os.path.join(runs_dir, d, "checkpoints")) and
               os.path.exists(os.path.join(runs_dir, d, "metrics.jsonl")) for d in os.listdir(runs_dir)
               if os.path.isdir(os.path.join(runs_dir, d)))

    again = bench("multiturn_comparison", *flags, env=script_env)  # the finished runs are read, none is started
    assert "python refuel.py" not in again.stderr and results(tmp_path, name)["runs"] == found["runs"]


def test_ma_ppo_bench(bench_runs, script_env):
    """Two variants on one seed (two ma_ppo.py runs; the report over several seeds: test_benchmark_settings.py)."""
    tmp_path, stdout = bench_run(bench_runs, "ma_ppo_bench")
    found = results(tmp_path, "ma_ppo_bench_digits")
    assert found["seeds"] == [1] and found["task"] == "digits" and list(found["runs"]) == ["ppo", "randomized"]
    for variant, runs in found["runs"].items():
        assert [r["seed"] for r in runs] == [1]
        for run in runs:
            assert "--max_new_tokens 48" in run["command"] and len(run["curve"]) == 2  # iterations 0 and 1
            assert all(math.isfinite(s) and -2.5 <= s <= 2.5 for s in run["curve"])
            # 8 dialogues in minibatches of 4: two updates an iteration
            assert run["samples"] == [0, 8] and run["updates"] == [0, 2] and run["seconds"][1] > 0
    assert "--ngram 1" in found["runs"]["ppo"][0]["command"]
    assert "--termination randomized" in found["runs"]["randomized"][0]["command"]
    assert "| MA-PPO, randomized lengths |" in stdout and "speed-up" in stdout
    assert_report_reprints("ma_ppo_bench", tmp_path, stdout, script_env)


def test_the_chat_settings_of_both_comparisons(bench_runs):
    """`multiturn_comparison.py --task chat` and `ma_ppo_bench.py --task chat` with their own flags (the LLM user,
    horizon 3, the win rate reported), the tiny model in SmolLM2's place, a few dialogues."""
    tmp_path, stdout = bench_run(bench_runs, "chat_comparison")
    found = results(tmp_path, "multiturn_comparison_chat")
    assert found["measure"] == "winrate_vs_initial" and list(found["runs"]) == ["DPO-LT"]
    [run] = found["runs"]["DPO-LT"]
    assert "--horizon 3" in run["command"] and run["stopped_by_budget"] and run["initial"] == {"1": 0.5, "2": 0.5,
                                                                                             "3": 0.5}
    assert all(0 <= v <= 1 for v in run["final"].values()) and "final win rate against the initial policy" in stdout
    tmp_path, _ = bench_run(bench_runs, "chat_ma_ppo_bench")
    [run] = results(tmp_path, "ma_ppo_bench_chat")["runs"]["ppo"]
    assert "--horizon 3" in run["command"] and run["samples"] == [0, 4] and len(run["curve"]) == 2


def test_scale_bench(bench_runs, script_env):
    tmp_path, stdout = bench_run(bench_runs, "scale_bench")
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
    assert "| engine starts | 6 |" in stdout  # a new engine for each of the 6 role turns of the fresh design

    with open(os.path.join(tmp_path, "scale_bench.json")) as f:
        memory = json.load(f)
    assert os.path.getsize(os.path.join(tmp_path, "scale.png")) > 0
    assert [r["case"] for r in memory["results"]] == ["sync_full", "sync_stream", "train", "train_checkpointed"]
    assert all(r["peak_bytes"] > 0 and r["seconds"] > 0 and r["parameters"] > 0 for r in memory["results"])
    # `--report` reprints both parts' tables from their JSON files alone (one report process: scale_bench.py imports
    # torch and vLLM, which costs more than the report); the run printed its progress between the two parts
    report = bench("scale_bench", "--output_dir", str(tmp_path), "--report", env=script_env).stdout
    blocks = [block.strip() for block in report.split("\n\n") if block.strip()]
    assert "| engine starts | 6 |" in report and "MiB sync buckets" in report
    assert sum("|---|" in block for block in blocks) >= 2 and all(block in stdout for block in blocks)


def test_load_bench(bench_runs, script_env):
    tmp_path, stdout = bench_run(bench_runs, "load_bench")
    with open(os.path.join(tmp_path, "load_bench.json")) as f:
        measured = json.load(f)["results"]
    assert [r["case"] for r in measured] == ["whole", "sharded"]
    # both loads end with the same shards: rank 0's eighth of every tensor's rows
    assert measured[0]["local_bytes"] == measured[1]["local_bytes"] > 0
    assert all(r["peak_bytes"] > 0 and r["seconds"] > 0 for r in measured)
    assert_report_reprints("load_bench", tmp_path, stdout, script_env)


def test_lora_learning_tunes_each_side_then_pairs_them_by_seed(bench_runs, script_env):
    tmp_path, stdout = bench_run(bench_runs, "lora_learning")
    found = results(tmp_path, "lora_learning")
    assert found["chosen"] == {"full fine-tuning": 1e-3, "LoRA r=8": 1e-2}
    for side, lora_flag in (("full fine-tuning", False), ("LoRA r=8", True)):
        tuned, reported = found["grid"][side], found["runs"][side]
        assert [r["seed"] for r in tuned] == [0] and [r["seed"] for r in reported] == [1]
        for run in tuned + reported:
            assert ("--lora_rank 8" in run["command"]) == lora_flag and "--horizon_sampling uniform" in run["command"]
            initial, final = run["metrics"]
            assert final["iteration"] == 1 and all(is_score(final[f"eval/score_turn{t}"]) for t in (1, 2, 3))
    # the same seed starts both sides from the same policy on the same evaluation games
    assert found["runs"]["full fine-tuning"][0]["metrics"][0] == found["runs"]["LoRA r=8"][0]["metrics"][0]
    assert "LoRA − full (paired)" in stdout
    assert_report_reprints("lora_learning", tmp_path, stdout, script_env)


def test_lora_bench(bench_runs, script_env):
    tmp_path, stdout = bench_run(bench_runs, "lora_bench")
    found = results(tmp_path, "lora_bench")
    assert sorted(found["runs"]) == ["LoRA r=8", "full fine-tuning"]
    for runs in found["runs"].values():
        [run] = runs
        assert run["peak_rss_gib"] > 0 and run["sync_gap"] < 1e-3 and len(run["iterations"]) == 2
        assert all(it["train"] > 0 for it in run["iterations"])
    assert "LoRA / full" in stdout
    assert_report_reprints("lora_bench", tmp_path, stdout, script_env)
