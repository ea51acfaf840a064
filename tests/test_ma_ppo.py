"""ma_ppo.py: macro actions on worked examples, macro GAE by hand and against token-level GAE at n = 1, the
clipped losses by hand, the defaults against the official code's computations on the same tensors (macro rewards
and values, the randomized rule, per-sample loss averaging), the critic started from the reward model, and the
script end to end under torchrun (single turn with the critic's warmup, multi-turn with a resume, the
official TL;DR preset at toy scale)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import dialogues
import ma_ppo
from ma_ppo import (
    Args,
    macro_advantages,
    macro_gae,
    macro_segments,
    macro_weights,
    per_macro,
    policy_loss,
    to_tokens,
    token_weights,
    value_loss,
)

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


def test_dialogue_rows_keep_only_turns_whose_sampled_tokens_are_in_the_row():
    """A turn's tokens in the row come from its text tokenized again; a turn sampled as another split of that text
    is no action, and is counted."""
    # turn 0 sampled [5, 6]; the next prompt holds it as [5, 6] (kept) or as the merged token [56] (left out)
    kept = dialogues.Episode([], prompts=[[1, 2], [1, 2, 5, 6, 9, 3]], responses=[[5, 6], [7, 8]])
    merged = dialogues.Episode([], prompts=[[1, 2], [1, 2, 56, 9, 3]], responses=[[5, 6], [7, 8]])
    input_ids, attention, action_mask, turn_ids, left_out = ma_ppo.dialogue_tensors([kept, merged], pad_id=0)
    assert input_ids.tolist() == [[1, 2, 5, 6, 9, 3, 7, 8], [1, 2, 56, 9, 3, 7, 8, 0]]
    assert turn_ids.tolist() == [[-1, -1, 0, 0, -1, -1, 1, 1], [-1, -1, -1, -1, -1, 1, 1, -1]]
    assert action_mask.tolist() == (turn_ids >= 0).long().tolist() and attention[1].tolist() == [1] * 7 + [0]
    assert left_out == 1


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


def test_a_new_termination_rule_is_a_function_and_a_table_line(monkeypatch):
    """A fork's rule (here: macros of 2 tokens, then of 3, alternating) plugs in by name, and --termination
    accepts it; an unknown name is refused before anything loads."""
    monkeypatch.setitem(ma_ppo.TERMINATION_RULES, "two_three", lambda macro: macro.length == (2, 3)[macro.ngram % 2])
    assert lengths(macro_segments(one_turn(2, 9), "two_three", ngram=1, isolate_last_token=False)) == [3, 3, 3]
    assert lengths(macro_segments(one_turn(2, 9), "two_three", ngram=2, isolate_last_token=False)) == [2, 2, 2, 2, 1]
    ma_ppo.check_args(ma_ppo.Args(termination="two_three"))
    with pytest.raises(SystemExit, match="--termination 'sentence': choose one of ngram, randomized"):
        ma_ppo.check_args(ma_ppo.Args(termination="sentence"))


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
    mean = token_weights(actions.float(), actions.float(), "sample")
    loss, _ = policy_loss(logp, old, to_tokens(advantages, segments[None]).float(), actions.float(), 0.2)
    reference, _ = policy_loss(logp, old, token_advantages, actions.float(), 0.2)
    assert (mean * loss).sum().item() == pytest.approx((mean * reference).sum().item(), abs=1e-6)


def test_clipped_losses_by_hand():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # ratios e^0.5 = 1.65 (clipped to 1.2) with A = 1, e^-0.5 = 0.61 (clipped to 0.8) with A = -1
    logp, old = torch.tensor([[0.5, -0.5, 3.0]]), torch.zeros(1, 3)
    loss, clipped = policy_loss(logp, old, torch.tensor([[1.0, -1.0, 5.0]]), mask, 0.2)
    # token 0: max(-1.6487, -1.2) = -1.2; token 1: max(0.6065, 0.8) = 0.8; both clipped; token 2 is no action
    assert loss[0, :2].tolist() == pytest.approx([-1.2, 0.8]) and (clipped * mask).tolist() == [[1.0, 1.0, 0.0]]
    mean = token_weights(mask, mask, "sample")
    assert mean.tolist() == [[0.5, 0.5, 0.0]] and (mean * loss).sum().item() == pytest.approx(-0.2)
    # values 1.0 and 0.0, old 0.5 and 0.5, returns 0 and 0, clip 0.2: token 0 max(1.0, 0.49) = 1.0; token 1
    # max(0.0, 0.09) = 0.09; halved: 0.5 and 0.045, whose mean is 0.2725
    v_loss = value_loss(torch.tensor([[1.0, 0.0, 7.0]]), torch.tensor([[0.5, 0.5, 0.0]]), torch.zeros(1, 3), 0.2)
    assert v_loss[0, :2].tolist() == pytest.approx([0.5, 0.045])
    assert (mean * v_loss).sum().item() == pytest.approx(0.2725)


# The official code (ernie-research/MA-RLHF, applications/DeepSpeed-Chat/dschat/rlhf/ppo_trainer.py), written out
# for one sample as it runs (per-device batch 1): a sequence of P prompt and A response tokens, no padding, action
# index i predicting token i + 1, so response token k is action start + k with start = P - 1, and the boundaries
# `ma_lengths` are action indices ending with T - 2, the last token, which `split_list` makes a macro of its own.


def official_fixed_ngram_selection(start, mask, ngram):
    current_count, ma_length = 0, [start]
    for i in range(mask[:, start:].size(1) - 1):
        current_count += mask[0, start + i].item()
        if current_count == ngram:
            ma_length.append(start + i + 1)
            current_count = 0
    ma_length.append(mask.size(1) - 1)
    return ma_length


def official_randomized_ngram_selection(start, mask, shuffled):
    """As the official function after its `random.shuffle` of repeat_interleave([1, 2, 3, 5, 10], R): `shuffled`
    is that list in the order drawn."""
    current_count, idx, ma_length = 0, 0, [start]
    for i in range(mask[:, start:].size(1) - 1):
        current_count += mask[0, start + i].item()
        if current_count == shuffled[idx]:
            ma_length.append(start + i + 1)
            current_count = 0
            idx += 1
            if idx == len(shuffled):
                break
    ma_length.append(mask.size(1) - 1)
    return ma_length


def official_modeling_macro_action(variables, mask, start, ma_lengths, value_function):
    split_list = torch.diff(torch.tensor(ma_lengths)).tolist() + [1]
    ma_variables = torch.zeros(variables.size(0), len(split_list)).to(variables)
    for idx, (var_i, mask_i) in enumerate(zip(torch.split(variables[:, start:], split_list, dim=-1),
                                              torch.split(mask[:, start:], split_list, dim=-1))):
        masked_vars = var_i[mask_i != 0]
        if value_function == "equal":
            sigma = torch.ones_like(masked_vars) / masked_vars.numel()
        else:  # position ('unit' crashes in the official code)
            sigma = 1.0 / (torch.arange(masked_vars.numel()) + 1)
            sigma = sigma / torch.sum(sigma)
        ma_variables[:, idx] = torch.sum(masked_vars * sigma.to(masked_vars)) if masked_vars.numel() > 0 else 0.0
    return ma_variables


def official_compute_rewards(start, log_probs, ref_log_probs, reward_score, action_mask, kl_ctl=0.05, clip=2.5):
    rewards = -kl_ctl * (log_probs - ref_log_probs)
    ends = start + action_mask[:, start:].sum(1) + 1
    for j in range(log_probs.shape[0]):
        rewards[j, start : ends[j]][-1] += torch.clamp(reward_score[j], -clip, clip)
    return rewards


def official_get_advantages_and_returns(values, rewards, gamma, lam):
    lastgaelam, advantages_reversed, length = 0, [], rewards.size()[-1]
    for t in reversed(range(length)):
        nextvalues = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def official_actor_loss_fn(logprobs, old_logprobs, advantages, mask, ma_lengths, cliprange=0.2):
    ratio = torch.exp((logprobs - old_logprobs) * mask)
    split_list = torch.diff(torch.tensor(ma_lengths)).tolist() + [1]
    pg_loss, total_mask_sum = 0.0, 0.0
    for i, (ratio_i, mask_i) in enumerate(zip(torch.split(ratio, split_list, dim=-1),
                                              torch.split(mask, split_list, dim=-1))):
        pg_loss1 = -advantages[:, i] * ratio_i
        pg_loss2 = -advantages[:, i] * torch.clamp(ratio_i, 1.0 - cliprange, 1.0 + cliprange)
        pg_loss += torch.sum(torch.max(pg_loss1, pg_loss2) * mask_i)
        total_mask_sum += mask_i.sum()
    return pg_loss / total_mask_sum


def official_critic_loss_fn(values, old_values, returns, mask, ma_lengths, cliprange_value=0.2):
    values_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    split_list = torch.diff(torch.tensor(ma_lengths)).tolist() + [1]
    total_vf_loss, total_mask_sum = 0.0, 0.0
    for i, (v, v_clipped, m) in enumerate(zip(torch.split(values, split_list, dim=-1),
                                              torch.split(values_clipped, split_list, dim=-1),
                                              torch.split(mask, split_list, dim=-1))):
        total_vf_loss += 0.5 * torch.sum(torch.max((v - returns[:, i]) ** 2, (v_clipped - returns[:, i]) ** 2) * m)
        total_mask_sum += m.sum()
    return total_vf_loss / total_mask_sum


def samples(prompt_lengths, response_lengths, seed=0):
    """Random per-response-token log-probs, reference log-probs, values, scores for a few samples, laid out both
    ways: official (one [1, T - 1] action-indexed tensor per sample) and here (one right-padded batch, token columns,
    V(s_t) at the token's own column)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(p + a for p, a in zip(prompt_lengths, response_lengths)) + 2
    ours = {k: torch.zeros(len(prompt_lengths), width, dtype=torch.float64) for k in ("lp", "ref", "values", "new")}
    turn_ids = torch.full((len(prompt_lengths), width), -1)
    official = []
    for i, (p, a) in enumerate(zip(prompt_lengths, response_lengths)):
        drawn = {k: torch.randn(a, generator=generator, dtype=torch.float64) for k in ours}
        drawn["lp"], drawn["ref"], drawn["new"] = -drawn["lp"].abs(), -drawn["ref"].abs(), -drawn["new"].abs()
        one = {k: torch.zeros(1, p + a - 1, dtype=torch.float64) for k in ours}
        for k in ours:
            ours[k][i, p : p + a] = drawn[k]
            one[k][0, p - 1 :] = drawn[k]
        turn_ids[i, p : p + a] = 0
        official.append({**one, "start": p - 1, "mask": torch.ones(1, p + a - 1, dtype=torch.long)})
    scores = torch.randn(len(prompt_lengths), generator=generator, dtype=torch.float64) * 2
    return ours, turn_ids, official, scores


@pytest.mark.parametrize("value_weights", ["equal", "position"])
def test_macro_rewards_and_values_are_the_official_ones(value_weights):
    """The default macro reward is the official one (`modeling_macro_action` on the rewards too: the mean with
    equal sigma, position-weighted with position sigma, the KL rewards included), and so are the advantages and
    returns, sample by sample in a batch of several lengths."""
    args = Args(value_weights=value_weights)
    assert Args().reward_aggregation == "mean" and Args().value_weights == "equal"
    prompts, responses = [4, 2, 6], [13, 9, 22]  # (A - 1) % 5 != 0: the official rule makes no empty segment
    ours, turn_ids, official, scores = samples(prompts, responses)
    mask = (turn_ids >= 0).double()
    token_rewards = -args.kl_coef * (ours["lp"] - ours["ref"]) * mask
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
    token_rewards[torch.arange(3), last] += scores.clamp(-args.reward_clip, args.reward_clip)
    segment_ids = torch.stack([macro_segments(t, "ngram", args.ngram) for t in turn_ids])
    advantages, returns, _ = macro_advantages(token_rewards, ours["values"] * mask, segment_ids,
                                              value_weights=args.value_weights,
                                              reward_aggregation=args.reward_aggregation, gamma=args.gamma,
                                              lam=args.lam)
    for i, o in enumerate(official):
        start = o["start"]
        ma_lengths = official_fixed_ngram_selection(start, o["mask"], args.ngram)
        rewards = official_compute_rewards(start, o["lp"], o["ref"], scores[i : i + 1], o["mask"])
        macro_v = official_modeling_macro_action(o["values"], o["mask"], start, ma_lengths, value_weights)
        macro_r = official_modeling_macro_action(rewards, o["mask"], start, ma_lengths, value_weights)
        expected_a, expected_g = official_get_advantages_and_returns(macro_v, macro_r, 1.0, 0.95)
        split = torch.diff(torch.tensor(ma_lengths)).tolist() + [1]
        columns = slice(prompts[i], prompts[i] + responses[i])
        # (the official position sigma is float32)
        assert advantages[i, columns].tolist() == pytest.approx(expected_a[0].repeat_interleave(
            torch.tensor(split)).tolist(), abs=1e-6)
        assert returns[i, columns].tolist() == pytest.approx(expected_g[0].repeat_interleave(
            torch.tensor(split)).tolist(), abs=1e-6)
    # the paper's sum is another number: the KL rewards inside a macro are not averaged
    summed, _, _ = macro_advantages(token_rewards, ours["values"] * mask, segment_ids, value_weights=value_weights,
                                    reward_aggregation="sum", gamma=1.0, lam=0.95)
    assert not torch.allclose(summed, advantages)


def test_the_randomized_rule_is_the_official_one_with_its_lengths():
    """Default lengths 1, 2, 3, 5, 10 (official), each used `random_repeats` times in a shuffled order; with the
    order drawn here given to the official function, the same macros."""
    args = Args()
    assert args.random_lengths == (1, 2, 3, 5, 10) and args.random_repeats == 3
    for response in (80, 40):  # the list (63 tokens) spent, then one macro for the rest; and not spent
        turn = one_turn(3, response)
        ours = lengths(macro_segments(turn, "randomized", random_lengths=args.random_lengths,
                                      random_repeats=args.random_repeats, generator=torch.Generator().manual_seed(7)))
        listed = [n for n in args.random_lengths for _ in range(args.random_repeats)]
        assert listed == torch.repeat_interleave(torch.tensor([1, 2, 3, 5, 10]), 3).tolist()
        shuffled = [listed[i] for i in torch.randperm(len(listed), generator=torch.Generator().manual_seed(7))]
        mask = torch.ones(1, 3 + response - 1)
        ma_lengths = official_randomized_ngram_selection(2, mask, shuffled)
        official = [n for n in torch.diff(torch.tensor(ma_lengths)).tolist() + [1] if n > 0]  # (no empty segment)
        assert ours == official


def test_losses_average_each_sample_as_the_official_run():
    """Default `sample`: the official run (one sample per device, gradients accumulated and averaged) gives each
    sample's token mean equal weight; here a minibatch of 4 samples of different lengths in micro-batches of 3 and
    1 gives the same loss, for the actor and the critic."""
    assert Args().loss_averaging == "sample"
    prompts, responses = [4, 2, 6, 3], [13, 4, 22, 8]
    ours, turn_ids, official, _ = samples(prompts, responses, seed=1)
    mask = (turn_ids >= 0).double()
    segment_ids = torch.stack([macro_segments(t, "ngram", 5) for t in turn_ids])
    macro_a = torch.randn(4, int(segment_ids.max()) + 1, generator=torch.Generator().manual_seed(2),
                          dtype=torch.float64)
    token_a = to_tokens(macro_a, segment_ids)
    actor, critic = {}, {}
    for averaging in ("sample", "token"):
        actor[averaging] = critic[averaging] = 0.0
        for rows in ([0, 1, 2], [3]):
            weight = token_weights(mask[rows], mask, averaging)  # as the loop: each token's weight in the minibatch
            loss, _ = policy_loss(ours["new"][rows], ours["lp"][rows], token_a[rows], mask[rows], 0.2)
            actor[averaging] += (weight * loss).sum()
            critic[averaging] += (weight * value_loss(ours["new"][rows], ours["values"][rows], token_a[rows],
                                                      0.2)).sum()
    expected_actor = expected_critic = 0.0
    for i, o in enumerate(official):
        start, columns = o["start"], slice(prompts[i], prompts[i] + responses[i])
        ma_lengths = official_fixed_ngram_selection(start, o["mask"], 5)
        k = len(ma_lengths)
        # per device and micro-step: a loss of its own, divided by the 4 steps accumulated
        expected_actor += official_actor_loss_fn(o["new"][:, start:], o["lp"][:, start:], macro_a[i : i + 1, :k],
                                                 o["mask"][:, start:], ma_lengths) / 4
        expected_critic += official_critic_loss_fn(o["new"][:, start:], o["values"][:, start:],
                                                   macro_a[i : i + 1, :k], o["mask"][:, start:], ma_lengths) / 4
        assert token_a[i, columns].tolist() == macro_a[i, :k].repeat_interleave(
            torch.tensor(torch.diff(torch.tensor(ma_lengths)).tolist() + [1])).tolist()
    assert actor["sample"].item() == pytest.approx(expected_actor.item(), abs=1e-12)
    assert critic["sample"].item() == pytest.approx(expected_critic.item(), abs=1e-12)
    # one token mean over the minibatch weighs the long samples more: another number
    assert actor["token"].item() != pytest.approx(expected_actor.item(), abs=1e-3)


def test_the_critic_from_the_reward_model_starts_at_its_scores(process_group, tiny_model, tiny_reward_model):
    """The critic's value head is the reward model's score head: at a dialogue's last token its value is the score
    the reward model gives the dialogue (the task's own scorer, on the same token ids). The critic loads sharded (a
    one-rank group here)."""
    import utils

    dialogs = [[{"role": "user", "content": "Say something."}, {"role": "assistant", "content": "Something."}],
               [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two, three!"}]]
    scores = dialogues.RewardModel(tiny_reward_model, torch.device("cpu"), torch.float32, 4096)(dialogs)
    critic = ma_ppo.load_critic(tiny_reward_model, from_reward_model=True).eval()
    tokenizer = utils.load_tokenizer(tiny_reward_model)
    with torch.no_grad():
        values = [critic(input_ids=torch.tensor([utils.chat_token_ids(tokenizer, d)])).logits[0, -1, 0].item()
                  for d in dialogs]
    assert values == pytest.approx(scores, abs=1e-5) and abs(scores[0] - scores[1]) > 1e-4
    assert critic.score.bias is None
    # from the policy, a fresh head at zero: every first value is 0 (the trunk is the policy's, so its hidden
    # states are not); a causal LM has no score head to start a critic "from a reward model"
    fresh = ma_ppo.load_critic(tiny_model, from_reward_model=False).eval()
    assert fresh.score.weight.shape == (1, 64)
    ids = torch.tensor([utils.chat_token_ids(utils.load_tokenizer(tiny_model), dialogs[1])])
    with torch.no_grad():
        assert torch.equal(ma_ppo.token_values(fresh, ids, torch.ones_like(ids)), torch.zeros(ids.shape))
        assert fresh.model(input_ids=ids).last_hidden_state.abs().sum() > 0
    with pytest.raises(SystemExit, match="has no weights for \\['score.weight'\\]"):
        ma_ppo.load_critic(tiny_model, from_reward_model=True)


def test_critic_init_default_and_refusals():
    import tyro

    def args(*flags):
        return tyro.cli(Args, args=list(flags))

    assert ma_ppo.critic_initialisation(args("--task", "chat", "--reward_model", "rm")) == "reward_model"
    assert ma_ppo.critic_initialisation(args("--task", "chat")) == "policy"
    assert ma_ppo.critic_initialisation(args("--reward_model", "rm", "--critic_init", "policy")) == "policy"
    with pytest.raises(SystemExit, match="--critic_init reward_model needs the task's --reward_model"):
        ma_ppo.check_args(args("--critic_init", "reward_model"))
    # 2 iterations of 8 dialogues in minibatches of 4, 2 epochs: 8 optimizer steps
    steps = ["--num_iterations", "2", "--dialogues_per_rank", "8", "--minibatch_dialogues", "4", "--num_epochs", "2"]
    ma_ppo.check_args(args(*steps, "--critic_warmup_steps", "7"))
    for bad in ("8", "-1"):
        with pytest.raises(SystemExit, match="--critic_warmup_steps must be >= 0 and below the run's optimizer"):
            ma_ppo.check_args(args(*steps, "--critic_warmup_steps", bad))


def command(output_dir, run_name, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            os.path.join(REPO, "ma_ppo.py"), "--output_dir", output_dir, "--run_name", run_name,
            "--num_iterations", "3", "--dialogues_per_rank", "8", "--minibatch_dialogues", "4",
            "--micro_batch_dialogues", "4", "--eval_every", "2", "--save_every", "1", "--warm_start_steps", "50",
            *extra]


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def saved_critic(checkpoint, tmp_path):
    """The critic's weights in a checkpoint's `dcp/` folder, read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint / "dcp", tmp_path / "state.pt")
    return torch.load(tmp_path / "state.pt", weights_only=False)["model/critic"]


@pytest.mark.slow
def test_single_turn_chat_on_two_ranks_with_the_critic_warmed_up(tmp_path, script_env, tiny_model, tiny_reward_model):
    """The critic starts from the reward model (the default with one); for the first 2 optimizer steps (iteration
    1: 8 dialogues a rank in minibatches of 4) it trains alone: the actor's weights are the initial ones after
    them, the critic's are not the reward model's, and the actor trains from iteration 2 on."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something about topic {i}."}) + "\n" for i in range(12)))
    subprocess.run(command(str(tmp_path), "r", "--task", "chat", "--horizon", "1", "--dataset", str(prompts),
                           "--num_eval_prompts", "4", "--model", tiny_model, "--reward_model", tiny_reward_model,
                           "--critic_warmup_steps", "2", "--max_new_tokens", "6", "--termination", "punctuation",
                           "--kv_cache_gib", "0.0625"),
                   check=True, timeout=900, env=script_env)
    metrics = read_metrics(tmp_path / "r")
    assert [m["iteration"] for m in metrics] == [0, 1, 2, 3]
    for m in metrics[1:]:
        assert m["sync/logprob_gap"] < 1e-3 and m["data/turns_played"] == 1 and m["macro/per_dialogue"] >= 1
    assert metrics[1]["policy/lr"] == 0.0 and metrics[1]["policy/actor_grad_norm"] == 0.0
    assert metrics[1]["policy/critic_grad_norm"] > 0 and metrics[2]["policy/lr"] > 0
    # the export is the trained actor: it loads as the policy's causal LM with every weight and nothing else (the
    # critic's value head would be an unexpected key), and its weights moved away from the initial ones
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    checkpoints = tmp_path / "r" / "checkpoints"
    initial = dict(AutoModelForCausalLM.from_pretrained(tiny_model).named_parameters())
    warmed_up = dict(AutoModelForCausalLM.from_pretrained(checkpoints / "iteration_000001" / "hf").named_parameters())
    assert all(torch.equal(p, initial[n]) for n, p in warmed_up.items())
    reward_model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model).state_dict()
    critic = saved_critic(checkpoints / "iteration_000001", tmp_path)
    assert critic.keys() == reward_model.keys()
    assert not torch.equal(critic["score.weight"], reward_model["score.weight"])
    assert any(not torch.equal(w, reward_model[n]) for n, w in critic.items() if n.startswith("model.layers"))
    actor, loading = AutoModelForCausalLM.from_pretrained(checkpoints / "iteration_000003" / "hf",
                                                          output_loading_info=True)
    assert not any(loading.values()), loading
    trained = dict(actor.named_parameters())
    assert {n: p.shape for n, p in trained.items()} == {n: p.shape for n, p in initial.items()}
    assert any(not torch.equal(p, initial[n]) for n, p in trained.items())
    assert len(AutoTokenizer.from_pretrained(checkpoints / "iteration_000003" / "hf")) == len(
        AutoTokenizer.from_pretrained(tiny_model))


