"""The shared plumbing the scripts stand on: task loading, metrics over ranks, the run folder, checkpoints, plots."""

import dataclasses
import inspect
import json
import math
import os
from typing import Literal

import helpers
import pytest
import torch
import tyro

import checkpoints
import tasks
import lifecycle
import utils
from tasks import TaskArgs, load_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUSTOM = os.path.join(REPO, "tests", "custom_task.py")
DIFFICULTY = os.path.join(REPO, "tests", "difficulty_task.py")


def test_a_plugged_in_task_gets_only_the_values_it_takes(capsys, process_group):
    task = load_task(TaskArgs(task=f"{CUSTOM}:make_task"), seed=3, rank=0, num_openings=5)
    assert len(task.train) == 5 and task.horizon == 3
    assert "warning" not in capsys.readouterr().out
    load_task(TaskArgs(task=f"{CUSTOM}:make_task", guess_max=9, user="server"), seed=3)
    assert "does not use --guess_max, --user" in capsys.readouterr().out


def test_a_plugged_in_task_gets_its_own_parameters_from_task_arg(process_group):
    task = load_task(TaskArgs(task=f"{DIFFICULTY}:make_task", task_arg=("difficulty=5",)), seed=3)
    assert task.reference_scores["difficulty"] == [5, 5] and type(task.reference_scores["difficulty"][0]) is int
    for pair, message in [("level=5", "no parameter 'level' \\(its own: difficulty\\)"),
                          ("difficulty=hard", "difficulty=hard: not a valid int"),
                          ("difficulty", "write it as name=value"),
                          ("guess_max=9", "guess_max is a flag of its own, set it with --guess_max"),
                          ("seed=4", "the script passes the task its own seed")]:
        with pytest.raises(ValueError, match=f"--task_arg .*{message}"):
            load_task(TaskArgs(task=f"{DIFFICULTY}:make_task", task_arg=(pair,)), seed=3)


def test_task_arg_is_repeatable_on_the_command_line():
    assert tyro.cli(TaskArgs, args=["--task_arg", "difficulty=5", "--task_arg", "mode=a=b"]).task_arg == (
        "difficulty=5", "mode=a=b")


def test_an_unannotated_parameter_takes_its_defaults_type():
    def make_task(difficulty=3, name=None):
        pass

    parameters = inspect.signature(make_task).parameters
    assert tasks.parameter_type(parameters["difficulty"]) is int and tasks.parameter_type(parameters["name"]) is str


@pytest.mark.parametrize("kind,value,expected", [
    (int, "5", 5), (float, "0.5", 0.5), (bool, "True", True), (bool, "false", False), (str, "hard", "hard"),
    (Literal["easy", "hard"], "hard", "hard"), (Literal[1, 2], "2", 2)])
def test_task_arg_values_take_their_parameters_type(kind, value, expected):
    converted = tasks.converted("p", value, kind)
    assert converted == expected and type(converted) is type(expected)


@pytest.mark.parametrize("kind,value,message", [
    (bool, "yes", "p=yes: write true or false"), (float, "fast", "p=fast: not a valid float"),
    (Literal["easy", "hard"], "medium", "p=medium: choose one of easy, hard"),
    (list[int], "1", "p=1: --task_arg converts to int, float, bool, str or a Literal, not to list\\[int\\]")])
def test_task_arg_values_that_do_not_convert_are_named(kind, value, message):
    with pytest.raises(ValueError, match=f"--task_arg {message}"):
        tasks.converted("p", value, kind)


def test_unknown_tasks_and_wrong_returns_are_clear_errors(tmp_path, process_group):
    with pytest.raises(ValueError, match="unknown task 'guess'.*chat.*guess_number"):
        load_task(TaskArgs(task="guess"))
    bad = tmp_path / "bad_task.py"
    bad.write_text("def make_task():\n    return {'train': []}\n")
    with pytest.raises(TypeError, match="returned dict, not a tasks.Task"):
        load_task(TaskArgs(task=f"{bad}:make_task"))
    with pytest.raises(ValueError, match="has no 'nothing'"):
        load_task(TaskArgs(task=f"{bad}:nothing"))


