"""dpo_multiturn.py's algorithm on the guessing game, where the right preference is known: the pairs that every
--turns x --contexts x --target combination builds, checked against an oracle that replays the game's rules, and the
size of DPO's gradient by hand. (The loss by hand, log 2 and the gradient's sign: tests/test_dpo_multiturn.py.)

The policies are scripted players that stand in for the rollout engine, so that every answer, and so every
preference, is exact; the rollout loop, the user, the reward and the tokenizer are the real ones."""

import copy
import math
import random
import re

import numpy as np
import pytest
import torch

import dialogues
import engines
import utils
from dpo_multiturn import dpo_loss, preference_pairs, state, training_states

STRATEGIES = {"low": lambda lo, hi: lo, "high": lambda lo, hi: hi, "mid": lambda lo, hi: (lo + hi) // 2}


class ScriptedPlayer:
    """A rollout engine (`generate` as dialogues.py's engines) that plays the guessing game by rule: its first call
    answers with `first`, later calls with `then`. It reads the interval the user restated last ("from L to H", the
    opening included) from the decoded prompt."""

    def __init__(self, tokenizer, first: str, then: str):
        self.tokenizer, self.first, self.then, self.calls = tokenizer, first, then, 0
        self.max_model_len = 2048  # the context the dialogue loop keeps prompts within (a game's are short)

    def generate(self, prompts: list[list[int]], max_tokens: int, temperature: float,
                 seeds: list[int]) -> list[engines.Completion]:
        strategy = STRATEGIES[self.first if self.calls == 0 else self.then]
        self.calls += 1
        out = []
        for prompt in prompts:
            lo, hi = map(int, re.findall(r"from (\d+) to (\d+)", self.tokenizer.decode(prompt))[-1])
            text = str(strategy(lo, hi))
            ids = self.tokenizer(text, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]
            out.append(engines.Completion(ids, text, True))
        return out


def solved(secret: int, lo: int, hi: int, first: int, turns_left: int) -> bool:
    """The oracle: whether opening with `first` in [lo, hi] and then bisecting names `secret` within `turns_left`
    guesses (the game's rules written out again, independently of GuessNumber)."""
    guess = first
    for _ in range(turns_left):
        if guess == secret:
            return True
        lo, hi = (guess + 1, hi) if guess < secret else (lo, guess - 1)
        guess = (lo + hi) // 2
    return False


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return utils.load_tokenizer(smollm2_path)


def contexts(kind: str, game, tokenizer) -> list[dialogues.Episode]:
    """The dialogues states are cut from: recorded random consistent games (offline), games the initial policy
    played once (scripted: always the interval's low end), or games the current policy plays (always the high end)."""
    if kind == "offline":
        return [game.random_consistent_game(random.Random(i)) for i in range(40)]
    openings = [game.new_episode(secret) for secret in range(1, game.n + 1) for _ in range(3)]
    player = "low" if kind == "initial" else "high"
    return dialogues.rollout_dialogues(openings, ScriptedPlayer(tokenizer, player, player), tokenizer=tokenizer,
                                       user=game.users, horizons=[game.horizon] * len(openings), max_tokens=8,
                                       temperature=1.0, seed=(0, kind))


@pytest.mark.parametrize("target", ["immediate", "future"])
@pytest.mark.parametrize("kind", ["offline", "initial", "onpolicy"])
@pytest.mark.parametrize("turns_mode", ["last", "all", "sampled"])
def test_pairs_of_every_combination_match_the_oracle(tokenizer, turns_mode, kind, target):
    """The steps of dpo_multiturn.py's `generated_pairs` (states, two answers of pi_t played to h + 1 or to H, the
    reward, `preference_pairs`) with pi_t answering turn h by the midpoint (side 0) or the low end (side 1) and
    bisecting after: each pair's preference is the oracle's, and ties and identical answers are dropped."""
    from tasks.guess_number import GuessNumber

    game = GuessNumber()
    played_dialogues = contexts(kind, game, tokenizer)
    played = [sum(m["role"] == "assistant" for m in d.messages) for d in played_dialogues]
    picked = training_states(np.random.default_rng(0), played, 30, turns_mode, game.horizon)
    states = [state(played_dialogues[d], h) for d, h in picked]
    until = [h + 1 if target == "immediate" else game.horizon for _, h in picked]
    sides = [[dialogues.rollout_dialogues([copy.deepcopy(s)], ScriptedPlayer(tokenizer, first, "mid"),
                                          tokenizer=tokenizer, user=game.users, horizons=[u], max_tokens=8,
                                          temperature=1.0, seed=(0, first))[0] for s, u in zip(states, until)]
             for first in ("mid", "low")]
    scores = torch.tensor([game.rewards(side) for side in sides]).T
    identical = torch.tensor([a.responses[h] == b.responses[h] for a, b, (_, h) in zip(*sides, picked)])
    preferred, keep = preference_pairs(scores, identical)

    context_player = {"initial": "low", "onpolicy": "high"}.get(kind)
    for i, ((d, h), s) in enumerate(zip(picked, states)):
        assert h == played[d] - 1 if turns_mode == "last" else 0 <= h < played[d]
        assert s.turns == h and s.messages[-1]["role"] == "user" and s.info == played_dialogues[d].info
        assert s.messages == played_dialogues[d].messages[: len(s.messages)]
        secret, (lo, hi) = s.info["secret"], map(int, re.findall(r"from (\d+) to (\d+)", s.messages[-1]["content"])[-1])
        if context_player is not None:  # the earlier turns are the context policy's own guesses
            bounds = [(1, game.n)] + [tuple(map(int, re.findall(r"from (\d+) to (\d+)", m["content"])[-1]))
                                      for m in s.messages if m["role"] == "user"][1:]
            guesses = [int(m["content"]) for m in s.messages if m["role"] == "assistant"]
            assert guesses == [STRATEGIES[context_player](*b) for b in bounds[: len(guesses)]]
        answers = [STRATEGIES[first](lo, hi) for first in ("mid", "low")]
        assert [side[i].messages[len(s.messages)]["content"] for side in sides] == [str(a) for a in answers]
        assert all(side[i].turns == until[i] or side[i].done for side in sides)
        left = 1 if target == "immediate" else game.horizon - h
        expected = [float(solved(secret, lo, hi, a, left)) for a in answers]
        assert scores[i].tolist() == expected
        assert identical[i].item() == (answers[0] == answers[1])
        assert keep[i].item() == (answers[0] != answers[1] and expected[0] != expected[1])
        if keep[i]:
            assert preferred[i].item() == (0 if expected[0] > expected[1] else 1)
        if h == 0 and keep[i]:
            # from 1..7 with 3 turns the midpoint then bisection solves every game and the low end 4 of 7, so the
            # future target always prefers the midpoint; the immediate one only prefers an answer naming the secret
            assert preferred[i].item() == 0 if target == "future" else secret in answers
    assert identical.sum() + (~keep & ~identical).sum() + keep.sum() == len(picked)


def test_future_target_prefers_the_midpoint_where_the_immediate_target_cannot_tell():
    """At the opening state of 1..7 over all secrets: the immediate target keeps 2 pairs of 7 (secret 4 or 1, each
    answer right once), the future target keeps the 3 secrets the low end misses, all for the midpoint."""
    immediate = torch.tensor([[float(s == 4), float(s == 1)] for s in range(1, 8)])
    future = torch.tensor([[float(solved(s, 1, 7, 4, 3)), float(solved(s, 1, 7, 1, 3))] for s in range(1, 8)])
    assert future[:, 0].tolist() == [1.0] * 7 and future[:, 1].sum().item() == 4  # secrets 1, 2, 4, 6
    preferred, keep = preference_pairs(immediate, torch.zeros(7, dtype=torch.bool))
    assert keep.tolist() == [True, False, False, True, False, False, False] and preferred[keep].tolist() == [1, 0]
    preferred, keep = preference_pairs(future, torch.zeros(7, dtype=torch.bool))
    assert keep.sum().item() == 3 and preferred[keep].tolist() == [0, 0, 0]


def test_dpo_gradient_size_by_hand():
    """d loss / d ln pi(y_w) = -beta * sigmoid(-margin) and the opposite for y_l, per pair; with beta 0.5 and a
    margin of 1: -0.5 / (1 + e) = -0.134471; a pair with margin 0: -0.5 * 0.5 = -0.25."""
    chosen = torch.tensor([-1.0, -4.0], requires_grad=True)
    rejected = torch.tensor([-3.0, -4.0], requires_grad=True)
    loss, diagnostics = dpo_loss(chosen, rejected, torch.tensor([-2.0, -4.0]), torch.tensor([-2.0, -4.0]), beta=0.5)
    loss.sum().backward()
    assert diagnostics["loss/dpo_margin"].tolist() == [1.0, 0.0]
    assert loss.tolist() == pytest.approx([math.log(1 + math.exp(-1)), math.log(2)])
    assert chosen.grad.tolist() == pytest.approx([-0.5 / (1 + math.e), -0.25])
    assert rejected.grad.tolist() == pytest.approx([0.5 / (1 + math.e), 0.25])
