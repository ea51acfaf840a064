"""refuel.py on the chat task (a second vLLM engine plays the user, a reward model scores) and on a plugged-in task."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # every test here starts a script or torchrun

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ["--num_iterations", "1", "--pairs_per_rank", "4", "--minibatch_pairs", "2", "--micro_batch_pairs", "2",
         "--max_new_tokens", "4", "--eval_every", "1", "--kv_cache_gib", "0.0625"]


def run(tmp_path, env, *extra):
    subprocess.run([sys.executable, os.path.join(REPO, "refuel.py"), "--output_dir", str(tmp_path), "--run_name", "r",
                    *SHORT, *extra], check=True, timeout=600, env=env)
    with open(os.path.join(tmp_path, "r", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_chat_task_with_an_llm_user_and_a_reward_model(tmp_path, tiny_model, tiny_reward_model, script_env):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about topic {i}."}) + "\n" for i in range(8))
                       + json.dumps({"prompt": None}) + "\n")  # a null prompt: skipped, counted in the log
    metrics = run(tmp_path, script_env, "--task", "chat", "--model", tiny_model, "--user", "llm",
                  "--user_max_tokens", "4",
                  "--reward_model", tiny_reward_model, "--dataset", str(prompts), "--num_eval_prompts", "2",
                  "--horizon", "2", "--horizon_sampling", "uniform", "--kl_coef", "0.05", "--penalty_reward", "-1")
    assert [m["iteration"] for m in metrics] == [0, 1] and metrics[0]["skipped/rows_empty"] == 1
    assert {"eval/score_turn1", "eval/score_turn2", "eval/winrate_vs_initial_turn2"} <= metrics[1].keys()
    assert metrics[1]["data/turns_played"] == 2  # the LLM user kept every dialogue going to the horizon
    assert metrics[1]["reward/total"] == -1  # tiny random models never end a 4-token turn: all penalised (and
    # the KL term is 0: pi_t is the reference in the first iteration)


def test_a_plugged_in_task_needs_no_edit(custom_task_run):
    """tests/custom_task.py:make_task trains with refuel.py as it is (the run is shared with test_console.py)."""
    metrics, _ = custom_task_run
    assert [m["iteration"] for m in metrics] == [0, 1]
    assert metrics[1]["data/turns_played"] == 3 and "eval/score_turn3" in metrics[1]


def test_a_plugged_in_tasks_own_parameter_is_set_from_the_command_line(difficulty_task_verbose_run):
    """`--task_arg difficulty=5` reaches tests/difficulty_task.py's factory (the run, with --verbose, is shared with
    test_console.py)."""
    metrics, _, run_dir = difficulty_task_verbose_run
    assert metrics[0]["reference/difficulty_turn1"] == 5 and metrics[0]["reference/difficulty_turn2"] == 5
    with open(os.path.join(run_dir, "args.json")) as f:
        assert json.load(f)["task_arg"] == ["difficulty=5"]  # part of what was trained: a resume may not change it