def test_the_guessing_task_with_a_given_model_trains_no_warm_start(process_group, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # an empty cache: a warm start or conversion would land here
    task = load_task(TaskArgs(task="guess_number"), seed=0, model="some/model")
    assert task.policy is None and task.horizon == 3 and len(task.eval) == 1024
    assert not os.path.exists(os.path.join(tmp_path, "multiturn_rlhf"))


def test_metrics_are_averaged_by_name_over_finite_values(process_group):
    means = utils.mean_over_ranks({"b": [1.0, float("nan"), 3.0], "a": 0.5, "c": [float("nan")], "d": []})
    assert means["a"] == 0.5 and means["b"] == 2.0 and math.isnan(means["c"]) and math.isnan(means["d"])
    assert utils.sum_over_ranks({"n": 3, "m": 0.5}) == {"n": 3.0, "m": 0.5}


@dataclasses.dataclass
class RunArgs:
    lr: float = 1e-3
    track: bool = False
    task_args: TaskArgs = dataclasses.field(default_factory=TaskArgs)


def test_a_run_folder_is_never_reused_and_resume_refuses_changed_flags(tmp_path, process_group):
    run_dir = lifecycle.prepare_run_dir(str(tmp_path), "r", RunArgs(), resume=False)
    saved = json.load(open(os.path.join(run_dir, "args.json")))
    assert saved["lr"] == 1e-3 and saved["task"] == "guess_number"  # nested task flags are saved flat
    with pytest.raises(SystemExit, match="exists: continue it with --resume"):
        lifecycle.prepare_run_dir(str(tmp_path), "r", RunArgs(), resume=False)
    with pytest.raises(SystemExit, match=r"--lr 0.001 -> 0.002.*--task 'guess_number' -> 'chat'"):
        lifecycle.prepare_run_dir(str(tmp_path), "r", RunArgs(lr=2e-3, task_args=TaskArgs(task="chat")), resume=True)
    lifecycle.prepare_run_dir(str(tmp_path), "r", RunArgs(track=True), resume=True)  # bookkeeping flags may change
    with open(os.path.join(run_dir, "args.json"), "w") as f:  # a run started before --lr existed
        json.dump({k: v for k, v in saved.items() if k != "lr"}, f)
    lifecycle.prepare_run_dir(str(tmp_path), "r", RunArgs(), resume=True)  # the new flag at its default: fine
    with pytest.raises(SystemExit, match=r"--lr None -> 0.002"):
        lifecycle.prepare_run_dir(str(tmp_path), "r", RunArgs(lr=2e-3), resume=True)
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump(saved, f)
    assert json.load(open(os.path.join(run_dir, "args.json"))) == saved  # the original settings are kept
    with pytest.raises(SystemExit, match="no run named 'other'"):
        lifecycle.prepare_run_dir(str(tmp_path), "other", RunArgs(), resume=True)


def test_metrics_file_never_holds_an_iteration_twice(tmp_path, process_group):
    logger = lifecycle.MetricsLogger(str(tmp_path), config={}, track=False, project="p", entity=None, run_name="r",
                                 resume=False)
    for i in range(3):
        logger.log({"x": i}, iteration=i)
    with pytest.raises(RuntimeError, match="iteration 2 logged twice"):
        logger.log({"x": 9}, iteration=2)
    logger.truncate_after(0)
    logger.log({"x": 1.5}, iteration=1)
    assert [(m["iteration"], m["x"]) for m in logger.read()] == [(0, 0), (1, 1.5)]


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path, tiny_model, process_group, capsys):
    policy = utils.shard_model(utils.load_causal_lm(tiny_model), bf16=False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    tokenizer = utils.load_tokenizer(tiny_model)
    trained = {"policy": (policy, optimizer)}
    weights = []
    for iteration in (1, 2):
        policy(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        weights.append({k: v.clone() for k, v in helpers.full_state_dict(policy).items()})
        checkpoints.save_checkpoint(str(tmp_path), iteration, trained, {"iteration": iteration}, tokenizer)
    assert checkpoints.latest_checkpoint(str(tmp_path)).endswith("iteration_000002")
    shard = next(os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "checkpoints" / "iteration_000002" / "dcp")
                 for f in fs if f.endswith(".distcp"))
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)  # a disk that filled up while the last checkpoint was written
    latest = checkpoints.latest_checkpoint(str(tmp_path))
    assert latest.endswith("iteration_000001") and "iteration_000002 is not usable" in capsys.readouterr().out
    assert checkpoints.load_checkpoint(latest, trained) == {"iteration": 1}
    for name, tensor in helpers.full_state_dict(policy).items():
        torch.testing.assert_close(tensor, weights[0][name])


