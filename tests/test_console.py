"""The default console shows the script's own lines only; `--verbose` lets third-party warnings through."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # every test here starts a script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# lines third-party code writes: Python warnings, logging records, torch's C++ warnings ("[W1130 ...] Warning: ...")
THIRD_PARTY = ("Warning", "WARNING", "INFO", "[W", "NUMA")


def console(tmp_path, env, tiny_model, *extra) -> str:
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "refuel.py"), "--output_dir", str(tmp_path), "--num_iterations", "1",
         "--pairs_per_rank", "4", "--minibatch_pairs", "2", "--micro_batch_pairs", "2", "--max_new_tokens", "4",
         "--kv_cache_gib", "0.0625", "--task", os.path.join(REPO, "tests", "custom_task.py") + ":make_task",
         "--model", tiny_model, "--rollout_backend", "vllm", *extra],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def test_default_console_has_no_third_party_lines_and_verbose_shows_them(tmp_path, tiny_model, script_env):
    quiet = console(tmp_path / "quiet", script_env, tiny_model)
    assert "memory plan per rank" in quiet and "score by turn" in quiet
    assert [line for line in quiet.splitlines() if any(marker in line for marker in THIRD_PARTY)] == []
    # the same run with --verbose lets them through (which ones depends on the machine: vLLM's "NUMA binding" line
    # comes from torch's C++ log on some CPUs only, Python's warnings on every one)
    verbose = console(tmp_path / "verbose", script_env, tiny_model, "--verbose")
    assert [line for line in verbose.splitlines() if any(marker in line for marker in THIRD_PARTY)] != []
