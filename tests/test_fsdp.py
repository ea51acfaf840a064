import os
import subprocess
import sys

import fsdp_step
import pytest
import torch

import utils

HERE = os.path.dirname(os.path.abspath(__file__))


pytestmark = pytest.mark.slow  # every test here starts a script or torchrun

def test_two_ranks_take_the_same_step_as_one(tiny_model, tmp_path, script_env, process_group):
    """tests/fsdp_step.py's step on 2 ranks under torchrun against the same step on one rank, taken here (this
    process's one-process group: a second torchrun start would cost more than the step)."""
    one = fsdp_step.one_step(tiny_model, *process_group)
    out = str(tmp_path / "two.pt")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.join(HERE, "fsdp_step.py"), tiny_model, out], check=True, timeout=300, env=script_env)
    two = torch.load(out)
    assert abs(one["loss"] - two["loss"]) < 1e-4 * max(1.0, abs(one["loss"]))
    for name, w in one["weights"].items():
        # fp32 on CPU; the two runs sum gradients in a different order, so allow float rounding
        torch.testing.assert_close(two["weights"][name], w, rtol=1e-5, atol=1e-6, msg=name)
    initial = utils.load_causal_lm(tiny_model).state_dict()
    moved = sum(not torch.equal(initial[k], v) for k, v in one["weights"].items())
    assert moved > len(one["weights"]) // 2  # the step really changed the weights


def test_cold_cache_builds_are_complete_on_every_rank(tmp_path, script_env):
    env = {**script_env, "XDG_CACHE_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(HERE, "cold_cache_build.py")],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(line for line in result.stdout.splitlines() if "complete folders" in line) == [
        "rank 0: complete folders", "rank 1: complete folders"]
