"""A plug-in task with a parameter of its own, set from the command line with no script edited:
`--task tests/difficulty_task.py:make_task --task_arg difficulty=5`. Its reference scores are the difficulty it was
given, so a run's metrics.jsonl shows that the value arrived (`reference/difficulty_turn<h>`)."""

import dialogues
import tasks


def make_task(difficulty: int = 3):
    """Two turns: say the difficulty, then say it again; a turn scores 1 when its answer contains the number."""
    asked = str(difficulty)
    opening = lambda: dialogues.Episode([{"role": "user", "content": f"Say {asked}."}])  # noqa: E731

    def user(episodes):
        return [None if e.turns >= 2 else f"Say {asked} again." for e in episodes]

    def reward(episodes):
        answers = [[m["content"] for m in e.messages if m["role"] == "assistant"] for e in episodes]
        return [sum(asked in a for a in said) / max(1, len(said)) for said in answers]

    return tasks.Task(train=[opening() for _ in range(8)], eval=[opening() for _ in range(2)], user=user,
                      reward=reward, horizon=2, reference_scores={"difficulty": [difficulty, difficulty]})
