"""A fork's own task, plugged into refuel.py with `--task tests/custom_task.py:make_task` (no script edited)."""

import dialogues
import tasks


def count_up_user(episodes):
    """Asks for the next number; ends the dialogue once the assistant has answered three times."""
    return [None if e.turns >= 3 else f"Now say {e.turns + 1}." for e in episodes]


def says_the_number(episodes):
    """1 for each assistant turn that contains the number asked for, divided by the turns played."""
    scores = []
    for e in episodes:
        answers = [m["content"] for m in e.messages if m["role"] == "assistant"]
        scores.append(sum(str(i + 1) in a for i, a in enumerate(answers)) / max(1, len(answers)))
    return scores


def make_task(num_openings: int = 16):
    opening = lambda: dialogues.Episode([{"role": "user", "content": "Count with me. Say 1."}])  # noqa: E731
    return tasks.Task(train=[opening() for _ in range(num_openings)], eval=[opening() for _ in range(4)],
                          user=count_up_user, reward=says_the_number, horizon=3)
