"""ma_ppo.py: macro actions on worked examples, macro GAE by hand and against token-level GAE at n = 1, the
clipped losses by hand, and the script end to end under torchrun (single- and multi-turn, kill and resume)."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from ma_ppo import macro_gae, macro_segments, macro_weights, per_macro, policy_loss, to_tokens, value_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lengths(segment_ids):
    return [int((segment_ids == k).sum()) for k in range(int(segment_ids.max()) + 1)]


def one_turn(prompt, response):
    return torch.tensor([-1] * prompt + [0] * response + [-1, -1])  # a prompt, a response, right padding


@pytest.mark.parametrize("response,n,expected", [(13, 5, [5, 5, 2, 1]), (11, 5, [5, 5, 1]), (4, 1, [1, 1, 1, 1]),
                                                 (1, 5, [1]), (7, 100, [6, 1])])
def test_ngram_worked_examples(response, n, expected):
    """The spec's A = 13, n = 5 case gives [5, 5, 2, 1] as the official code; at A = 11 the official code makes an
    empty segment ([5, 5, 0, 1]); here there is none."""
    assert lengths(macro_segments(one_turn(3, response), "ngram", n)) == expected


def test_segments_of_a_batch_are_per_sample():
    rows = [one_turn(3, 13), one_turn(1, 4), one_turn(6, 9)]
    alone = [macro_segments(r, "ngram", 5) for r in rows]
    assert [lengths(s) for s in alone] == [[5, 5, 2, 1], [3, 1], [5, 3, 1]]
    assert all((s[r < 0] == -1).all() for s, r in zip(alone, rows))


def test_a_macro_never_crosses_a_turn():
    # turn 0: 7 tokens, user tokens in between, turn 1: 3 tokens
    turn_ids = torch.tensor([-1, -1] + [0] * 7 + [-1] * 4 + [1] * 3)
    segments = macro_segments(turn_ids, "ngram", 5)
    assert lengths(segments) == [5, 2, 2, 1]
    assert set(segments[turn_ids == 0].tolist()).isdisjoint(segments[turn_ids == 1].tolist())


def test_randomized_perplexity_and_punctuation_rules():
    turn = one_turn(2, 30)
    generator = torch.Generator().manual_seed(0)
    randomized = lengths(macro_segments(turn, "randomized", random_lengths=(2, 3), random_repeats=2,
                                        generator=generator))
    assert sorted(randomized[:4]) == [2, 2, 3, 3] and sum(randomized) == 30 and randomized[-1] == 1
    assert randomized[4] == 30 - 10 - 1  # the list spent: one macro for the rest, then the isolated last token
    # NLL rises above the running mean at the 4th and the 7th action token
    nll = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 3.0, 1.0, 1.0, 5.0, 1.0, 0.0, 0.0])
    perplexity = macro_segments(one_turn(2, 8), "perplexity", nll=nll)
    assert lengths(perplexity) == [3, 3, 1, 1]
    texts = ["<p>", "<p>", "I", " think", ",", " so", " yes", ".", " Done", "!", "", ""]
    assert lengths(macro_segments(one_turn(2, 8), "punctuation", texts=texts)) == [3, 3, 1, 1]


def test_macro_weights():
    segments = torch.tensor([[-1, 0, 0, 0, 1, -1]])
    assert macro_weights(segments, "equal")[0].tolist() == pytest.approx([0, 1 / 3, 1 / 3, 1 / 3, 1, 0])
    assert macro_weights(segments, "unit")[0].tolist() == [0, 0, 0, 1, 1, 0]
    assert macro_weights(segments, "position")[0].tolist() == pytest.approx([0, 6 / 11, 3 / 11, 2 / 11, 1, 0])


def test_macro_gae_by_hand():
    # two macros: R = [0.5, 1.0], V = [0.2, 0.4]; gamma 0.9, lambda 0.5
    # delta_1 = 1.0 - 0.4 = 0.6; delta_0 = 0.5 + 0.9 * 0.4 - 0.2 = 0.66; A_1 = 0.6; A_0 = 0.66 + 0.45 * 0.6 = 0.93
    advantages, returns = macro_gae(torch.tensor([[0.5, 1.0, 0.0]], dtype=torch.float64),
                                    torch.tensor([[0.2, 0.4, 9.0]], dtype=torch.float64), torch.tensor([2]), 0.9, 0.5)
    assert advantages[0].tolist() == pytest.approx([0.93, 0.6, 0.0])
    assert returns[0, :2].tolist() == pytest.approx([1.13, 1.0])


def token_gae(rewards, values, gamma, lam):
    """The textbook token-level recursion, for one sequence."""
    advantages, last = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        last = rewards[t] + gamma * next_value - values[t] + gamma * lam * last
        advantages[t] = last
    return advantages


def test_one_token_macros_are_token_level_ppo_exactly():
    torch.manual_seed(0)
    turn_ids = torch.tensor([-1, -1, 0, 0, 0, 0, 0, 0, -1])
    segments = macro_segments(turn_ids, "ngram", 1)
    rewards, values = torch.randn(1, 9, dtype=torch.float64), torch.randn(1, 9, dtype=torch.float64)
    actions = (turn_ids >= 0).double()[None]
    macro_r = per_macro(rewards * actions, macro_weights(segments[None], "sum"), segments[None])
    macro_v = per_macro(values * actions, macro_weights(segments[None], "equal"), segments[None])
    advantages, _ = macro_gae(macro_r, macro_v, torch.tensor([6]), 1.0, 0.95)
    expected = token_gae(rewards[0, 2:8].tolist(), values[0, 2:8].tolist(), 1.0, 0.95)
    assert to_tokens(advantages, segments[None])[0, 2:8].tolist() == pytest.approx(expected, abs=1e-12)
    # and the losses are PPO's: with the same per-token advantages, the same numbers
    logp, old = torch.randn(1, 9), torch.randn(1, 9)
    token_advantages = torch.tensor([[0, 0] + expected + [0]], dtype=torch.float32)
    loss, _ = policy_loss(logp, old, to_tokens(advantages, segments[None]).float(), actions.float(), 0.2)
    reference, _ = policy_loss(logp, old, token_advantages, actions.float(), 0.2)
    assert loss.item() == pytest.approx(reference.item(), abs=1e-6)


def test_clipped_losses_by_hand():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # ratios e^0.5 = 1.65 (clipped to 1.2) with A = 1, e^-0.5 = 0.61 (clipped to 0.8) with A = -1
    logp, old = torch.tensor([[0.5, -0.5, 3.0]]), torch.zeros(1, 3)
    loss, clipped = policy_loss(logp, old, torch.tensor([[1.0, -1.0, 5.0]]), mask, 0.2)
    # token 0: max(-1.6487, -1.2) = -1.2; token 1: max(0.6065, 0.8) = 0.8; mean = -0.2
    assert loss.item() == pytest.approx(-0.2) and clipped.item() == 1.0
    # values 1.0 and 0.0, old 0.5 and 0.5, returns 0 and 0, clip 0.2: token 0 max(1.0, 0.49) = 1.0; token 1
    # max(0.0, 0.09) = 0.09; half the mean: 0.2725
    v_loss = value_loss(torch.tensor([[1.0, 0.0, 7.0]]), torch.tensor([[0.5, 0.5, 0.0]]), torch.zeros(1, 3), mask, 0.2)
    assert v_loss.item() == pytest.approx(0.2725)


def command(output_dir, run_name, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            os.path.join(REPO, "ma_ppo.py"), "--output_dir", output_dir, "--run_name", run_name,
            "--num_iterations", "3", "--dialogues_per_rank", "8", "--minibatch_dialogues", "4",
            "--micro_batch_dialogues", "4", "--eval_every", "2", "--save_every", "1", "--warm_start_steps", "50",
            *extra]


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_single_turn_chat_on_two_ranks(tmp_path, script_env, tiny_model, tiny_reward_model):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something about topic {i}."}) + "\n" for i in range(12)))
    subprocess.run(command(str(tmp_path), "r", "--task", "chat", "--horizon", "1", "--dataset", str(prompts),
                           "--num_eval_prompts", "4", "--model", tiny_model, "--critic_model", tiny_reward_model,
                           "--max_new_tokens", "6", "--termination", "punctuation", "--kv_cache_gib", "0.0625"),
                   check=True, timeout=900, env=script_env)
    metrics = read_metrics(tmp_path / "r")
    assert [m["iteration"] for m in metrics] == [0, 1, 2, 3]
    for m in metrics[1:]:
        assert m["sync/logprob_gap"] < 1e-3 and m["data/turns_played"] == 1 and m["macro/per_dialogue"] >= 1
    # the export is the trained actor: it loads as the policy's causal LM with every weight and nothing else (the
    # critic's value head would be an unexpected key), and its weights moved away from the initial ones
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "r" / "checkpoints" / "iteration_000003" / "hf"
    actor, loading = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(loading.values()), loading
    initial = dict(AutoModelForCausalLM.from_pretrained(tiny_model).named_parameters())
    trained = dict(actor.named_parameters())
    assert {n: p.shape for n, p in trained.items()} == {n: p.shape for n, p in initial.items()}
    assert any(not torch.equal(p, initial[n]) for n, p in trained.items())
    assert len(AutoTokenizer.from_pretrained(folder)) == len(AutoTokenizer.from_pretrained(tiny_model))


@pytest.mark.slow
def test_multi_turn_resume_after_kill_continues_the_same_schedule(tmp_path, script_env, kill_run):
    subprocess.run(command(str(tmp_path), "full"), check=True, timeout=900, env=script_env)
    run_dir = tmp_path / "killed"
    process = subprocess.Popen(command(str(tmp_path), "killed"), env=script_env)
    deadline = time.time() + 900
    while not (run_dir / "checkpoints" / "iteration_000001").is_dir():
        assert process.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.5)
    kill_run(process)
    subprocess.run(command(str(tmp_path), "killed", "--resume"), check=True, timeout=900, env=script_env)
    resumed, uninterrupted = read_metrics(run_dir), read_metrics(tmp_path / "full")
    assert [m["iteration"] for m in resumed] == [0, 1, 2, 3]
    assert uninterrupted[1]["data/turns_played"] > 1  # dialogues with the user, several turns
    for a, b in zip(resumed[2:], uninterrupted[2:]):
        for key in ("reward/score", "loss/policy", "loss/value", "policy/lr", "macro/per_dialogue"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-5, nan_ok=True), (a["iteration"], key)
