"""The guessing game: a verifiable multi-turn task whose user and reward are code.

The secret is a number in 1..n; the policy guesses, the user answers "Higher"/"Lower" and restates the interval
left. Success within H turns rewards planning across turns (binary search is optimal), so learning shows on a CPU
in minutes. `make_task` is what `--task guess_number` calls; it also supplies a tiny policy taught the rules by a
short supervised warm start (`warm_start_policy`), used when the script is given no `--model`.
"""

import hashlib
import json
import os
import random
import shutil
import time

import torch

import dialogues
import utils
from tasks import Task


class GuessNumber:
    """The verifiable multi-turn task: guess a secret number in 1..n; the user answers "Higher"/"Lower" and
    restates the interval that is still possible.

    Reward 1 when the secret is named within the horizon, else 0. Every guess inside the interval has the same
    chance to be right now, so the immediate reward cannot tell a good guess from a bad one; the midpoint is
    better only because it leaves the smallest interval for the turns after (binary search is optimal). That
    payoff shows turns later, which is the credit assignment multi-turn methods are for. A reply that is not a
    number in range costs a turn.

    The default game, 1..7 in 3 turns, is the smallest with that property: binary search solves every game,
    random consistent play 67%, and the first guess is worth 0.81 in the middle and 0.52 at an end, a gap that a
    few hundred dialogues per iteration can see through the one-bit reward. Numbers below 10 are one token.
    """

    def __init__(self, n: int = 7, horizon: int = 3):
        self.n, self.horizon = n, horizon
        self.opening = f"I am thinking of a number from 1 to {n}. Guess it: answer with the number only."

    def new_episode(self, secret: int) -> dialogues.Episode:
        # a short system turn replaces the chat template's default one: fewer tokens for a tiny model to read
        return dialogues.Episode([{"role": "system", "content": "Guessing game."},
                              {"role": "user", "content": self.opening}], {"secret": secret})

    def parse(self, text: str) -> int | None:
        text = text.strip().rstrip(".")
        # ASCII digits only: str.isdigit accepts characters int() cannot read, such as "₂"
        return int(text) if text.isascii() and text.isdigit() and 1 <= int(text) <= self.n else None

    def answer(self, guess: int, secret: int, low: int, high: int) -> tuple[str, int, int]:
        """The user's reply to a wrong guess, and the interval still possible after it."""
        if guess < secret:
            low = max(low, guess + 1)
            return f"Higher: from {low} to {high}.", low, high
        high = min(high, guess - 1)
        return f"Lower: from {low} to {high}.", low, high

    def reply(self, episode: dialogues.Episode) -> str | None:
        guesses = [self.parse(m["content"]) for m in episode.messages if m["role"] == "assistant"]
        if guesses[-1] is None:
            return f"Please answer with one number from 1 to {self.n}."
        if guesses[-1] == episode.info["secret"]:
            return None
        low, high = 1, self.n
        for guess in filter(None, guesses):
            text, low, high = self.answer(guess, episode.info["secret"], low, high)
        return text

    def users(self, episodes: list[dialogues.Episode]) -> list[str | None]:
        return [self.reply(e) for e in episodes]

    def rewards(self, episodes: list[dialogues.Episode]) -> list[float]:
        return [float(any(self.parse(m["content"]) == e.info["secret"] for m in e.messages if m["role"] == "assistant"))
                for e in episodes]

    def solved_by_turn(self, strategy: str, games: int = 20000, seed: int = 0) -> list[float]:
        """Fraction of games solved within 1..horizon guesses by `binary` search or `random` consistent guessing."""
        rng = random.Random(seed)
        solved = [0] * self.horizon
        for _ in range(games):
            secret, low, high = rng.randint(1, self.n), 1, self.n
            for turn in range(self.horizon):
                guess = (low + high) // 2 if strategy == "binary" else rng.randint(low, high)
                if guess == secret:
                    for t in range(turn, self.horizon):
                        solved[t] += 1
                    break
                _, low, high = self.answer(guess, secret, low, high)
        return [s / games for s in solved]

    def random_consistent_game(self, rng: random.Random) -> dialogues.Episode:
        """A full game of random consistent play: the supervised warm-start data, and the recorded dialogues the
        baselines take their offline contexts from."""
        secret, low, high = rng.randint(1, self.n), 1, self.n
        episode = self.new_episode(secret)
        messages = episode.messages
        for _ in range(self.horizon):
            guess = rng.randint(low, high)
            messages.append({"role": "assistant", "content": str(guess)})
            if guess == secret:
                break
            text, low, high = self.answer(guess, secret, low, high)
            messages.append({"role": "user", "content": text})
        if messages[-1]["role"] == "user":
            messages.pop()
        return episode


WARM_START_GAMES_PER_STEP = 32
"""games of random consistent play per supervised step of the warm start"""


def warm_start_key(games: list[utils.Dialogue], tokenizer_path: str, settings: dict) -> str:
    """The warm start's cache key: a hash of what the policy is trained on (every training game's text, so any
    other wording or rule changes it, and the tokenizer's files) and how (`settings`: shape, lr, seed)."""
    digest = hashlib.sha256(json.dumps([games, sorted(settings.items())]).encode())
    for name in sorted(os.listdir(tokenizer_path)):
        if name.startswith(("tokenizer", "special_tokens_map", "chat_template", "vocab", "merges")):
            with open(os.path.join(tokenizer_path, name), "rb") as f:
                digest.update(name.encode() + f.read())
    return digest.hexdigest()[:16]