def test_curves_and_the_summary_table(tmp_path):
    metrics = [{"iteration": 0, "eval/score_turn1": 0.1, "eval/score_turn2": 0.3, "reference/optimal_turn1": 0.5,
                "reference/optimal_turn2": 1.0}, {"iteration": 1, "reward/score": 0.2},
               {"iteration": 2, "eval/score_turn1": 0.2, "eval/score_turn2": 0.6}]
    lifecycle.plot_curves(metrics, str(tmp_path / "curves.png"))
    from matplotlib.image import imread

    image = (imread(tmp_path / "curves.png")[..., :3] * 255).round().astype(int)
    assert image.shape == (320, 800, 3)  # one 4 x 3.2 inch panel per turn at 100 dpi
    # each panel (its half of the image) draws the policy's curve through its two points (tab:blue: a lone marker
    # is about 50 pixels) and the reference line (tab:green)
    for panel in (image[:, :400], image[:, 400:]):
        for color in ((31, 119, 180), (44, 160, 44)):
            assert (panel == color).all(-1).sum() > 200, color
    table = lifecycle.score_table({"initial": [0.1, 0.3], "optimal": [0.5, 1.0]}).splitlines()
    assert table[0].split("|")[1:] == [" turn  1 ", " turn  2"] and table[2].endswith("0.500 |   1.000")


def test_an_optimizer_made_after_an_inference_forward_holds_the_shards(tiny_model, process_group):
    """FSDP2 leaves the root's parameters unsharded after a forward without backward; refuel.py's per-iteration
    optimizer (--schedule_scope iteration) is made after evaluations, so it must reshard first."""
    from torch.distributed.tensor import DTensor

    policy = utils.shard_model(utils.load_causal_lm(tiny_model), bf16=False)
    with torch.no_grad():
        policy(input_ids=torch.tensor([[1, 2, 3]]))
    assert not isinstance(policy.model.embed_tokens.weight, DTensor)  # the trap
    policy.reshard()
    assert all(isinstance(p, DTensor) for p in policy.parameters())


def budget_lrs(tokens_per_iteration: float, steps: int, budget: float, warmup_ratio: float) -> list[tuple]:
    """(share of the budget at the step's middle, its LR) for every step of a run stopped by the budget."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    schedule = utils.BudgetSchedule(optimizer, "cosine", warmup_ratio, int(budget))
    spent, lrs = 0.0, []
    while spent < budget:
        schedule.start_iteration(spent, spent + tokens_per_iteration, steps)
        for s in range(steps):
            lrs.append(((spent + tokens_per_iteration * (s + 0.5) / steps) / budget, optimizer.param_groups[0]["lr"]))
            schedule.step()
        spent += tokens_per_iteration
    return lrs


def test_the_budget_schedule_follows_the_share_of_the_budget_spent():
    # two methods whose iterations cost different numbers of tokens and take different numbers of steps
    slow, fast = budget_lrs(100, 4, 1000, 0.1), budget_lrs(250, 2, 1000, 0.1)
    assert len(slow) == 40 and len(fast) == 8  # each spends the whole budget, in its own number of steps
    for share, lr in slow + fast:  # the same LR at the same share: warmup, then a cosine to 0 at the budget's end
        expected = share / 0.1 if share < 0.1 else 0.5 * (1 + math.cos(math.pi * (share - 0.1) / 0.9))
        assert lr == pytest.approx(2.0 * expected)
    assert slow[0][1] == pytest.approx(2.0 * 0.0125 / 0.1) and max(lr for _, lr in slow) <= 2.0
    assert slow[-1][1] < 0.002 and fast[-1][1] < 0.1  # the last steps sit just before the end of the budget
    # without warmup the first step runs at (nearly) the peak; an overshooting last iteration runs at 0 past the end
    over = budget_lrs(300, 2, 1000, 0.0)
    assert over[0][1] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.075)))
    assert over[-1][0] > 1 and over[-1][1] == 0.0
    # a warmup over the whole budget rises to the peak at its end and stops there
    whole = budget_lrs(300, 2, 1000, 1.0)
    assert whole[0][1] == pytest.approx(2.0 * 0.075) and whole[-1][1] == 0.0


def test_the_progress_line_counts_down_the_budget_when_it_stops_the_run_first():
    import time

    started = time.time() - 30  # 3 iterations in 30 s: 10 s an iteration
    line = lifecycle.progress_line(3, 1000, started, 0, {"reward": 0.5}, {"rollout": 1.0}, budget=(300, 1000))
    # 100 tokens an iteration: 7 more iterations spend the rest of the budget, long before the 1000th
    assert line.startswith("iteration 3/1000 (budget 30%) | reward 0.5 | rollout 1.0s | eta 1m1")
    assert lifecycle.progress_line(3, 4, started, 0, {}, {}, budget=(300, 1000)).endswith("eta 0m10s")
