"""Each script's first update, pinned: a fixed seed, a tiny random policy and a reward that varies from answer to
answer; the first iteration's loss and the first optimizer step's gradient norm must equal the values recorded
here (relative tolerance 1e-4). The resume tests compare a run with itself; these catch a change of the numbers
themselves (a loss, a mask, a target, a sampler), on purpose or not. When a change is meant to move them, rerun
the test, check the new numbers are right, and record them with the reason in the commit."""

import json
import os
import sys

import pytest
from conftest import run_side_by_side

pytestmark = pytest.mark.slow  # every test here starts a script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# one-turn chat openings from the embedded prompt set, answered by a tiny random policy; the dataset user ends each
# dialogue after its first answer, and the brevity reward scores it by its length (tasks/chat.py)
CHAT = ["--task", "chat", "--user", "dataset", "--num_eval_prompts", "4", "--max_new_tokens", "8",
        "--kv_cache_gib", "0.0625", "--max_prompt_tokens", "256"]
PINNED = {
    "refuel.py": (CHAT + ["--pairs_per_rank", "8", "--val_fraction", "0.25", "--minibatch_pairs", "8",
                          "--micro_batch_pairs", "4", "--lr", "1e-3"],
                  {"loss/refuel": 0.00762939453125, "policy/grad_norm": 4.7293782234191895}),
    # rebel.py: no penalty, which a tiny random policy that never ends an answer would get on every answer
    "rebel.py": (["--pairs_per_rank", "4", "--minibatch_pairs", "4", "--num_epochs", "1", "--max_new_tokens", "8",
                  "--penalty_reward", "None", "--num_eval_prompts", "4", "--kv_cache_gib", "0.0625", "--lr", "1e-3"],
                 {"loss/rebel": 0.00067138671875, "policy/grad_norm": 2.1295859813690186}),
    "dpo_multiturn.py": (CHAT + ["--contexts", "onpolicy", "--pairs_per_rank", "8", "--minibatch_pairs", "8",
                                 "--micro_batch_pairs", "4", "--lr", "1e-3"],
                         {"loss/dpo": 0.6931471824645996, "policy/grad_norm": 1.3650094270706177}),
    # ma_ppo.py: unmoved by the official defaults (macro rewards weighted by sigma, losses averaged per sample): at
    # the first update the policy is the reference, so every KL reward is 0, and the tiny policy's answers all run
    # to the 8-token cap, so each sample's token mean weighs as much as its tokens (rerun with the old defaults:
    # the same numbers). The critic's new value head starts at zero, so every first value is 0 and each first
    # advantage is the discounted reward
    "ma_ppo.py": (CHAT + ["--dialogues_per_rank", "8", "--minibatch_dialogues", "8", "--micro_batch_dialogues", "4",
                          "--lr", "1e-4"],
                  {"loss/policy": -0.8396972715854645, "loss/value": 0.3531849980354309,
                   "policy/actor_grad_norm": 1.7586851119995117, "policy/critic_grad_norm": 3.4716484546661377}),
}


@pytest.fixture(scope="module")
def pinned_runs(tiny_model, tmp_path_factory, script_env):
    """Each script's pinned run, two at a time (most of a script start is Python imports on one core):
    {script: (exit status, stderr, its run folder)}."""
    folders = {script: tmp_path_factory.mktemp(script.removesuffix(".py")) for script in PINNED}
    commands = {script: [sys.executable, os.path.join(REPO, script), "--model", tiny_model, "--seed", "1",
                         "--num_iterations", "1", "--output_dir", str(folders[script]), "--run_name", "pinned",
                         *flags] for script, (flags, _) in PINNED.items()}
    finished = run_side_by_side(commands, script_env, tmp_path_factory.mktemp("pinned_logs"), timeout=1200)
    return {script: (returncode, stderr, folders[script] / "pinned")
            for script, (returncode, _, stderr) in finished.items()}


@pytest.mark.parametrize("script", sorted(PINNED))
def test_first_update_is_pinned(script, pinned_runs):
    returncode, stderr, run_dir = pinned_runs[script]
    assert returncode == 0, stderr[-5000:]
    with open(run_dir / "metrics.jsonl") as f:
        first = [json.loads(line) for line in f][1]
    expected = PINNED[script][1]
    got = {key: first[key] for key in expected}
    assert got == {key: pytest.approx(value, rel=1e-4) for key, value in expected.items()}, got