def warm_start_policy(game: GuessNumber, tokenizer_path: str, steps: int = 800, seed: int = 0) -> str:
    """A tiny Llama taught the game by a short supervised warm start on random consistent play, cached.

    It learns to answer with a number inside the interval the user restates, i.e. to play about as well as random
    consistent play (docs/refuel.md has the measured figures); from there the algorithms can find binary search.
    Trained once per machine and `warm_start_key`: a game with other wording or rules (a fork's subclass), another
    tokenizer or other `steps` gets a policy of its own.
    """
    # every step's games drawn up front (the same games in the same order as drawn step by step): the cache key
    # is a hash of them
    rng = random.Random(seed)
    games = [game.random_consistent_game(rng).messages for _ in range(steps * WARM_START_GAMES_PER_STEP)]
    return warm_start_on_games(f"guess_number_n{game.n}_h{game.horizon}_s{steps}", games, tokenizer_path, seed)


def warm_start_on_games(name: str, games: list[utils.Dialogue], tokenizer_path: str, seed: int = 0) -> str:
    """A tiny Llama trained on the assistant turns of `games`, WARM_START_GAMES_PER_STEP a step, cached as
    `name` and the `warm_start_key` of the games (the game tasks' warm start: this game and tasks/harvest.py).
    Trained on one CPU thread, with the LR decaying linearly to 0."""
    # at lr 3e-3 the guessing game's loss stays for hundreds of steps at the guesses' marginal distribution: the
    # model does not learn to read the interval, and about half of its later guesses fall outside it
    lr = 1e-3
    shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4)
    steps = len(games) // WARM_START_GAMES_PER_STEP
    key = warm_start_key(games, tokenizer_path, dict(shape, lr=lr, seed=seed))
    folder = os.path.join(utils.cache_dir(), f"{name}_{key}")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    with utils.file_lock(folder + ".lock"):
        if os.path.exists(os.path.join(folder, "config.json")):
            return folder
        tmp = folder + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        utils.make_tiny_model(tmp, tokenizer_path, seed, **shape)
        tokenizer, model = utils.load_tokenizer(tmp), utils.load_causal_lm(tmp)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        started, threads = time.time(), torch.get_num_threads()
        torch.set_num_threads(1)  # the ops of a model this small are too small to share between threads
        for step in range(steps):
            batch = [utils.tokenize_dialogue(tokenizer, messages)
                     for messages in games[step * WARM_START_GAMES_PER_STEP : (step + 1) * WARM_START_GAMES_PER_STEP]]
            input_ids = utils.pad_right([ids for ids, _ in batch], tokenizer.pad_token_id)
            attention_mask = utils.pad_right([[1] * len(ids) for ids, _ in batch], 0)
            # next-token loss on the assistant tokens only; the vocabulary projection is applied to those
            # positions alone, which is most of the cost saved
            targets = utils.pad_right([[int(any(m[i] for m in masks)) for i in range(len(ids))]
                                       for ids, masks in batch], 0)
            hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            where = targets[:, 1:].bool()
            logits = model.lm_head(hidden[:, :-1][where])
            loss = torch.nn.functional.cross_entropy(logits, input_ids[:, 1:][where])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            for group in optimizer.param_groups:
                group["lr"] = lr * (1 - (step + 1) / steps)
            if (step + 1) % 50 == 0:
                utils.print0(f"{name} warm start: step {step + 1}/{steps}, loss {loss.item():.3f}, "
                             f"{time.time() - started:.0f}s")
        torch.set_num_threads(threads)
        model.save_pretrained(tmp)
        os.replace(tmp, folder)
    return folder


def make_task(seed: int, model: str | None = None, horizon: int | None = None, guess_max: int = 7,
              warm_start_steps: int = 800, num_train: int = 4096, num_eval: int = 1024,
              num_recorded: int = 4096) -> Task:
    """The game's task: `num_train` openings with secrets drawn with `seed`, `num_eval` with a fixed seed (every run
    evaluates on the same games), `num_recorded` games of random consistent play (the baselines' offline
    dialogues), the game's reference scores, and, when no `model` is given, the warm-started
    policy (trained once per machine and cached; with a `model` nothing is trained). `horizon` None keeps the
    game's own."""
    game = GuessNumber(guess_max, horizon) if horizon else GuessNumber(guess_max)
    rng, eval_rng, recorded_rng = random.Random(seed), random.Random(12345), random.Random(seed + 1)
    policy = None
    if model is None:
        tokenizer_path = utils.resolve_model_path(utils.EMBEDDED_SMOLLM2)  # its tokenizer, for the tiny policy
        policy = utils.rank0_first(lambda: warm_start_policy(game, tokenizer_path, warm_start_steps))
    return Task(
        train=[game.new_episode(rng.randint(1, game.n)) for _ in range(num_train)],
        eval=[game.new_episode(eval_rng.randint(1, game.n)) for _ in range(num_eval)],
        user=game.users, reward=game.rewards, horizon=game.horizon,
        reference_scores={"binary search (optimal)": game.solved_by_turn("binary"),
                          "random consistent": game.solved_by_turn("random")},
        policy=policy, recorded=[game.random_consistent_game(recorded_rng) for _ in range(num_recorded)],
    )
