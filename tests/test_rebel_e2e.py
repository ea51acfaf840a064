"""rebel.py end to end under torchrun on 2 ranks: metrics, checkpoints, wandb offline, NaN rewards, resume."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import utils

pytestmark = pytest.mark.slow  # every test here starts a script or torchrun

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    topics = ["France", "cats", "rain", "music", "tea", "chess"]
    path.write_text("".join(json.dumps({"prompt": f"Say something short about {topics[i % 6]} ({i})."}) + "\n"
                            for i in range(30)))
    return str(path)


def command(model, prompt_file, output_dir, run_name, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            os.path.join(REPO, "rebel.py"), "--model", model, "--dataset", prompt_file, "--output_dir", output_dir,
            "--run_name", run_name, "--num_iterations", "4", "--pairs_per_rank", "2", "--max_new_tokens", "8",
            "--num_epochs", "2", "--micro_batch_pairs", "1", "--eval_every", "2", "--save_every", "2",
            "--num_eval_prompts", "4", "--lr", "1e-3", "--penalty_reward", "None", "--reward_function",
            os.path.join(REPO, "tests", "rewards.py") + ":brevity_or_nan", *extra]


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def full_run(tiny_model, prompt_file, tmp_path_factory, script_env):
    """The uninterrupted run's folder."""
    output_dir = str(tmp_path_factory.mktemp("runs"))
    env = {**script_env, "WANDB_MODE": "offline"}
    subprocess.run(command(tiny_model, prompt_file, output_dir, "full", "--track"), check=True, timeout=600, env=env)
    return os.path.join(output_dir, "full")


def test_run_writes_args_metrics_and_checkpoints(full_run, tiny_model):
    assert json.load(open(os.path.join(full_run, "args.json")))["num_iterations"] == 4
    metrics = read_metrics(full_run)
    assert [m["iteration"] for m in metrics] == [0, 1, 2, 3, 4]
    for m in metrics[1:]:
        assert math.isfinite(m["loss/rebel"]) and m["sync/logprob_gap"] < 1e-3
        assert {"time/rollout", "time/reward", "time/old_logprobs", "time/train", "time/sync"} <= m.keys()
    assert [("eval/score_turn1" in m) for m in metrics] == [True, False, True, False, True]
    checkpoints = sorted(os.listdir(os.path.join(full_run, "checkpoints")))
    assert checkpoints == ["iteration_000002", "iteration_000004"]
    trained = utils.load_causal_lm(os.path.join(full_run, "checkpoints", "iteration_000004", "hf"))
    initial = utils.load_causal_lm(tiny_model)
    assert not torch.equal(trained.model.layers[0].mlp.up_proj.weight, initial.model.layers[0].mlp.up_proj.weight)


def test_nan_rewards_are_skipped_and_counted(full_run):
    metrics = read_metrics(full_run)[1:]
    assert sum(m["skipped/nan_reward_pairs"] for m in metrics) > 0
    assert all(math.isfinite(m["loss/rebel"]) for m in metrics)


def test_wandb_offline_run_was_written(full_run):
    wandb_dir = os.path.join(full_run, "wandb")
    assert any(d.startswith("offline-run-") for d in os.listdir(wandb_dir))


HF_CHECK = """
import sys, engines, utils
folder = sys.argv[1]
device = utils.init_distributed()[2]
engine = engines.make_engine(folder, device, max_model_len=256, seed=0, bf16=False, gpu_memory_utilization=0.05,
                             kv_cache_memory_bytes=32 * 2**20, backend="vllm")
prompt = utils.chat_token_ids(utils.load_tokenizer(folder), [{"role": "user", "content": "Hi"}],
                              add_generation_prompt=True)
engines.check_sync(engine, utils.load_causal_lm(folder), prompt + [5, 6, 7], len(prompt), device, 1e-4)
print("parity ok")
"""


def test_hf_checkpoint_loads_in_vllm(full_run, script_env):
    # a process of its own: a second in-process vLLM engine shares vLLM's global parallel groups with the session's
    # engine (tests/conftest.py), and its shutdown would tear them down under it
    folder = os.path.join(full_run, "checkpoints", "iteration_000004", "hf")
    result = subprocess.run([sys.executable, "-c", HF_CHECK, folder], capture_output=True, text=True, timeout=300,
                            env=script_env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "parity ok" in result.stdout


def test_resume_continues_the_same_schedule(full_run, tiny_model, prompt_file, script_env):
    """`full_run` resumed from its checkpoint of iteration 2, the later one deleted (the resume writes it again; a
    kill mid-run is checked on refuel.py, whose checkpoints are written by the same code)."""
    uninterrupted = read_metrics(full_run)
    shutil.rmtree(os.path.join(full_run, "checkpoints", "iteration_000004"))
    subprocess.run(command(tiny_model, prompt_file, os.path.dirname(full_run), "full", "--track", "--resume"),
                   check=True, timeout=600, env={**script_env, "WANDB_MODE": "offline"})
    resumed = read_metrics(full_run)
    assert [m["iteration"] for m in resumed] == [0, 1, 2, 3, 4]
    for a, b in zip(resumed[3:], uninterrupted[3:]):
        for key in ("reward/score", "reward/kl", "loss/rebel", "policy/lr", "policy/response_tokens"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-5), (a["iteration"], key)


def test_overlong_prompts_are_counted_then_refused(tiny_model, prompt_file, tmp_path, script_env):
    result = subprocess.run([sys.executable, os.path.join(REPO, "rebel.py"), "--model", tiny_model, "--dataset",
                             prompt_file, "--output_dir", str(tmp_path), "--max_prompt_tokens", "10"],
                            capture_output=True, text=True, timeout=300, env=script_env)
    assert result.returncode != 0
    assert "0 usable prompts" in result.stderr and "'too_long': 30" in result.stderr
