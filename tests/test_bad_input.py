"""Bad flags are refused with a message that names them, before any model or engine loads."""

import os
import subprocess
import sys

import pytest
import tyro

import rebel
import refuel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REFUEL_CASES = [
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--eta", "-1"], "--eta must be > 0"),
    (["--minibatch_pairs", "0"], "--minibatch_pairs, --micro_batch_pairs"),
    (["--dialogues_per_rank", "1"], "--dialogues_per_rank must be at least 2"),
    (["--val_fraction", "1"], "--val_fraction must be in (0, 1)"),
    (["--resume"], "--resume needs --run_name"),
]
REBEL_CASES = [
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--eta", "0"], "--eta must be > 0"),
    (["--num_minibatches", "5", "--prompts_per_rank", "4"], "--num_minibatches 5 must be within 1..4"),
    (["--reward_function", "no_such_module:f"], "No module named 'no_such_module'"),
]


@pytest.mark.parametrize("flags,message", REFUEL_CASES, ids=[" ".join(f) for f, _ in REFUEL_CASES])
def test_refuel_refuses_bad_flags(flags, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)")):
        refuel.check_args(tyro.cli(refuel.Args, args=flags))


@pytest.mark.parametrize("flags,message", REBEL_CASES, ids=[" ".join(f) for f, _ in REBEL_CASES])
def test_rebel_refuses_bad_flags(flags, message):
    with pytest.raises((SystemExit, ValueError), match=message):
        rebel.check_args(tyro.cli(rebel.Args, args=flags))


@pytest.mark.parametrize("task,message", [
    ("guess", "unknown task 'guess': use one of \\['chat', 'guess_number'\\]"),
    ("no_such_module:make_task", "cannot import no_such_module"),
    ("missing_file.py:make_task", "no file missing_file.py"),
    (os.path.join(REPO, "tests", "custom_task.py") + ":missing", "has no 'missing'"),
])
def test_refuel_refuses_a_task_it_cannot_import(task, message):
    with pytest.raises(ValueError, match=message):
        refuel.check_args(tyro.cli(refuel.Args, args=["--task", task]))


@pytest.mark.slow
def test_a_bad_task_stops_the_script_before_anything_loads(tmp_path, script_env):
    result = subprocess.run([sys.executable, os.path.join(REPO, "refuel.py"), "--task", "guess",
                             "--output_dir", str(tmp_path)], capture_output=True, text=True, timeout=120,
                            env=script_env)
    assert result.returncode != 0 and "unknown task 'guess'" in result.stderr
    assert os.listdir(tmp_path) == []  # no run folder: nothing started
