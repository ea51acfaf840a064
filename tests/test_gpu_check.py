"""benchmarks/gpu_check.py at toy sizes on the CPU: the code paths the GPU check runs, without device memory."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # starts the check, which starts refuel.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_plans_every_case_and_runs_refuel(tmp_path, script_env):
    toy = ["--rows", "2", "--prompt_tokens", "24", "--response_tokens", "8", "--large_hidden_size", "128",
           "--large_layers", "2", "--large_intermediate_size", "256", "--large_heads", "4", "--refuel_iterations", "1",
           "--refuel_pairs", "4", "--refuel_task", os.path.join(REPO, "tests", "custom_task.py") + ":make_task"]
    subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py"), "--output_dir", str(tmp_path),
                    *toy], check=True, timeout=300, env=script_env)
    with open(tmp_path / "gpu_check.json") as f:
        result = json.load(f)
    assert result["device"] == "cpu" and result["backend"] == "gloo"
    cases = {(c["model"], c["gradient_checkpointing"]): c for c in result["cases"]}
    assert sorted(cases) == [("random-1b", False), ("random-1b", True), ("tiny", False), ("tiny", True)]
    for case in cases.values():
        assert set(case["planned"]) == {"weights", "gradients", "optimizer", "gathered_layers", "activations"}
        assert all(v > 0 for v in case["planned"].values())
        assert case["planned_training_bytes"] == sum(case["planned"].values())
        assert case["measured_peak_bytes"] is None  # no device memory to measure on the CPU
        assert case["loss"] > 0 and case["step_seconds"] > 0
    # the 128-wide model is the larger one, and checkpointing keeps fewer activations
    assert cases[("random-1b", False)]["parameters"] > cases[("tiny", False)]["parameters"]
    for model in ("tiny", "random-1b"):
        assert cases[(model, True)]["planned"]["activations"] < cases[(model, False)]["planned"]["activations"]
    refuel = result["refuel"]
    assert refuel["returncode"] == 0, refuel["output_tail"]
    assert refuel["checkpoints"] == ["iteration_000001"] and refuel["seconds"] > 0
