"""The paper's runs (`--preset`) end to end at toy scale: the preset's flags, with tiny local models in place of the
8B/70B ones, a real local vLLM server as the 70B user, and a few rows in the official datasets' own formats."""

import json
import os
import sys

import pytest
import torch
from conftest import run_side_by_side

pytestmark = pytest.mark.slow  # every test here starts a script (the module's runs, two at a time)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = ["--num_iterations", "1", "--pairs_per_rank", "4", "--max_new_tokens", "4", "--num_eval_prompts", "2",
       "--kv_cache_gib", "0.0625", "--max_prompt_tokens", "256"]


def ultrainteract_pair_rows(n):
    """openbmb/UltraInteract_pair rows: `trajectory` holds the dialogue so far as {"from", "value"} messages."""
    return [{"task": "Math_CoT", "dataset": "gsm8k", "id": f"row{i}", "parent_id": f"p{i}",
             "instruction": f"How much is {i} + {i}?",
             "trajectory": [{"from": "user", "value": f"How much is {i} + {i}?"},
                            {"from": "assistant", "value": f"It is {i + i + 1}."},
                            {"from": "user", "value": "Your answer is wrong. Check it again."}][: 1 + 2 * (i % 2)],
             "chosen": f"It is {2 * i}.", "rejected": f"It is {2 * i + 1}."} for i in range(n)]


def hh_trl_style_rows(n):
    """trl-internal-testing/hh-rlhf-trl-style rows: `chosen`/`rejected` are whole role/content dialogues."""
    rows = []
    for i in range(n):
        turns = [{"role": "user", "content": f"Tell me about animal {i}."},
                 {"role": "assistant", "content": "It is a mammal."},
                 {"role": "user", "content": "Where does it live?"},
                 {"role": "assistant", "content": "In forests."}][: 2 + 2 * (i % 2)]
        rows.append({"prompt": turns[0]["content"], "chosen": turns,
                     "rejected": turns[:-1] + [{"role": "assistant", "content": "No idea."}]})
    return rows


def ultrafeedback_rows(n):
    """HuggingFaceH4/ultrafeedback_binarized rows: `prompt` is the first user message; the other columns ride along."""
    return [{"prompt": f"Write one line about topic {i}.", "prompt_id": f"id{i}",
             "chosen": [{"role": "user", "content": f"Write one line about topic {i}."},
                        {"role": "assistant", "content": "A line."}],
             "rejected": [{"role": "user", "content": f"Write one line about topic {i}."},
                          {"role": "assistant", "content": "No."}],
             "messages": [{"role": "user", "content": f"Write one line about topic {i}."},
                          {"role": "assistant", "content": "A line."}],
             "score_chosen": 8.0, "score_rejected": 3.0} for i in range(n)]


DPO_BASELINES = ["dpo-lt", "dpo-mt", "rebel-lt", "rebel-mt"]


@pytest.fixture(scope="module")
def preset_runs(tmp_path_factory, script_env, tiny_model, tiny_reward_model, user_server):
    """Every preset's toy run below, two at a time (most of a script start is Python imports on one core, so two
    side by side on 2 cores take little more than one): {preset: (its run folder, exit status, stdout, stderr)}."""
    models = ["--model", tiny_model, "--reward_model", tiny_reward_model]
    server_user = ["--user_url", user_server, "--user_model", tiny_model, "--user_max_tokens", "4"]
    cases = {
        "refuel-setting-one": ("refuel.py", ultrainteract_pair_rows(8), [
            *TOY, *models, *server_user, "--horizon", "2", "--minibatch_pairs", "2", "--val_fraction", "0.25",
            # the preset's 8,192-token context, cut to fit the tiny model's 2,048 positions
            "--max_context_tokens", "1024",
            # a schedule over 2 iterations; the token budget, spent by the first, stops the run
            "--num_iterations", "2", "--token_budget", "1"]),
        # a schedule over 3 iterations (the preset's schedule_scope run); the token budget, spent by the first,
        # stops the run after it
        **{preset: ("refuel.py", rows, [*TOY, *models, "--num_iterations", "3", "--token_budget", "1"])
           for preset, rows in (("refuel-setting-two-hh", hh_trl_style_rows(8)),
                                ("refuel-setting-two-ultrainteract", ultrainteract_pair_rows(8)))},
        "rebel-ultrafeedback": ("rebel.py", ultrafeedback_rows(8), [
            *models, "--num_iterations", "1", "--pairs_per_rank", "2", "--max_new_tokens", "4",
            "--num_eval_prompts", "2", "--kv_cache_gib", "0.0625"]),
        # the paper's four baselines in setting one: the server user plays pi_0's dialogues once (MIXED contexts)
        **{preset: ("dpo_multiturn.py", ultrainteract_pair_rows(8), [
            *models, *server_user, "--horizon", "2", "--num_recorded_dialogues", "4", "--num_iterations", "1",
            "--pairs_per_rank", "4", "--minibatch_pairs", "2", "--max_new_tokens", "4", "--num_eval_prompts", "2",
            "--kv_cache_gib", "0.0625", "--max_prompt_tokens", "256",
            "--max_context_tokens", "1024"])  # the preset's 8,192, cut to the tiny model's 2,048 positions
           for preset in DPO_BASELINES},
    }
    folders, commands = {}, {}
    for preset, (script, rows, flags) in cases.items():
        folders[preset] = tmp_path_factory.mktemp(preset)
        dataset = folders[preset] / "data.jsonl"
        dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
        commands[preset] = [sys.executable, os.path.join(REPO, script), "--preset", preset, "--dataset",
                            str(dataset), "--output_dir", str(folders[preset]), "--run_name", "r", *flags]
    finished = run_side_by_side(commands, script_env, tmp_path_factory.mktemp("preset_logs"), timeout=1200)
    return {preset: (folders[preset] / "r", *finished[preset]) for preset in cases}


