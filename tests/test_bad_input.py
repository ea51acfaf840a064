"""Bad flags are refused with a message that names them, before any model or engine loads."""

import os
import re
import sys

import pytest
import tyro
from conftest import run_side_by_side

import dpo_multiturn
import ma_ppo
import rebel
import refuel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REFUEL_CASES = [
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--eta", "-1"], "--eta must be > 0"),
    (["--minibatch_pairs", "0"], "--minibatch_pairs, --micro_batch_pairs"),
    (["--pairs_per_rank", "1"], "--pairs_per_rank must be at least 2"),
    (["--val_fraction", "1"], "--val_fraction must be in (0, 1)"),
    (["--kl_coef", "-0.1"], "--kl_coef must be >= 0"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--warmup_ratio", "1.5"], "--warmup_ratio must be in [0, 1]"),
    (["--weight_decay", "-1"], "--weight_decay must be >= 0"),
    (["--max_grad_norm", "0"], "--max_grad_norm must be > 0"),
    (["--resume"], "--resume needs --run_name"),
    (["--eval_budget_points", "4"], "--eval_budget_points must be at least 0, and needs --token_budget"),
]
REBEL_CASES = [
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--eta", "0"], "--eta must be > 0"),
    (["--kl_coef", "-0.05"], "--kl_coef must be >= 0"),
    (["--lr", "-1e-5"], "--lr must be > 0"),
    (["--warmup_ratio", "-0.1"], "--warmup_ratio must be in [0, 1]"),
    (["--max_grad_norm", "-1"], "--max_grad_norm must be > 0"),
    (["--minibatch_pairs", "0"], "--pairs_per_rank, --minibatch_pairs, --micro_batch_pairs, --num_epochs and"),
    (["--reward_function", "no_such_module:f"], "No module named 'no_such_module'"),
]
DPO_CASES = [
    (["--beta", "0"], "--beta and --eta must be > 0"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--warmup_ratio", "2"], "--warmup_ratio must be in [0, 1]"),
    (["--weight_decay", "-0.1"], "--weight_decay must be >= 0"),
    (["--max_grad_norm", "0"], "--max_grad_norm must be > 0"),
]
MA_PPO_CASES = [
    (["--gamma", "1.5"], "--gamma must be in [0, 1]"),
    (["--lam", "-0.1"], "--lam must be in [0, 1]"),
    (["--clip_eps", "0"], "--clip_eps must be > 0"),
    (["--value_clip", "-0.2"], "--value_clip must be > 0"),
    (["--reward_clip", "0"], "--reward_clip must be > 0"),
    (["--kl_coef", "-0.05"], "--kl_coef must be >= 0"),
    (["--critic_lr", "0"], "--lr and --critic_lr must be > 0"),
    (["--lr", "-1"], "--lr and --critic_lr must be > 0"),
    (["--warmup_ratio", "1.5"], "--warmup_ratio must be in [0, 1]"),
    (["--weight_decay", "-1"], "--weight_decay must be >= 0"),
    (["--max_grad_norm", "0"], "--max_grad_norm must be > 0"),
    (["--random_lengths", "2", "0"], "--random_lengths and --random_repeats must be at least 1"),
    (["--temperature", "0"], "--temperature must be > 0"),
]


@pytest.mark.parametrize("flags,message", REFUEL_CASES, ids=[" ".join(f) for f, _ in REFUEL_CASES])
def test_refuel_refuses_bad_flags(flags, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        refuel.check_args(tyro.cli(refuel.Args, args=flags))


@pytest.mark.parametrize("flags,message", REBEL_CASES, ids=[" ".join(f) for f, _ in REBEL_CASES])
def test_rebel_refuses_bad_flags(flags, message):
    with pytest.raises((SystemExit, ValueError), match=re.escape(message)):
        rebel.check_args(tyro.cli(rebel.Args, args=flags))


@pytest.mark.parametrize("flags,message", DPO_CASES, ids=[" ".join(f) for f, _ in DPO_CASES])
def test_dpo_refuses_bad_flags(flags, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        dpo_multiturn.check_args(tyro.cli(dpo_multiturn.Args, args=flags))


@pytest.mark.parametrize("flags,message", MA_PPO_CASES, ids=[" ".join(f) for f, _ in MA_PPO_CASES])
def test_ma_ppo_refuses_bad_flags(flags, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        ma_ppo.check_args(tyro.cli(ma_ppo.Args, args=flags))


@pytest.mark.parametrize("task,message", [
    ("guess", "unknown task 'guess': use one of \\['allowance', 'chat', 'digits', 'guess_number', 'harvest'\\]"),
    ("no_such_module:make_task", "cannot import no_such_module"),
    ("missing_file.py:make_task", "no file missing_file.py"),
    (os.path.join(REPO, "tests", "custom_task.py") + ":missing", "has no 'missing'"),
])
def test_refuel_refuses_a_task_it_cannot_import(task, message):
    with pytest.raises(ValueError, match=message):
        refuel.check_args(tyro.cli(refuel.Args, args=["--task", task]))


MISSING_DATA = {  # a data file that is not there, for each script's own data flag
    "refuel.py": (["--task", "chat", "--dataset"], "prompts.jsonl"),
    "ma_ppo.py": (["--task", "chat", "--dataset"], "prompts.csv"),
    "rebel.py": (["--dataset"], "prompts.json"),
    "dpo_multiturn.py": (["--preference_dataset"], "pairs.parquet"),
}


@pytest.fixture(scope="module")
def refused_starts(tmp_path_factory, script_env, tiny_model):
    """The scripts started with a bad task or a missing data file, two at a time (a script start costs 15-25 s of
    imports on one core, its refusal nothing). {case: (its output folder, the missing file or None, exit status,
    stdout, stderr)}."""
    folders, missing, commands = {}, {}, {}
    folders["bad task"] = tmp_path_factory.mktemp("bad_task")
    missing["bad task"] = None
    commands["bad task"] = [sys.executable, os.path.join(REPO, "refuel.py"), "--task", "guess", "--output_dir",
                            str(folders["bad task"])]
    for script, (flag, name) in MISSING_DATA.items():
        folders[script] = tmp_path_factory.mktemp(f"missing_{name.replace('.', '_')}")
        missing[script] = str(folders[script] / "no_such_folder" / name)
        commands[script] = [sys.executable, os.path.join(REPO, script), *flag, missing[script], "--model", tiny_model,
                            "--output_dir", str(folders[script] / "runs")]
    finished = run_side_by_side(commands, script_env, tmp_path_factory.mktemp("refused_logs"), timeout=600)
    return {case: (folders[case], missing[case], *finished[case]) for case in commands}


@pytest.mark.slow
def test_a_bad_task_stops_the_script_before_anything_loads(refused_starts):
    folder, _, returncode, _, stderr = refused_starts["bad task"]
    assert returncode != 0 and "unknown task 'guess'" in stderr
    assert os.listdir(folder) == []  # no run folder: nothing started


@pytest.mark.slow
@pytest.mark.parametrize("script", list(MISSING_DATA))
def test_a_missing_data_file_is_one_line_naming_it(refused_starts, script):
    """Not a traceback from every rank, and never a hub request for a repository named like a file."""
    _, missing, returncode, _, stderr = refused_starts[script]
    assert returncode != 0 and "Traceback" not in stderr, stderr[-3000:]
    assert f"{missing}: no such file" in stderr.splitlines()
