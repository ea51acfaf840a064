"""refuel.py end to end under torchrun on 2 ranks on the guessing task: metrics, checkpoints, kill and resume."""

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import free_port

pytestmark = pytest.mark.slow  # every test here starts a script or torchrun

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(output_dir, run_name, *extra):
    # the README's multi-node launch (a c10d rendezvous endpoint), on one node; 16 evaluation games instead of the
    # game's 1,024 (an evaluation of 1,024 took most of a run's time; the resume compares the same 16 games)
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--nproc_per_node=2",
            os.path.join(REPO, "refuel.py"), "--output_dir", output_dir, "--run_name", run_name,
            "--num_iterations", "3", "--pairs_per_rank", "8", "--minibatch_pairs", "4", "--micro_batch_pairs", "4",
            "--eval_every", "2", "--save_every", "1", "--horizon_sampling", "uniform",
            "--warm_start_steps", "50", "--task_arg", "num_eval=16", *extra]


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, script_env, kill_run):
    """The uninterrupted run's folder. Beside it (2 ranks leave a core mostly idle) the same run goes into the same
    output folder as "killed", and is killed after its first checkpoint, for the resume test."""
    output_dir = str(tmp_path_factory.mktemp("runs"))
    uninterrupted = subprocess.Popen(command(output_dir, "full"), env=script_env)
    kill_run(subprocess.Popen(command(output_dir, "killed"), env=script_env),
             os.path.join(output_dir, "killed", "checkpoints", "iteration_000001"))
    assert uninterrupted.wait(timeout=900) == 0
    return os.path.join(output_dir, "full")


def test_iterations_log_regression_diagnostics_and_per_turn_eval(full_run):
    metrics = read_metrics(full_run)
    assert [m["iteration"] for m in metrics] == [0, 1, 2, 3]
    initial = metrics[0]
    assert initial["reference/binary search (optimal)_turn3"] == 1.0
    assert all(initial[f"eval/winrate_vs_initial_turn{t}"] == 0.5 for t in range(1, 4))  # itself: all ties
    for m in metrics[1:]:
        assert math.isfinite(m["loss/refuel"]) and math.isfinite(m["val/loss"])
        assert math.isnan(m["val/sign_align"]) or 0 <= m["val/sign_align"] <= 1  # NaN: no informative pair
        assert m["sync/logprob_gap"] < 1e-3 and 1 <= m["data/branch_turn"] <= 3
        # every rank's engine read back the embedding and 3 norms (vLLM's CPU build keeps linear weights packed)
        assert m["sync/tensors_checked"] == 4 and m["sync/logprob_gap_p95"] <= m["sync/logprob_gap_max"] < 1e-3
    assert "eval/score_turn3" in metrics[2] and "eval/score_turn3" in metrics[3]
    assert sorted(os.listdir(os.path.join(full_run, "checkpoints"))) == [
        "iteration_000001", "iteration_000002", "iteration_000003"]


def test_resume_after_kill_continues_the_same_schedule(full_run, script_env):
    """The run `full_run` killed after its first checkpoint, resumed."""
    output_dir = os.path.dirname(full_run)
    run_dir = os.path.join(output_dir, "killed")
    subprocess.run(command(output_dir, "killed", "--resume"), check=True, timeout=900, env=script_env)
    resumed, uninterrupted = read_metrics(run_dir), read_metrics(full_run)
    assert [m["iteration"] for m in resumed] == [0, 1, 2, 3]
    for a, b in zip(resumed[2:], uninterrupted[2:]):
        for key in ("reward/score", "loss/refuel", "val/loss", "policy/lr", "data/branch_turn", "eval/score_turn3"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-5), (a["iteration"], key)