# step 3 of the official run_gemma.sh (TL;DR, Gemma-2B) as this script's flags: 8 GPUs x 1 sample x 32 accumulation
# steps = 256 samples an optimizer step, one PPO epoch, equal sigma (`--value_function equal`), and what the official
# code fixes (clip_reward_value 2.5, cliprange 0.2, cliprange_value 0.2, the critic from the reward model, Adam
# betas and gradient clipping from ds_utils, `modeling_macro_action` on the rewards, per-sample losses)
RUN_GEMMA = dict(lr=1.5e-5, critic_lr=1.5e-5, weight_decay=0.1, lr_schedule="linear", warmup_ratio=0.05,
                 num_epochs=1, max_new_tokens=512, max_prompt_tokens=512, kl_coef=0.05, temperature=0.8, gamma=1.0,
                 lam=0.95, termination="ngram", ngram=5, value_weights="equal", seed=1234, reward_clip=2.5,
                 clip_eps=0.2, value_clip=0.2, critic_init="reward_model", adam_betas=(0.9, 0.95), max_grad_norm=1.0,
                 reward_aggregation="mean", loss_averaging="sample", horizon=1)


@pytest.mark.slow
def test_the_official_tldr_preset_at_toy_scale(tmp_path, script_env, tiny_model, tiny_reward_model):
    """`--preset ma-ppo-tldr` holds run_gemma.sh's values; it runs with tiny local models in place of Gemma-2B-it and
    its reward model, on a few rows in trl-lib/tldr's format (`prompt`: the post with its subreddit and title,
    `completion`: its TL;DR)."""
    preset = ma_ppo.PRESETS["ma-ppo-tldr"]
    assert {k: preset[k] for k in RUN_GEMMA} == RUN_GEMMA
    assert preset["minibatch_dialogues"] * 8 == 256 and preset["dialogues_per_rank"] == preset["minibatch_dialogues"]
    rows = [{"prompt": f"SUBREDDIT: r/relationships\n\nTITLE: Advice needed ({i})\n\nPOST: My friend and I argued "
                       f"about plan {i} and now we do not talk. What should I do?\n\nTL;DR:",
             "completion": f" argued with a friend about plan {i}, how do we make up?"} for i in range(8)]
    dataset = tmp_path / "tldr.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    subprocess.run([sys.executable, os.path.join(REPO, "ma_ppo.py"), "--preset", "ma-ppo-tldr", "--model", tiny_model,
                    "--reward_model", tiny_reward_model, "--dataset", str(dataset), "--output_dir", str(tmp_path),
                    "--run_name", "r", "--num_iterations", "1", "--dialogues_per_rank", "4", "--minibatch_dialogues",
                    "4", "--micro_batch_dialogues", "2", "--max_new_tokens", "4", "--num_eval_prompts", "2",
                    "--kv_cache_gib", "0.0625"], check=True, timeout=600, env=script_env)
    args = json.load(open(tmp_path / "r" / "args.json"))
    toy = {"max_new_tokens"}
    assert args["preset"] == "ma-ppo-tldr" and args["dataset"] == str(dataset) and args["user"] == "dataset"
    assert {k: args[k] for k in RUN_GEMMA if k not in toy} == {k: list(v) if isinstance(v, tuple) else v
                                                               for k, v in RUN_GEMMA.items() if k not in toy}
    metrics = read_metrics(tmp_path / "r")
    assert [m["iteration"] for m in metrics] == [0, 1] and metrics[1]["data/turns_played"] == 1
    # 4-token answers, n = 5, the last token alone: 2 macros (1 when a tiny random policy ends at once)
    assert 1 <= metrics[1]["macro/per_dialogue"] <= 2 and "eval/score_turn1" in metrics[1]


