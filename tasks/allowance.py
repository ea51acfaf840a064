"""The word allowance: a chat task in which every answer is scored and every turn depends on the ones before.

Each turn the user asks a question from the embedded prompt set (data/prompts.jsonl) and gives the policy an
allowance of A words (4 to 16 at the start). The answer's words (split on whitespace) count if there are at most A
of them, and the allowance it leaves unused doubles for the next turn, up to 16: A' = min(16, 2 (A - w)). An answer
over the allowance counts nothing and leaves the allowance as it was. The score after turn h is the words counted
so far over the most a dialogue from that start can count in H turns, so that the best plan scores 1.

These are the harvest game's rules (tasks/harvest.py) played in words by a chat model, so the task has both
properties a comparison of multi-turn and single-turn methods needs. Each answer is scored, and a single-turn
method has a real signal at every turn: an answer within the allowance counts, one over it does not. A later turn's
score depends on what earlier answers left, so credit across turns pays: the reference policies, exact over the
starts (`reference_scores`), show it. Greedy play (the whole allowance every turn) leads after turn 1 and ends far
below the best plan, which holds words back while the allowance is small.

The policy is the embedded SmolLM2-135M-Instruct (or `--model`); the user and the score are code, so a dialogue
needs no model but the policy (a token budget still counts the user's replies as text, as in the games). The
questions are split in two: the first half opens and continues the training dialogues, the second half the
evaluation's (`num_eval`, 64 by default, each question with several starts).
"""

import os
import random

import dialogues
from tasks import REPO, Task
from tasks.harvest import Harvest

MOST_WORDS = 16
"""the allowance never exceeds this"""
STARTS = range(4, MOST_WORDS + 1)
"""the allowances a dialogue starts from"""


class Allowance(Harvest):
    """The harvest game's rules in words: the allowance is the field, an answer's words are the pick."""

    def __init__(self, horizon: int = 3):
        super().__init__(horizon, most=MOST_WORDS, starts=STARTS)

    @staticmethod
    def parse(text: str, field: int) -> int | None:
        words = len(text.split())
        return words if words <= field else None

    def say(self, turn: int, field: int) -> str:
        return f"Turn {turn} of {self.horizon}: answer in at most {field} words."

    def new_episode(self, field: int, questions: list[str]) -> dialogues.Episode:
        opening = (f"{questions[0]} {self.say(1, field)} The words you leave unused double for your next answer, up "
                   f"to {MOST_WORDS}.")
        return dialogues.Episode([{"role": "system", "content": "Answer within your word allowance."},
                                  {"role": "user", "content": opening}], {"field": field, "questions": questions})

    def reply(self, episode: dialogues.Episode) -> str:
        answers = [m["content"] for m in episode.messages if m["role"] == "assistant"]
        field_before = self.play(episode.info["field"], answers[:-1])[1]
        counted, field = self.play(episode.info["field"], answers)
        verdict = "counted" if self.parse(answers[-1], field_before) is not None else \
            f"over the allowance of {field_before}: nothing counted"
        return (f"{len(answers[-1].split())} words, {verdict} ({counted} so far). "
                f"{episode.info['questions'][len(answers)]} {self.say(len(answers) + 1, field)}")


def make_task(seed: int, horizon: int | None = None, num_train: int = 4096, num_eval: int = 64,
              dataset: str = os.path.join(REPO, "data", "prompts.jsonl")) -> Task:
    """`--task allowance`: `num_train` training dialogues (their starts and questions drawn with `seed` from the
    first half of the questions), `num_eval` evaluation dialogues drawn with a fixed seed from the second half (every
    run evaluates on the same ones), and the reference scores by turn."""
    game = Allowance(horizon or 3)
    prompts, _ = dialogues.load_prompts(dataset, "prompt", "train")
    questions = [d[-1]["content"] for d in prompts]
    train_questions, eval_questions = questions[: len(questions) // 2], questions[len(questions) // 2 :]

    def draw(rng: random.Random, pool: list[str]) -> dialogues.Episode:
        return game.new_episode(rng.choice(STARTS), rng.sample(pool, game.horizon))

    rng, eval_rng = random.Random(seed), random.Random(12345)
    return Task(
        train=[draw(rng, train_questions) for _ in range(num_train)],
        eval=[draw(eval_rng, eval_questions) for _ in range(num_eval)],
        user=game.users, reward=game.rewards, horizon=game.horizon,
        reference_scores={name: game.score_by_turn(strategy) for name, strategy in
                          (("best plan", "optimal"), ("random within the allowance", "random"),
                           ("greedy (the whole allowance)", "greedy"))},
    )
