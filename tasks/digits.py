"""The digits task: one turn, a long answer, and a verifiable score that depends on every token of it.

The user asks for 48 digits; the score is how high they are: 2.5 * (2 * mean / 9 - 1) over the first 48 digits of
the answer (a digit missing counts as 0), from -2.5 (all zeros) through 0 (uniformly random digits) to 2.5 (all
nines), the range of MA-PPO's score clip. Each digit is one token, so an answer is 48 actions, and the score, given
once at its end, moves by the same small amount with each of them.

That is the credit-assignment problem macro actions are for. While the critic has not learned to follow the
running sum, a token's advantage is mostly the final TD error, discounted by gamma * lambda per step: token-level
GAE (lambda 0.95) passes 0.95^47 = 0.09 of it back to the first digit, macro GAE with n = 5 (ten macros before the
last token's) 0.95^10 = 0.60. `make_task` supplies a tiny policy taught by a short supervised warm start to write
uniformly random digits (`warm_start_policy`, cached), used when the script is given no `--model`: its score
starts near 0, and an algorithm that learns moves it up within minutes on a CPU.

The KL penalty bounds how far the score can go. Per token, the KL-regularised optimum tilts the reference's digit
distribution by exp(5 d / (432 kl_coef)) (5 d / 432 is digit d's share of the score, less a constant): from
uniform digits, a score of 0.98 at kl_coef 0.05 (`kl_regularised_score`). MA-PPO's official mean aggregation divides
the KL rewards inside a macro by its length, so at n = 5 the penalty in the return is about a fifth of token-level
PPO's and the optimum higher (2.25 at 0.01); to compare credit assignment alone across n, use
`--reward_aggregation sum` (or `--kl_coef 0`).
"""

import math
import os
import random
import shutil
import time

import torch

import dialogues
import utils
from tasks import Task
from tasks.guess_number import warm_start_key

NUM_DIGITS = 48
"""digits asked for and scored"""
MAX_SCORE = 2.5
"""the score's range is [-MAX_SCORE, MAX_SCORE] (MA-PPO's official score clip)"""
OPENING = f"Write {NUM_DIGITS} digits, nothing else."
WARM_START_ANSWERS_PER_STEP = 16
"""answers of uniformly random digits per supervised step of the warm start"""
WARM_START_STEPS = 100
"""supervised steps of the warm start: the loss is at uniform digits' (ln 10) by about 75"""


def digits_score(text: str) -> float:
    """MAX_SCORE * (2 * mean / 9 - 1) over the first NUM_DIGITS digits (0-9) of `text`, a missing one counting as
    0; other characters are skipped."""
    digits = [int(c) for c in text if c in "0123456789"][:NUM_DIGITS]
    return MAX_SCORE * (2 * sum(digits) / (9 * NUM_DIGITS) - 1)


def kl_regularised_score(kl_coef: float) -> float:
    """The expected score of the policy that maximises score - kl_coef * KL(pi || uniform digits), per token: the
    score is a sum of per-digit shares 2 MAX_SCORE d / (9 NUM_DIGITS) (less a constant), so the optimum tilts each
    digit's probability by exp(share / kl_coef)."""
    weights = [math.exp(2 * MAX_SCORE * d / (9 * NUM_DIGITS * kl_coef)) for d in range(10)]
    mean = sum(d * w for d, w in enumerate(weights)) / sum(weights)
    return MAX_SCORE * (2 * mean / 9 - 1)


def new_episode() -> dialogues.Episode:
    # a short system turn replaces the chat template's default one: fewer tokens for a tiny model to read
    return dialogues.Episode([{"role": "system", "content": "Digits."}, {"role": "user", "content": OPENING}], {})


def warm_start_policy(tokenizer_path: str, steps: int = WARM_START_STEPS, seed: int = 0) -> str:
    """A tiny Llama taught to answer with uniformly random digits, cached per machine and `warm_start_key` (the
    answers it is trained on, the tokenizer's files, shape, lr, seed).

    It is taught digits only, never the end of its turn: it writes digits until `--max_new_tokens` cuts it (it
    would have to count to 48 to end on time, which a short warm start does not teach; an answer that ended early
    would score its missing digits as zeros). Its score starts near 0.
    """
    lr = 1e-3
    shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4)
    rng = random.Random(seed)
    answers = ["".join(str(rng.randint(0, 9)) for _ in range(NUM_DIGITS))
               for _ in range(steps * WARM_START_ANSWERS_PER_STEP)]
    key = warm_start_key([new_episode().messages, answers], tokenizer_path, dict(shape, lr=lr, seed=seed))
    folder = os.path.join(utils.cache_dir(), f"digits_n{NUM_DIGITS}_s{steps}_{key}")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    with utils.file_lock(folder + ".lock"):
        if os.path.exists(os.path.join(folder, "config.json")):
            return folder
        tmp = folder + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        utils.make_tiny_model(tmp, tokenizer_path, seed, **shape)
        tokenizer, model = utils.load_tokenizer(tmp), utils.load_causal_lm(tmp)
        prompt = utils.chat_token_ids(tokenizer, new_episode().messages, add_generation_prompt=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        started, threads = time.time(), torch.get_num_threads()
        torch.set_num_threads(1)  # the ops of a model this small are too small to share between threads
        for step in range(steps):
            batch = answers[step * WARM_START_ANSWERS_PER_STEP : (step + 1) * WARM_START_ANSWERS_PER_STEP]
            input_ids = torch.tensor([prompt + tokenizer(a, add_special_tokens=False).input_ids for a in batch])
            # next-token loss on the digits only, projected onto the vocabulary there alone
            hidden = model.model(input_ids=input_ids).last_hidden_state[:, len(prompt) - 1 : -1]
            loss = torch.nn.functional.cross_entropy(model.lm_head(hidden).flatten(0, 1),
                                                     input_ids[:, len(prompt) :].flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            for group in optimizer.param_groups:
                group["lr"] = lr * (1 - (step + 1) / steps)
            if (step + 1) % 25 == 0:
                utils.print0(f"digits warm start: step {step + 1}/{steps}, loss {loss.item():.3f} (uniform digits: "
                             f"{math.log(10):.3f}), {time.time() - started:.0f}s")
        torch.set_num_threads(threads)
        model.save_pretrained(tmp)
        os.replace(tmp, folder)
    return folder


def make_task(model: str | None = None, max_new_tokens: int = NUM_DIGITS, num_eval: int = 128) -> Task:
    """`--task digits`: the one opening (train and `num_eval` evaluation dialogues, each sampled with its own
    seed), the score, horizon 1, the reference scores, and, when no `model` is given, the warm-started policy
    (trained once per machine and cached)."""
    if max_new_tokens < NUM_DIGITS:
        raise ValueError(f"the digits task needs --max_new_tokens of at least {NUM_DIGITS} (one token a digit); "
                         f"got {max_new_tokens}")
    policy = None
    if model is None:
        tokenizer_path = utils.resolve_model_path(utils.EMBEDDED_SMOLLM2)  # its tokenizer, for the tiny policy
        policy = utils.rank0_first(lambda: warm_start_policy(tokenizer_path))
    return Task(
        train=[new_episode()], eval=[new_episode() for _ in range(num_eval)],
        user=lambda episodes: [None] * len(episodes),  # one turn: the user never answers
        reward=lambda episodes: [digits_score(e.messages[-1]["content"]) for e in episodes], horizon=1,
        reference_scores={"all nines (best)": [MAX_SCORE], "uniformly random digits": [0.0]}, policy=policy)
