"""The harvest game: a verifiable multi-turn task whose immediate reward is informative but myopic.

A field holds F apples (1 to 9 at the start). Each turn the user states the turn and the field; the policy answers
how many apples it picks, k from 0 to F; what it leaves doubles by the next turn, up to 9 (F' = min(9, 2 (F - k))).
The score is the apples picked so far, divided by the most a game from that start can yield in H turns, so that
optimal play scores 1. An answer that is not a number from 0 to F picks nothing and the field does not grow.

Unlike the guessing game, the score of a dialogue cut after turn h already says something: more apples now is
more score now. A single-turn method trained on that immediate score learns something true at the last turn (pick
everything) and something false before it (pick a lot): the best first move is to wait, or to pick a little. With
the default 3 turns, waiting pays whenever the field is below 5 (9 apples a turn from 5 on), so the optimal first
pick is 0 for F <= 5 and F - 4 or F - 5 above. Reference policies, exact over the nine starts (`reference_scores`):
optimal (dynamic programming, the smallest best pick) 1.0 at the last turn; random valid picks 0.51; greedy
(everything at once) 0.38, the worst of the three at the end and the best after turn 1.

`make_task` is what `--task harvest` calls; without `--model` it supplies a tiny policy that a short supervised
warm start taught to pick uniformly at random among the valid numbers (tasks/guess_number.py's warm start).
"""

import functools
import random

import dialogues
import utils
from tasks import Task
from tasks.guess_number import WARM_START_GAMES_PER_STEP, warm_start_on_games

MAX_FIELD = 9
"""the field never holds more than this (picks and fields stay one token)"""


class Harvest:
    """The game's rules, its user, its score and its reference policies. `most` is the field's cap and `starts`
    the fields a game starts from (tasks/allowance.py plays the same rules in words)."""

    def __init__(self, horizon: int = 3, most: int = MAX_FIELD, starts: range = range(1, MAX_FIELD + 1)):
        self.horizon, self.most, self.starts = horizon, most, starts

    def say(self, turn: int, field: int) -> str:
        return f"Turn {turn} of {self.horizon}. The field has {field} apples."

    def new_episode(self, field: int) -> dialogues.Episode:
        opening = (f"Harvest, {self.horizon} turns: each turn, pick from 0 apples to all of the field's; what you "
                   f"leave doubles, up to {MAX_FIELD}. Answer with the number only. " + self.say(1, field))
        # a short system turn replaces the chat template's default one: fewer tokens for a tiny model to read
        return dialogues.Episode([{"role": "system", "content": "Harvest game."},
                                  {"role": "user", "content": opening}], {"field": field})

    def grow(self, field: int, pick: int) -> int:
        return min(self.most, 2 * (field - pick))

    @staticmethod
    def parse(text: str, field: int) -> int | None:
        text = text.strip().rstrip(".")
        # ASCII digits only: str.isdigit accepts characters int() cannot read, such as "₂"
        return int(text) if text.isascii() and text.isdigit() and int(text) <= field else None

    def play(self, start: int, answers: list[str]) -> tuple[int, int]:
        """The apples picked over `answers` (the assistant's turns, in order) from a field of `start`, and the
        field after them."""
        field, picked = start, 0
        for text in answers:
            pick = self.parse(text, field)
            if pick is not None:
                picked, field = picked + pick, self.grow(field, pick)
        return picked, field

    @functools.cache
    def best(self, field: int, turns: int) -> int:
        """The most apples `turns` turns can pick from `field`."""
        return 0 if turns == 0 else max(k + self.best(self.grow(field, k), turns - 1) for k in range(field + 1))

    def reply(self, episode: dialogues.Episode) -> str:
        answers = [m["content"] for m in episode.messages if m["role"] == "assistant"]
        field_before = self.play(episode.info["field"], answers[:-1])[1]
        picked, field = self.play(episode.info["field"], answers)
        prefix = "" if self.parse(answers[-1], field_before) is not None else \
            f"You picked nothing: answer a number from 0 to {field_before}. "
        return prefix + f"You have {picked}. " + self.say(len(answers) + 1, field)

    def users(self, episodes: list[dialogues.Episode]) -> list[str | None]:
        return [self.reply(e) for e in episodes]

    def score(self, episode: dialogues.Episode) -> float:
        answers = [m["content"] for m in episode.messages if m["role"] == "assistant"]
        start = episode.info["field"]
        return self.play(start, answers)[0] / self.best(start, self.horizon)

    def rewards(self, episodes: list[dialogues.Episode]) -> list[float]:
        return [self.score(e) for e in episodes]

    def picks(self, strategy: str, field: int, turn: int) -> list[tuple[int, float]]:
        """The picks of a reference policy at `turn` (1-based) from `field`, with their probabilities."""
        if strategy == "greedy":
            return [(field, 1.0)]
        if strategy == "random":
            return [(k, 1 / (field + 1)) for k in range(field + 1)]
        left = self.horizon - turn
        return [(min(k for k in range(field + 1)
                     if k + self.best(self.grow(field, k), left) == self.best(field, left + 1)), 1.0)]

    def score_by_turn(self, strategy: str) -> list[float]:
        """The expected score after each turn of `optimal`, `greedy` or `random` play, over the starts."""
        by_turn = [0.0] * self.horizon

        def walk(start: int, field: int, turn: int, picked: int, weight: float) -> None:
            for k, p in self.picks(strategy, field, turn):
                by_turn[turn - 1] += weight * p * (picked + k) / self.best(start, self.horizon)
                if turn < self.horizon:
                    walk(start, self.grow(field, k), turn + 1, picked + k, weight * p)

        for start in self.starts:
            walk(start, start, 1, 0, 1 / len(self.starts))
        return by_turn

    def random_game(self, rng: random.Random) -> dialogues.Episode:
        """A whole game of random valid picks: the warm start's data and the baselines' recorded dialogues."""
        episode = self.new_episode(rng.randint(1, MAX_FIELD))
        for turn in range(self.horizon):
            if turn:
                episode.messages.append({"role": "user", "content": self.reply(episode)})
            field = self.play(episode.info["field"], [m["content"] for m in episode.messages
                                                      if m["role"] == "assistant"])[1]
            episode.messages.append({"role": "assistant", "content": str(rng.randint(0, field))})
        return episode


