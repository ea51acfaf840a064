"""The harvest game (tasks/harvest.py): its rules, score and user by hand, its reference policies, its warm start."""

import random

import pytest
import torch

import utils
from tasks import TaskArgs, harvest, load_task


def game_with(start, answers, horizon=3):
    game = harvest.Harvest(horizon)
    episode = game.new_episode(start)
    for i, text in enumerate(answers):
        if i:
            episode.messages.append({"role": "user", "content": game.reply(episode)})
        episode.messages.append({"role": "assistant", "content": text})
    return game, episode


def test_the_field_doubles_what_is_left_up_to_9_and_the_score_is_the_share_of_the_best():
    game = harvest.Harvest()
    assert [game.best(f, 3) for f in range(1, 10)] == [4, 8, 10, 12, 13, 14, 15, 16, 17]
    assert [game.best(f, 1) for f in range(1, 10)] == list(range(1, 10))  # the last turn: everything
    # 7 apples: wait (0, field 9), pick 5 (field 8), pick 8: 13 of the best 15
    game, episode = game_with(7, ["0", "5", "8"])
    assert game.score(episode) == pytest.approx(13 / 15)
    assert episode.messages[3]["content"] == "You have 0. Turn 2 of 3. The field has 9 apples."
    assert episode.messages[5]["content"] == "You have 5. Turn 3 of 3. The field has 8 apples."
    # optimal play from 7: pick 2 (field 9), pick 5 (field 8), pick 8 = 15
    assert game.score(game_with(7, ["2", "5", "8"])[1]) == 1.0
    # the score of a dialogue cut after turn h is the apples so far: greedy leads at turn 1
    assert game.score(game_with(7, ["7"])[1]) == pytest.approx(7 / 15)
    assert game.score(game_with(7, ["2"])[1]) == pytest.approx(2 / 15)


def test_an_answer_that_is_not_a_valid_pick_picks_nothing_and_the_field_does_not_grow():
    game, episode = game_with(3, ["5", "x", "3."])
    assert game.score(episode) == pytest.approx(3 / 10)
    assert episode.messages[3]["content"] == ("You picked nothing: answer a number from 0 to 3. You have 0. "
                                              "Turn 2 of 3. The field has 3 apples.")
    # digits int() cannot read (str.isdigit accepts "₂"; a diverged policy wrote "6898887₂") and non-ASCII ones
    # pick nothing instead of stopping the run
    assert [game.parse(a, 9) for a in ("3", " 2.", "6898887₂", "₂", "٣", "²")] == [3, 2, None, None, None, None]


def test_the_reference_policies_by_turn():
    game = harvest.Harvest()
    optimal, rand, greedy = (game.score_by_turn(s) for s in ("optimal", "random", "greedy"))
    assert optimal[-1] == pytest.approx(1.0) and greedy == pytest.approx([greedy[0]] * 3)
    assert greedy[-1] < rand[-1] < optimal[-1]  # greedy is the worst at the end...
    assert greedy[0] > rand[0] > optimal[0]  # ...and the best after turn 1: the immediate score misleads
    assert [round(x, 2) for x in (optimal[-1], rand[-1], greedy[-1])] == [1.0, 0.51, 0.38]
    # the optimal first pick waits up to 5 apples and leaves 5 above
    assert [game.picks("optimal", f, 1)[0][0] for f in range(1, 10)] == [0, 0, 0, 0, 0, 1, 2, 3, 4]
    # the exact expectation matches play: random valid picks over many games
    rng = random.Random(0)
    scores = [[game.score(game_with(e.info["field"], [m["content"] for m in e.messages
                                                       if m["role"] == "assistant"][:h])[1]) for h in (1, 2, 3)]
              for e in (game.random_game(rng) for _ in range(20000))]
    for h in range(3):
        assert sum(s[h] for s in scores) / len(scores) == pytest.approx(rand[h], abs=0.01)


def test_the_task_with_a_given_model(process_group):
    task = load_task(TaskArgs(task="harvest"), model="any-policy", seed=3)
    assert task.horizon == 3 and task.policy is None and len(task.eval) == 1024 and len(task.recorded) == 4096
    assert set(task.reference_scores) == {"optimal", "random valid picks", "greedy"}
    starts = {e.info["field"] for e in task.train}
    assert starts == set(range(1, 10))
    # the evaluation games do not depend on the run's seed; the training starts do
    again = load_task(TaskArgs(task="harvest"), model="any-policy", seed=4)
    assert [e.info for e in again.eval] == [e.info for e in task.eval]
    assert [e.info for e in again.train] != [e.info for e in task.train]
    # recorded games are whole games of valid picks
    game = harvest.Harvest()
    for e in task.recorded[:50]:
        answers = [m["content"] for m in e.messages if m["role"] == "assistant"]
        assert len(answers) == 3 and game.score(e) <= 1.0
        field = e.info["field"]
        for a in answers:
            assert game.parse(a, field) is not None
            field = game.grow(field, int(a))


def test_the_warm_start_teaches_valid_picks_and_is_cached(monkeypatch, tmp_path, smollm2_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    game = harvest.Harvest()
    folder = harvest.warm_start_policy(game, smollm2_path, steps=2)
    assert folder.startswith(str(tmp_path)) and harvest.warm_start_policy(game, smollm2_path, steps=2) == folder
    assert harvest.warm_start_policy(game, smollm2_path, steps=3) != folder
    # two steps already raise the digits' share of the next-token distribution after the opening
    tokenizer, trained = utils.load_tokenizer(folder), utils.load_causal_lm(folder)
    untrained = utils.load_causal_lm(utils.make_tiny_model(str(tmp_path / "fresh"), smollm2_path, seed=0,
                                                           hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                                           num_attention_heads=4, num_key_value_heads=4))
    prompt = torch.tensor([utils.chat_token_ids(tokenizer, game.new_episode(9).messages, True)])
    digit_ids = [tokenizer(str(d), add_special_tokens=False).input_ids[0] for d in range(10)]
    with torch.no_grad():
        mass = [m(prompt).logits[0, -1].softmax(-1)[digit_ids].sum().item() for m in (trained, untrained)]
    assert mass[0] > 1.5 * mass[1]
