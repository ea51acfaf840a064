"""The digits task (tasks/digits.py): its score by hand, its reference scores, its warm start, and ma_ppo.py on it."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tasks import TaskArgs, digits, load_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def answered(text):
    episode = digits.new_episode()
    episode.messages.append({"role": "assistant", "content": text})
    return episode


def test_the_score_reads_the_first_48_digits():
    assert digits.digits_score("9" * 48) == 2.5 and digits.digits_score("0" * 48) == -2.5
    assert digits.digits_score("45" * 24) == 0.0  # a mean of 4.5: uniformly random digits' expected score
    # past the 48th digit nothing counts; other characters are skipped; a missing digit counts as 0
    assert digits.digits_score("9" * 48 + "0" * 10) == 2.5
    assert digits.digits_score(" 9," * 48) == 2.5
    assert digits.digits_score("9" * 24) == 0.0
    assert digits.digits_score("") == -2.5 and digits.digits_score("nine " * 48) == -2.5
    # one 9 in place of a 0 moves the score by 2 * 2.5 * 9 / (9 * 48), wherever it is
    base = "0" * 48
    assert digits.digits_score("9" + base[1:]) == digits.digits_score(base[:47] + "9") == pytest.approx(
        -2.5 + 5 / 48)


def test_the_task_and_its_reference_scores():
    task = load_task(TaskArgs(task="digits"), model="any-policy", max_new_tokens=48, seed=0)
    assert task.horizon == 1 and task.policy is None and len(task.eval) == 128
    assert task.train[0].messages[-1] == {"role": "user", "content": "Write 48 digits, nothing else."}
    assert task.user([answered("1")]) == [None]  # one turn: the user never answers
    assert task.reward([answered("9" * 48), answered("0" * 48)]) == [2.5, -2.5]
    assert task.reference_scores == {"all nines (best)": [2.5], "uniformly random digits": [0.0]}
    # uniformly random digits score 0 on average; the all-nines answer is the best there is
    rng = torch.Generator().manual_seed(0)
    samples = ["".join(map(str, torch.randint(0, 10, (48,), generator=rng).tolist())) for _ in range(4000)]
    assert sum(map(digits.digits_score, samples)) / len(samples) == pytest.approx(0.0, abs=0.02)
    with pytest.raises(ValueError, match="needs --max_new_tokens of at least 48"):
        load_task(TaskArgs(task="digits"), model="any-policy", max_new_tokens=32)


def test_the_kl_regularised_optimum():
    """The optimum of score - kl * KL(pi || uniform) over per-token digit distributions, found by gradient ascent on
    the logits, is `kl_regularised_score`'s tilt: 0.98 at kl 0.05."""
    for kl in (0.05, 0.01):
        logits = torch.zeros(10, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.Adam([logits], lr=0.05)
        share = 2 * 2.5 * torch.arange(10, dtype=torch.float64) / (9 * 48)  # a digit's part of the score
        for _ in range(3000):
            p = logits.softmax(0)
            objective = 48 * ((p * share).sum() - kl * (p * (p * 10).log()).sum())
            optimizer.zero_grad()
            (-objective).backward()
            optimizer.step()
        p = logits.softmax(0).detach()
        best = 2.5 * (2 * (p * torch.arange(10)).sum().item() / 9 - 1)
        assert digits.kl_regularised_score(kl) == pytest.approx(best, abs=1e-3)
    assert round(digits.kl_regularised_score(0.05), 2) == 0.98 and round(digits.kl_regularised_score(0.01), 2) == 2.25


def test_the_warm_start_teaches_digits_and_is_cached(monkeypatch, tmp_path, smollm2_path):
    import utils

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = digits.warm_start_policy(smollm2_path, steps=2)
    assert folder.startswith(str(tmp_path)) and digits.warm_start_policy(smollm2_path, steps=2) == folder
    assert digits.warm_start_policy(smollm2_path, steps=3) != folder
    # two steps already move the next-token distribution after the prompt towards the digits (about 2x their mass)
    tokenizer = utils.load_tokenizer(folder)
    prompt = torch.tensor([utils.chat_token_ids(tokenizer, digits.new_episode().messages, True)])
    fresh = os.path.join(tmp_path, "fresh")
    utils.make_tiny_model(fresh, smollm2_path, 0, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=4)
    ids = tokenizer.convert_tokens_to_ids(list("0123456789"))
    with torch.no_grad():
        mass = [utils.load_causal_lm(f)(prompt).logits[0, -1].softmax(-1)[ids].sum().item() for f in (fresh, folder)]
    assert mass[1] > 1.5 * mass[0]


@pytest.mark.slow
def test_ma_ppo_on_the_digits_task(tmp_path, script_env, tiny_model):
    """`python ma_ppo.py --task digits --max_new_tokens 48` at toy scale: a tiny random policy instead of the warm
    start, one iteration; a 48-token answer is cut into nine 5-token macros, one of 2 and the last token."""
    subprocess.run([sys.executable, os.path.join(REPO, "ma_ppo.py"), "--task", "digits", "--max_new_tokens", "48",
                    "--model", tiny_model, "--output_dir", str(tmp_path), "--run_name", "r", "--num_iterations", "1",
                    "--dialogues_per_rank", "8", "--minibatch_dialogues", "8", "--micro_batch_dialogues", "4",
                    "--kv_cache_gib", "0.0625"], check=True, timeout=600, env=script_env)
    with open(tmp_path / "r" / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    assert [m["iteration"] for m in metrics] == [0, 1]
    assert metrics[0]["reference/all nines (best)_turn1"] == 2.5
    # a random policy over the whole vocabulary writes almost no digits: scores near -2.5
    assert -2.5 <= metrics[1]["reward/score"] < -2.0 and math.isfinite(metrics[1]["eval/score_turn1"])
    assert 10 <= metrics[1]["macro/per_dialogue"] <= 11  # 11 unless a sampled end-of-turn cut an answer short