def preset_run(preset_runs, preset):
    """A preset's run: its metrics records and its args.json, after checking that it ran to the end."""
    run_dir, returncode, _, stderr = preset_runs[preset]
    assert returncode == 0, stderr[-5000:]
    with open(run_dir / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    with open(run_dir / "args.json") as f:
        return metrics, json.load(f)


def test_setting_one(preset_runs):
    metrics, args = preset_run(preset_runs, "refuel-setting-one")
    assert args["preset"] == "refuel-setting-one" and [m["iteration"] for m in metrics] == [0, 1]
    # 3 training pairs (1 of 4 held out), 2 per step: 2 optimizer steps. The fresh cosine of the iteration (warmup
    # ceil(0.1 * 2) = 1 step) has ended at 0; one cosine over both iterations would be at 0.75 * 3e-7 here
    assert metrics[1]["policy/lr"] == 0.0
    # the paper's horizon sampling plays A to H' in {1, 2}; the server user answered every dialogue to its H'
    assert metrics[1]["data/turns_played"] == metrics[1]["data/horizon"] and "eval/score_turn2" in metrics[1]


@pytest.mark.parametrize("preset,kl,penalty", [("refuel-setting-two-hh", 0.05, -10.0),
                                               ("refuel-setting-two-ultrainteract", 0.0, -4.0)])
def test_setting_two(preset_runs, preset, kl, penalty):
    metrics, _ = preset_run(preset_runs, preset)
    # 3 training pairs (1 of 4 held out) in one minibatch of 4, 4 epochs: 4 optimizer steps of 12. Linear decay of
    # 3e-7 without warmup leaves 2/3 of it (a cosine would leave 3/4; a warmup of 0.1, 0.8)
    saved = torch.load(preset_runs[preset][0] / "checkpoints" / "iteration_000001" / "rank0.pt", weights_only=False)
    assert saved["trainer_state"]["schedulers"]["policy"]["last_epoch"] == 4
    assert metrics[1]["policy/lr"] == pytest.approx(2e-7, rel=1e-6)
    assert ("reward/kl" in metrics[1]) == (kl > 0)  # the KL term's reference is loaded only with a kl_coef
    # the dataset's dialogues have 1 or 2 user turns: the dataset user ends them there, before H = 5
    assert 1 <= metrics[1]["data/turns_played"] <= 2 and metrics[1]["data/branch_turn"] <= 2
    assert metrics[1]["reward/total"] == penalty  # tiny random models never end a 4-token turn


def test_rebel_ultrafeedback(preset_runs):
    """HuggingFaceH4/ultrafeedback_binarized rows (`prompt` is the first user message; the other columns ride
    along) with rebel.py's preset."""
    metrics, args = preset_run(preset_runs, "rebel-ultrafeedback")
    assert args["preset"] == "rebel-ultrafeedback" and args["kl_coef"] == 0.05 and args["temperature"] == 0.5
    assert [m["iteration"] for m in metrics] == [0, 1] and metrics[1]["policy/finished"] == 0  # 4 tokens never end


@pytest.mark.parametrize("preset", DPO_BASELINES)
def test_dpo_multiturn_baselines(preset_runs, preset):
    """The paper's four baselines in setting one: the server user plays pi_0's dialogues once (MIXED contexts)."""
    metrics, _ = preset_run(preset_runs, preset)
    assert [m["iteration"] for m in metrics] == [0, 1] and "eval/score_turn2" in metrics[1]
    loss = "loss/dpo" if preset.startswith("dpo") else "loss/rebel"
    assert loss in metrics[1] and metrics[1][loss] == metrics[1][loss]  # the preset's loss ran and is a number
    if preset.endswith("-lt"):  # the server user answers every turn, so the last turn of pi_0's dialogues is H
        assert metrics[1]["data/branch_turn"] == 2
