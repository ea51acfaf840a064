"""dpo_multiturn.py: the DPO loss by hand, the states each --turns mode trains, preferences on the guessing game
where the right one is known, and the script end to end under torchrun (a resume from a checkpoint included)."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import run_side_by_side

import dialogues
import utils
from dpo_multiturn import dpo_loss, preference_pairs, rebel_loss, recorded_that_fit, state, training_states, user_turns
from tasks.guess_number import GuessNumber

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dpo_loss_by_hand():
    # margin = 0.5 * ((-1 - -2) - (-3 - -2)) = 0.5 * (1 + 1) = 1; loss = -log sigmoid(1) = log(1 + e^-1)
    loss, diagnostics = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]),
                                 torch.tensor([-2.0]), beta=0.5)
    assert diagnostics["loss/dpo_margin"].item() == pytest.approx(1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))


def test_dpo_diagnostics_by_hand():
    """Per pair: the policy's log-probs, the implicit rewards beta * (ln pi - ln pi_ref), their margin, and whether
    the chosen answer's reward is the higher. Pair 1 lowers both likelihoods yet gains margin (the chosen less);
    pair 2 is a tie (pi = pi_ref), which is not counted as right; pair 3 prefers the rejected answer."""
    policy_chosen, policy_rejected = torch.tensor([-3.0, -2.0, -5.0]), torch.tensor([-6.0, -4.0, -1.0])
    ref_chosen, ref_rejected = torch.tensor([-2.0, -2.0, -4.0]), torch.tensor([-2.0, -4.0, -2.0])
    loss, diagnostics = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.5)
    expected = {"dpo/logps_chosen": [-3.0, -2.0, -5.0], "dpo/logps_rejected": [-6.0, -4.0, -1.0],
                "dpo/rewards_chosen": [-0.5, 0.0, -0.5], "dpo/rewards_rejected": [-2.0, 0.0, 0.5],
                "loss/dpo_margin": [1.5, 0.0, -1.0], "dpo/accuracy": [1.0, 0.0, 0.0]}
    assert {name: values.tolist() for name, values in diagnostics.items()} == expected
    assert loss.tolist() == pytest.approx([math.log(1 + math.exp(-m)) for m in (1.5, 0.0, -1.0)])


def test_dpo_loss_is_log_2_when_the_log_ratios_are_equal():
    policy = torch.tensor([-5.0, -1.0])
    loss, diagnostics = dpo_loss(policy[:1], policy[1:], policy[:1] - 0.3, policy[1:] - 0.3, beta=2.0)
    assert diagnostics["loss/dpo_margin"].item() == pytest.approx(0, abs=1e-6)
    assert loss.item() == pytest.approx(math.log(2))


def test_dpo_gradient_raises_the_chosen_and_lowers_the_rejected():
    chosen, rejected = torch.tensor([-2.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    loss, _ = dpo_loss(chosen, rejected, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.1)
    loss.sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()  # gradient descent raises y_w's log-prob, lowers y_l's


def test_rebel_loss_by_hand():
    new, old = torch.tensor([[-1.0, -3.0]]), torch.tensor([[-2.0, -2.0]])
    # ((1) - (-1)) - 2 * (1 - 0) = 0
    assert rebel_loss(new, old, torch.tensor([[1.0, 0.0]]), eta=2.0).item() == 0


def test_preferences_drop_ties_and_identical_answers():
    scores = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [float("nan"), 0.0], [1.0, 0.0]])
    preferred, keep = preference_pairs(scores, torch.tensor([False, False, False, False, True]))
    assert preferred[:2].tolist() == [0, 1] and keep.tolist() == [True, True, False, False, False]


def test_states_of_each_turns_mode():
    rng = np.random.default_rng(0)
    played = [3, 1, 2]
    last = training_states(rng, played, 300, "last", 3)
    assert all(h == played[d] - 1 for d, h in last)
    every = training_states(rng, played, 6000, "all", 3)
    counts = {s: every.count(s) / len(every) for s in set(every)}
    assert set(counts) == {(0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (2, 1)}  # each (dialogue, turn) once, uniformly
    assert all(abs(c - 1 / 6) < 0.02 for c in counts.values())
    sampled = training_states(rng, [3] * 10, 100_000, "sampled", 3)
    marginal = np.bincount([h for _, h in sampled]) / len(sampled)
    assert marginal == pytest.approx([11 / 18, 5 / 18, 2 / 18], abs=0.01)  # REFUEL's h for H = 3
    uniform = training_states(rng, [3, 3, 1], 100_000, "sampled", 3, "uniform")
    marginal = np.bincount([h for d, h in uniform if d < 2]) / sum(d < 2 for d, _ in uniform)
    assert marginal == pytest.approx([1 / 3] * 3, abs=0.01)  # uniform h where every turn was played
    assert all(h == 0 for d, h in uniform if d == 2)  # redrawn over the one turn a short dialogue has


def test_a_state_of_a_recorded_dialogue_counts_its_earlier_turns():
    game = GuessNumber()
    import random

    recorded = game.random_consistent_game(random.Random(3))
    s = state(recorded, 1)
    assert s.turns == 1 and s.messages[-1]["role"] == "user" and s.messages == recorded.messages[: len(s.messages)]


def scored(game, secret, guesses):
    """The guessing game's reward of a dialogue with these guesses (the user's replies as the game gives them)."""
    e = game.new_episode(secret)
    for g in guesses:
        e.messages.append({"role": "assistant", "content": str(g)})
        reply = game.reply(e)
        if reply is None:
            break
        e.messages.append({"role": "user", "content": reply})
    return game.rewards([e])[0]


def test_on_the_guessing_game_only_the_future_target_prefers_the_midpoint():
    """Secret 6 in 1..7: an opening 4 (the midpoint) and an opening 1 are both wrong now, so the immediate target
    ties them (the pair is dropped); played on by binary search, the midpoint finds 6 by turn 3 and 1 does not."""
    game = GuessNumber()
    immediate = torch.tensor([[scored(game, 6, [4]), scored(game, 6, [1])]])
    future = torch.tensor([[scored(game, 6, [4, 6]), scored(game, 6, [1, 4, 5])]])
    assert not preference_pairs(immediate, torch.tensor([False]))[1].item()
    preferred, keep = preference_pairs(future, torch.tensor([False]))
    assert keep.item() and preferred.item() == 0
    # at the last turn the immediate target knows the answer: naming the secret beats any other guess
    last = torch.tensor([[scored(game, 6, [4, 5, 7]), scored(game, 6, [4, 5, 6])]])
    assert preference_pairs(last, torch.tensor([False]))[0].item() == 1


def command(output_dir, run_name, *extra):
    # 16 evaluation games instead of the game's 1,024: an evaluation of 1,024 took most of a run's time, and what
    # these runs check (the schedule, the budget, the resume) is the same on 16
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            os.path.join(REPO, "dpo_multiturn.py"), "--output_dir", output_dir, "--run_name", run_name,
            "--num_iterations", "3", "--pairs_per_rank", "8", "--minibatch_pairs", "4", "--micro_batch_pairs", "4",
            "--num_recorded_dialogues", "16", "--eval_every", "2", "--save_every", "1", "--warm_start_steps", "50",
            "--task_arg", "num_eval=16", *extra]


DPO_DIAGNOSTICS = ("dpo/logps_chosen", "dpo/logps_rejected", "dpo/rewards_chosen", "dpo/rewards_rejected",
                   "dpo/accuracy", "loss/dpo_margin")


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


OTHER_MODES = {"rebel-mt-onpolicy-future": ["--turns", "sampled", "--contexts", "onpolicy", "--target", "future",
                                             "--loss", "rebel"],
               "dpo-mt-offline-budget": ["--turns", "all", "--contexts", "offline", "--token_budget", "100",
                                         "--schedule_over", "token_budget"]}


@pytest.fixture(scope="module")
def other_mode_runs(tmp_path_factory, script_env):
    """The runs of OTHER_MODES side by side (2 ranks each leave a core mostly idle): {mode: (exit status, stderr,
    output folder)}."""
    folders = {mode: tmp_path_factory.mktemp(mode) for mode in OTHER_MODES}
    commands = {mode: command(str(folders[mode]), "r", *flags) for mode, flags in OTHER_MODES.items()}
    finished = run_side_by_side(commands, script_env, tmp_path_factory.mktemp("mode_logs"))
    return {mode: (returncode, stderr, folders[mode]) for mode, (returncode, _, stderr) in finished.items()}


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(OTHER_MODES))
def test_two_ranks_in_other_modes(other_mode_runs, mode):
    returncode, stderr, tmp_path = other_mode_runs[mode]
    assert returncode == 0, stderr[-5000:]
    flags = OTHER_MODES[mode]
    metrics = read_metrics(tmp_path / "r")
    for m in metrics[1:]:
        assert m["sync/logprob_gap"] < 1e-3 and m["budget/generated_tokens"] > 0
    if "--token_budget" in flags:  # stops after the iteration that spent the budget, evaluated and saved
        # 8 states x 2 ranks x 2 answers of a few tokens: about 64 tokens an iteration
        assert metrics[-1]["budget/generated_tokens"] >= 100 and metrics[-1]["iteration"] < 3
        assert all(m["budget/generated_tokens"] < 100 for m in metrics[1:-1]) and "eval/score_turn3" in metrics[-1]
        # the schedule spans the budget: after an iteration's 2 steps the LR is the cosine (warmup 0.1) at the share
        # spent by the middle of a third step's slice of its tokens, 0 past the budget's end
        spent = [0.0] + [m["budget/generated_tokens"] for m in metrics[1:]]
        for m, before, after in zip(metrics[1:], spent, spent[1:]):
            share = (before + (after - before) * 2.5 / 2) / 100
            assert m["policy/lr"] == pytest.approx(5e-4 * 0.5 * (1 + math.cos(math.pi * min(1, (share - 0.1) / 0.9))))
        # the guessing game's recorded games all fit
        assert metrics[0]["data/recorded_dialogues"] == 4096 and metrics[0]["skipped/too_long_recorded"] == 0
        # this short warm start solves no game, so every pair ties: the DPO diagnostics are logged, over no pair
        # (their values: test_offline_contexts_on_chat_are_the_datasets_recorded_dialogues)
        for m in metrics[1:]:
            assert m["data/pairs_kept"] == 0 and all(math.isnan(m[name]) for name in DPO_DIAGNOSTICS)
    else:
        assert [m["iteration"] for m in metrics] == [0, 1, 2, 3] and math.isfinite(metrics[3]["loss/rebel"])
        assert not any(name in m for m in metrics for name in DPO_DIAGNOSTICS)


@pytest.mark.slow
def test_resume_continues_the_same_schedule(tmp_path, script_env):
    """DPO-LT on pi_0's dialogues (the defaults): the recorded dialogues travel in the checkpoint. The run, then the
    same run resumed from its first checkpoint, the later ones deleted (a kill mid-run is checked on refuel.py and
    rebel.py, whose checkpoints are written by the same code)."""
    subprocess.run(command(str(tmp_path), "r"), check=True, timeout=900, env=script_env)
    run_dir = tmp_path / "r"
    uninterrupted = read_metrics(run_dir)
    for later in ("iteration_000002", "iteration_000003"):
        shutil.rmtree(run_dir / "checkpoints" / later)
    subprocess.run(command(str(tmp_path), "r", "--resume"), check=True, timeout=900, env=script_env)
    resumed = read_metrics(run_dir)
    assert [m["iteration"] for m in resumed] == [0, 1, 2, 3]
    for a, b in zip(resumed[2:], uninterrupted[2:]):
        for key in ("reward/score", "loss/dpo", "policy/lr", "data/branch_turn", "budget/generated_tokens"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-5, nan_ok=True), (a["iteration"], key)
    assert (run_dir / "checkpoints" / "iteration_000003" / "manifest.json").exists()


def test_preference_datasets_in_the_usual_formats(tmp_path, smollm2_path):
    """HH-RLHF rows (transcripts) and UltraFeedback rows (message lists) give the same pairs; a row whose two
    dialogues differ before their answers is skipped and counted, one with nothing usable names its row."""
    from dpo_multiturn import preference_tokens

    hh = [{"chosen": "\n\nHuman: Is 2 even?\n\nAssistant: Yes.", "rejected": "\n\nHuman: Is 2 even?\n\nAssistant: No."},
          {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"}]
    question = [{"role": "user", "content": "Is 2 even?"}]
    uf = [{"prompt": "Is 2 even?", "chosen": question + [{"role": "assistant", "content": "Yes."}],
           "rejected": question + [{"role": "assistant", "content": "No."}], "score_chosen": 9.0}]
    for name, rows in (("hh.jsonl", hh), ("uf.jsonl", uf)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    hh_pairs, hh_skipped = dialogues.load_preferences(str(tmp_path / "hh.jsonl"))
    uf_pairs, uf_skipped = dialogues.load_preferences(str(tmp_path / "uf.jsonl"))
    assert hh_pairs == uf_pairs and hh_skipped == {"different contexts": 1} and uf_skipped == {}
    tokenizer = utils.load_tokenizer(smollm2_path)
    prompt, chosen, rejected = preference_tokens(tokenizer, *hh_pairs[0])
    assert prompt == utils.chat_token_ids(tokenizer, question, add_generation_prompt=True)
    assert tokenizer.decode(chosen) == "Yes.<|im_end|>" and tokenizer.decode(rejected) == "No.<|im_end|>"
    (tmp_path / "bad.jsonl").write_text(json.dumps({"chosen": "\n\nHuman: only a question", "rejected": "x"}) + "\n")
    with pytest.raises(ValueError, match="row 0: no final answer"):
        dialogues.load_preferences(str(tmp_path / "bad.jsonl"))


def test_recorded_dialogues_are_cut_to_the_states_that_fit(smollm2_path):
    """A recorded dialogue keeps its states s_h with h < H whose tokens fit the room a played dialogue has at turn h
    (here 40 + 20 h; SmolLM2's template: 35 tokens for the opening, 52 with one short answer and a question): one is
    cut at the horizon, one before its long recorded answer, and one whose opening is too long is left out, counted."""
    tokenizer = utils.load_tokenizer(smollm2_path)

    def recorded(*texts):
        return dialogues.Episode([{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(texts)],
                                 {"user_turns": ["And 3?"]})

    short = recorded("Is 2 even?", "Yes.", "And 3?", "No.", "And 4?")
    long_answer = recorded("Is 2 even?", "Yes. " * 50, "And 3?")
    long_opening = recorded("Is 2 even? " * 10, "Yes.", "And 3?")
    kept, too_long = recorded_that_fit([short, long_answer, long_opening], tokenizer, horizon=2, max_prompt_tokens=40,
                                       turn_tokens=20)
    assert too_long == 1 and [user_turns(e) for e in kept] == [2, 1]
    assert kept[0].messages == short.messages[:3] and kept[1].messages == long_answer.messages[:1]
    # the last state of the first is the recorded dialogue through its second question, its recorded answer kept
    last = state(kept[0], 1)
    assert last.turns == 1 and last.messages == short.messages[:3] and last.info == short.info


@pytest.mark.slow
def test_offline_contexts_on_chat_are_the_datasets_recorded_dialogues(tmp_path, script_env, tiny_model):
    """DPO-LT on UltraInteract_pair rows (--contexts offline, the dataset user): the states are the last user turns
    of the rows' recorded trajectories, after the dataset's own answer, so no dialogue is played to reach them. One
    optimizer step an iteration: the first one's forward is at pi = pi_ref, so its implicit rewards are 0 while the
    log-probs are not; the second's are not 0, and agree with the margin and the loss."""
    from test_presets import ultrainteract_pair_rows

    dataset = tmp_path / "ultrainteract.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in ultrainteract_pair_rows(8)))
    subprocess.run([sys.executable, os.path.join(REPO, "dpo_multiturn.py"), "--task", "chat", "--dataset",
                    str(dataset), "--prompt_column", "trajectory", "--user", "dataset", "--contexts", "offline",
                    "--model", tiny_model, "--num_eval_prompts", "2", "--horizon", "2", "--max_new_tokens", "4",
                    "--kv_cache_gib", "0.0625", "--max_prompt_tokens", "256", "--num_iterations", "2",
                    "--pairs_per_rank", "8", "--minibatch_pairs", "8", "--micro_batch_pairs", "4",
                    "--output_dir", str(tmp_path), "--run_name", "r"], check=True, timeout=600, env=script_env)
    initial, first, second = read_metrics(tmp_path / "r")
    # training rows 2-7: the odd ones hold a recorded answer, the even ones are a question only
    assert initial["data/recorded_dialogues"] == 3 and initial["skipped/too_long_recorded"] == 0
    # every state is turn 2, which the policy never reached: its dialogue so far is the dataset's; the only tokens
    # generated are the pairs' answers (8 states x 2 answers of at most 4 tokens), no user turn and no context
    assert first["data/branch_turn"] == 2
    assert 0 < first["budget/policy_tokens"] <= 8 * 2 * 4 and first["budget/user_tokens"] == 0
    assert first["data/pairs_kept"] > 0 and 0 <= first["dpo/accuracy"] <= 1
    assert first["dpo/logps_chosen"] < 0 and first["dpo/logps_rejected"] < 0
    assert first["dpo/rewards_chosen"] == pytest.approx(0, abs=1e-6)
    assert first["dpo/rewards_rejected"] == pytest.approx(0, abs=1e-6)
    assert second["data/branch_turn"] == 2 and second["data/pairs_kept"] > 0 and 0 <= second["dpo/accuracy"] <= 1
    assert second["dpo/rewards_chosen"] != 0 and second["dpo/rewards_rejected"] != 0
    # the margin is the difference of the implicit rewards (both averaged over the same pairs), and the mean loss is
    # at least the loss of the mean margin (-logsigmoid is convex)
    assert second["dpo/rewards_chosen"] - second["dpo/rewards_rejected"] == pytest.approx(second["loss/dpo_margin"],
                                                                                          abs=1e-7)
    assert second["loss/dpo"] >= math.log1p(math.exp(-second["loss/dpo_margin"])) - 1e-7


@pytest.mark.slow
def test_offline_contexts_without_recorded_dialogues_are_a_clear_error(tmp_path, script_env):
    """The embedded prompts are questions only: the chat task records no dialogue, and the run says so at once."""
    done = subprocess.run([sys.executable, os.path.join(REPO, "dpo_multiturn.py"), "--task", "chat", "--user",
                           "dataset", "--contexts", "offline", "--output_dir", str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env=script_env)
    assert done.returncode != 0 and "task 'chat' has no recorded dialogues" in done.stderr


@pytest.mark.slow
def test_a_budget_the_recording_spends_is_a_clear_error(tmp_path, script_env):
    """A budget that pi_0's recorded dialogues use up would leave every step at learning rate 0: the run refuses."""
    done = subprocess.run([sys.executable, os.path.join(REPO, "dpo_multiturn.py"), "--output_dir", str(tmp_path),
                           "--warm_start_steps", "50", "--num_recorded_dialogues", "16", "--token_budget", "20",
                           "--schedule_over", "token_budget", "--task_arg", "num_eval=16"],
                          capture_output=True, text=True, timeout=300, env=script_env)
    refusal = "tokens generated before the first iteration spent all of --token_budget 20: no step would train"
    assert done.returncode != 0 and refusal in done.stderr
