"""REFUEL's one-pass rollout (`refuel.rollout_pairs`): both answers of turn h in one engine call, both branches
played on side by side. It must give the dialogues of the two-pass design (every A to its horizon, then every B
from A's prefix), token for token where the engine's samples do not depend on the batch, and the same
distribution of dialogues with vLLM."""

import functools
import hashlib

import numpy as np
import torch

import dialogues
import engines
import utils
from refuel import redraw_past_the_end, rollout_pairs, sample_horizons

TURN_TOKENS = 4


class CoinUser:
    """A user written in code that ends about a third of the dialogues after each answer (decided by a hash of the
    answer, so the same answer always gets the same reply), to exercise branches drawn past a dialogue's end."""

    def __call__(self, episodes):
        return [None if hashlib.sha256(e.messages[-1]["content"].encode()).digest()[0] < 85
                else f"And then, after turn {e.turns}?" for e in episodes]


def openings(n):
    return [dialogues.Episode([{"role": "user", "content": f"Tell me a story about number {i}."}]) for i in range(n)]


def two_passes(engine, tokenizer, horizons, branch_turns, n, seed):
    """The design before: every dialogue A played to its horizon, then every branch B from A's prefix at turn h."""
    play = functools.partial(dialogues.rollout_dialogues, engine=engine, tokenizer=tokenizer, user=CoinUser(),
                             horizons=horizons, max_tokens=TURN_TOKENS, temperature=1.0)
    a_side = play(openings(n), seed=(*seed, "A"))
    return a_side, play([a.prefix(h) for a, h in zip(a_side, branch_turns)], seed=(*seed, "B"))


def one_pass(engine, tokenizer, horizons, drawn, n, seed, rng):
    return rollout_pairs(openings(n), engine, tokenizer=tokenizer, user=CoinUser(), horizons=horizons,
                                   branch_turns=drawn, redraw=functools.partial(redraw_past_the_end, rng),
                                   max_tokens=TURN_TOKENS, temperature=1.0, seed=seed)


def test_one_pass_plays_the_two_pass_dialogues_token_for_token(process_group, tiny_model):
    # transformers `generate` one request at a time: each request's samples depend on its own seed only
    engine = engines.TransformersEngine(tiny_model, process_group[2], torch.float32, batch_size=1)
    tokenizer = utils.load_tokenizer(tiny_model)
    rng = np.random.default_rng(0)
    n = 24
    lengths, drawn = sample_horizons(rng, n, 3, "paper")
    a_side, b_side, turns = one_pass(engine, tokenizer, lengths.tolist(), drawn.tolist(), n, (7,), rng)
    redrawn = [i for i in range(n) if turns[i] != drawn[i]]
    assert redrawn and all(turns[i] < a_side[i].turns <= drawn[i] for i in redrawn)  # the past-the-end case ran
    a_ref, b_ref = two_passes(engine, tokenizer, lengths.tolist(), turns, n, (7,))
    for a, b, a0, b0 in zip(a_side, b_side, a_ref, b_ref):
        assert (a.messages, a.prompts, a.responses, a.done) == (a0.messages, a0.prompts, a0.responses, a0.done)
        assert (b.messages, b.prompts, b.responses, b.done) == (b0.messages, b0.prompts, b0.responses, b0.done)
    h = turns[0]
    assert b_side[0].prompts[h] == a_side[0].prompts[h]  # B answers A's state s_h


def test_one_pass_keeps_the_distribution_with_vllm(vllm_engine, tiny_model):
    """vLLM's logits can differ in the last bits with the batch a request is in, so a near-tie token may flip; the
    dialogues must still come from the same distribution: turns played, branch turns, the redraw rate, lengths."""
    tokenizer = utils.load_tokenizer(tiny_model)
    n = 300
    stats = {}
    for design in ("one pass", "two passes"):
        rng = np.random.default_rng(1)
        lengths, drawn = sample_horizons(rng, n, 3, "paper")
        if design == "one pass":
            a_side, b_side, turns = one_pass(vllm_engine, tokenizer, lengths.tolist(), drawn.tolist(), n, (3,), rng)
        else:  # the design before, with its redraw after every A has been played
            a_side = dialogues.rollout_dialogues(openings(n), vllm_engine, tokenizer=tokenizer, user=CoinUser(),
                                                 horizons=lengths.tolist(), max_tokens=TURN_TOKENS, temperature=1.0,
                                                 seed=(3, "A"))
            turns = [redraw_past_the_end(rng, a.turns) if h >= a.turns else int(h) for a, h in zip(a_side, drawn)]
            b_side = dialogues.rollout_dialogues([a.prefix(h) for a, h in zip(a_side, turns)], vllm_engine,
                                                 tokenizer=tokenizer, user=CoinUser(), horizons=lengths.tolist(),
                                                 max_tokens=TURN_TOKENS, temperature=1.0, seed=(3, "B"))
        stats[design] = {
            "A turns": np.array([a.turns for a in a_side]), "B turns": np.array([b.turns for b in b_side]),
            "branch turn": np.array(turns), "redrawn": np.array(turns) != drawn,
            "B words": np.array([len(b.messages[-1]["content"].split()) for b in b_side]),
            "tokens": [(a.responses, b.responses) for a, b in zip(a_side, b_side)],
        }
    one, two = stats["one pass"], stats["two passes"]
    same = np.mean([x == y for x, y in zip(one["tokens"], two["tokens"])])
    assert same > 0.5, f"only {same:.0%} of the pairs are identical"  # most pairs are the same draws
    for key in ("A turns", "B turns", "branch turn", "redrawn", "B words"):
        x, y = one[key].astype(float), two[key].astype(float)
        standard_error = np.sqrt(x.var() / n + y.var() / n) + 1e-9
        assert abs(x.mean() - y.mean()) < 4 * standard_error, (key, x.mean(), y.mean())
    assert one["redrawn"].mean() > 0.1  # dialogues ended before their branch turn
