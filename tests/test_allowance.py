"""The word allowance (tasks/allowance.py): the harvest game's rules in words, its two properties measured with the
reference policies, and its held-out evaluation questions."""

import pytest

from tasks.allowance import Allowance, make_task


def answered(game, start, answers, questions=("Q1?", "Q2?", "Q3?")):
    episode = game.new_episode(start, list(questions))
    for text in answers:
        episode.messages.append({"role": "assistant", "content": text})
        if len([m for m in episode.messages if m["role"] == "assistant"]) < game.horizon:
            episode.messages.append({"role": "user", "content": game.reply(episode)})
    return episode


def test_words_within_the_allowance_count_and_what_is_left_doubles():
    game = Allowance()
    # 10 words allowed: 4 counted, 6 left double to 12; 12 counted, 0 left; then nothing is allowed
    episode = answered(game, 10, ["a b c d", "w " * 12, ""])
    assert game.play(10, ["a b c d", "w " * 12, ""]) == (16, 0)
    assert "4 words, counted (4 so far). Q2? Turn 2 of 3: answer in at most 12 words." in episode.messages[3]["content"]
    assert game.score(episode) == pytest.approx(16 / game.best(10, 3))
    # over the allowance: nothing counted, the allowance stays
    assert game.play(5, ["one two three four five six", "x"]) == (1, 8)
    assert "over the allowance of 5: nothing counted (0 so far)" in game.reply(answered(game, 5, ["a " * 6]))
    assert game.best(16, 3) == 32 and game.best(4, 3) == 16  # 8, 8, 16 and 0, 0, 16: the allowance caps at 16


def test_greedy_leads_after_turn_1_and_loses_to_the_plan_at_the_end():
    """The two properties, from the exact reference scores: every turn's answer moves the score (greedy, the best
    single-turn play, leads after turn 1), and earlier answers decide what later ones can count (the best plan
    holds words back and ends at 1, greedy at 0.381)."""
    game = Allowance()
    best, random_play, greedy = (game.score_by_turn(s) for s in ("optimal", "random", "greedy"))
    assert best == pytest.approx([0.094, 0.338, 1.0], abs=1e-3)
    assert random_play == pytest.approx([0.191, 0.361, 0.506], abs=1e-3)
    assert greedy == pytest.approx([0.381] * 3, abs=1e-3)
    assert greedy[0] > random_play[0] > best[0] and best[-1] > random_play[-1] > greedy[-1]


def test_the_task_holds_out_its_evaluation_questions():
    task = make_task(seed=1)
    assert task.horizon == 3 and len(task.eval) == 64 and len(task.train) == 4096
    train_questions = {q for e in task.train for q in e.info["questions"]}
    eval_questions = {q for e in task.eval for q in e.info["questions"]}
    assert len(train_questions) == 32 and len(eval_questions) == 32 and not train_questions & eval_questions
    assert {e.info["field"] for e in task.train} == set(range(4, 17))
    assert [e.messages for e in make_task(seed=2).eval] == [e.messages for e in task.eval]  # the same every run
    assert set(task.reference_scores) == {"best plan", "random within the allowance", "greedy (the whole allowance)"}
    dialogue = task.eval[0]
    dialogue.messages.append({"role": "assistant", "content": "Water."})
    assert task.user([dialogue])[0].startswith("1 words, counted (1 so far).")
    assert task.reward([dialogue]) == [pytest.approx(1 / Allowance().best(dialogue.info["field"], 3))]
