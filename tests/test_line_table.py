"""The scripts stay mostly algorithm: each meets its line targets (benchmarks/line_table.py), measured by a rule
checked here on a hand-made main block."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import line_table  # noqa: E402

SCRIPT = '''
import lifecycle


if __name__ == "__main__":
    args = lifecycle.parse_args(Args, PRESETS)
    run = lifecycle.start_run(args)
    policy = load(run.policy_path)

    for iteration in run.iterations():
        # 1. the loss
        if args.kl_coef > 0:
            loss = (x - y) ** 2
        else:
            loss = x
        run.lap("train")
        metrics = {"loss": loss}
        run.end_iteration(iteration, metrics, {}, {}, {})
'''


def test_statements_are_labelled_by_what_they_call(tmp_path):
    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    counted = line_table.count(str(path))
    # algorithm (6 lines): the policy line, the comment, the if/else with its two assignments; plumbing (7): the
    # block's header, parse_args, start_run, the loop header, lap, metrics, end_iteration
    assert (counted["algorithm"], counted["non_blank"]) == (6, 13)


def test_every_script_meets_its_line_targets():
    text, ok = line_table.table()
    assert ok, text


def test_the_readme_command_prints_the_table():
    result = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "line_table.py")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| refuel.py |" in result.stdout and "utils.py:" in result.stdout