# the guessing game with 16 evaluation games instead of 1,024 (an evaluation of 1,024 took most of a run's time; the
# resume is checked the same way on 16)
SMALL_EVAL = ["--task_arg", "num_eval=16"]


@pytest.mark.slow
def test_multi_turn_resume_continues_the_same_schedule(tmp_path, script_env):
    """The guessing game (several turns with the game's user), resumed from its first checkpoint, the later ones
    deleted: the resumed iterations log what the uninterrupted run's did (a kill mid-run is checked on refuel.py and
    rebel.py, whose checkpoints are written by the same code)."""
    subprocess.run(command(str(tmp_path), "r", *SMALL_EVAL), check=True, timeout=900, env=script_env)
    run_dir = tmp_path / "r"
    uninterrupted = read_metrics(run_dir)
    for later in ("iteration_000002", "iteration_000003"):
        shutil.rmtree(run_dir / "checkpoints" / later)
    subprocess.run(command(str(tmp_path), "r", *SMALL_EVAL, "--resume"), check=True, timeout=900, env=script_env)
    resumed = read_metrics(run_dir)
    assert [m["iteration"] for m in resumed] == [0, 1, 2, 3]
    assert uninterrupted[1]["data/turns_played"] > 1  # dialogues with the user, several turns
    for a, b in zip(resumed[2:], uninterrupted[2:]):
        for key in ("reward/score", "loss/policy", "loss/value", "policy/lr", "macro/per_dialogue"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-5, nan_ok=True), (a["iteration"], key)