def warm_start_policy(game: Harvest, tokenizer_path: str, steps: int = 800, seed: int = 0) -> str:
    """A tiny Llama taught to pick uniformly among the valid numbers (it must read the field from the user's turn),
    cached per machine and games."""
    rng = random.Random(seed)
    games = [game.random_game(rng).messages for _ in range(steps * WARM_START_GAMES_PER_STEP)]
    return warm_start_on_games(f"harvest_h{game.horizon}_s{steps}", games, tokenizer_path, seed)


def make_task(seed: int, model: str | None = None, horizon: int | None = None, warm_start_steps: int = 800,
              num_train: int = 4096, num_eval: int = 1024, num_recorded: int = 4096) -> Task:
    """`--task harvest`: `num_train` starts drawn with `seed`, `num_eval` with a fixed seed (every run evaluates on
    the same games), `num_recorded` games of random valid picks (the baselines' offline dialogues), the reference
    scores by turn, and, without a `model`, the warm-started policy (trained once per machine and cached)."""
    game = Harvest(horizon or 3)
    rng, eval_rng, recorded_rng = random.Random(seed), random.Random(12345), random.Random(seed + 1)
    policy = None
    if model is None:
        tokenizer_path = utils.resolve_model_path(utils.EMBEDDED_SMOLLM2)  # its tokenizer, for the tiny policy
        policy = utils.rank0_first(lambda: warm_start_policy(game, tokenizer_path, warm_start_steps))
    return Task(
        train=[game.new_episode(rng.randint(1, MAX_FIELD)) for _ in range(num_train)],
        eval=[game.new_episode(eval_rng.randint(1, MAX_FIELD)) for _ in range(num_eval)],
        user=game.users, reward=game.rewards, horizon=game.horizon,
        reference_scores={name: game.score_by_turn(strategy) for name, strategy in
                          (("optimal", "optimal"), ("random valid picks", "random"), ("greedy", "greedy"))},
        policy=policy, recorded=[game.random_game(recorded_rng) for _ in range(num_recorded)],
    )
