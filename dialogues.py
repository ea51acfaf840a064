"""Dialogues for the four scripts: where they come from, how they are played, how they are scored.

Rule: everything here is about conversations as data. Datasets in the common chat shapes become openings;
episodes are played turn by turn against a simulated user to a horizon (`rollout_dialogues`, on any engine of
engines.py); a reward model scores whole dialogues; `evaluate_by_turn` scores a policy after each turn. The
engines and their weight sync are in engines.py, the tasks (openings + user + reward + horizon) in tasks/,
checkpoints in checkpoints.py, and training plumbing (processes, FSDP2, tokenization, log-probs, logging) in
utils.py.

Copy it along with the script you fork; it is not a library.
"""

import copy
import dataclasses
import json
import math
import os
import re
from typing import Callable

import torch

import utils

# ----------------------------------------------------------------------------------------------------------
# datasets: prompts and preferences, in the common chat message shapes


ROLE_NAMES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
"""role names of the common chat formats (role/content, ShareGPT from/value, HH-RLHF transcripts), normalised"""


def as_messages(value) -> utils.Dialogue:
    """A dataset cell as chat messages: a list of {"role", "content"} or ShareGPT {"from", "value"} dicts, an
    HH-RLHF transcript ("\n\nHuman: ... \n\nAssistant: ..."), or a plain string (one user message). Raises
    ValueError saying what is wrong: an empty cell, an unknown role, a message of another shape."""
    if value is None or (isinstance(value, (str, list)) and not value):
        raise ValueError("empty")
    if isinstance(value, str):
        parts = re.split(r"(?:^|\n\n)(Human|Assistant): ", value)  # [before the first marker, role, text, ...]
        if len(parts) == 1 or parts[0].strip():
            messages = [{"role": "user", "content": value}]
        else:
            messages = [{"role": ROLE_NAMES[r.lower()], "content": c} for r, c in zip(parts[1::2], parts[2::2])]
    elif isinstance(value, list) and all(isinstance(m, dict) for m in value):
        messages = []
        for m in value:
            role, content = (m.get("role"), m.get("content")) if "role" in m else (m.get("from"), m.get("value"))
            if str(role).lower() not in ROLE_NAMES:
                raise ValueError(f"unknown role {role!r} (expected one of {sorted(ROLE_NAMES)})")
            if not isinstance(content, str):
                raise ValueError("a message without text: expected {'role', 'content'} or {'from', 'value'} strings")
            messages.append({"role": ROLE_NAMES[str(role).lower()], "content": content})
    else:
        raise ValueError(f"a {type(value).__name__} cell: expected a string or a list of chat messages")
    if not any(m["content"].strip() for m in messages):
        raise ValueError("empty")
    if not any(m["role"] == "user" for m in messages):
        raise ValueError("no user message")
    return messages


def load_rows(source: str, split: str = "train"):
    """A `datasets.Dataset` from a local .json/.jsonl/.parquet/.csv file, a saved folder, or a hub id. A .jsonl
    file with broken lines keeps its good rows; the broken lines are reported by number and counted."""
    import datasets

    extension = os.path.splitext(source)[1].lstrip(".")
    kind = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(extension)
    if kind is not None and not os.path.isfile(source):
        # a mistyped file name: the hub would answer with a long traceback about a dataset repository
        raise ValueError(f"{source}: no such file")
    if not os.path.isfile(source):
        if os.path.isdir(source) and os.path.exists(os.path.join(source, "dataset_info.json")):
            return datasets.load_from_disk(source), {}
        return datasets.load_dataset(source, split=split), {}
    if kind is None:
        raise ValueError(f"{source}: unknown data file type {extension!r} (use json, jsonl, parquet or csv)")
    if os.path.getsize(source) == 0:
        raise ValueError(f"{source}: the file is empty")
    try:
        return datasets.load_dataset(kind, data_files=source, split="train"), {}
    except Exception:  # datasets rejects a whole JSON-lines file for one bad line: read it line by line
        if extension != "jsonl":
            raise
    rows, bad = [], []
    with open(source) as f:
        for number, line in enumerate(f, 1):
            try:
                rows.append(json.loads(line)) if line.strip() else None
            except json.JSONDecodeError:
                bad.append(number)
    utils.print0(f"warning: {source}: {len(bad)} lines are not JSON and were skipped (lines {bad[:10]})")
    if not rows:
        raise ValueError(f"{source}: no line is JSON")
    return datasets.Dataset.from_list(rows), {"bad_json_line": len(bad)}


def load_prompts(source: str, column: str, split: str = "train") -> tuple[list[utils.Dialogue], dict[str, int]]:
    """Dialogues from a dataset's `column` (any shape `as_messages` reads), with at least one user message.

    A row that cannot be read is skipped and counted by cause (the returned dict: "empty", "unknown role", ...);
    a missing column, or a dataset with no usable row, is an error that names the first bad row and its cause.
    """
    dataset, skipped = load_rows(source, split)
    if column not in dataset.column_names:
        raise ValueError(f"{source}: no column {column!r}; its columns are {dataset.column_names}")
    prompts = parse_rows(dataset[column], as_messages, skipped, f"{source}: no usable prompt in column {column!r}")
    return prompts, skipped


def parse_rows(rows, parse: Callable, skipped: dict[str, int], nothing_usable: str) -> list:
    """`parse` of every row; a row it rejects (ValueError) is skipped and counted in `skipped` by the message's
    leading words. No usable row at all is an error: `nothing_usable`, the counts, and the first bad row."""
    parsed, first_problem = [], None
    for index, row in enumerate(rows):
        try:
            parsed.append(parse(row))
        except ValueError as e:
            cause = str(e).split(" (")[0].split(":")[0]
            skipped[cause] = skipped.get(cause, 0) + 1
            first_problem = first_problem or f"row {index}: {e}"
    if not parsed:
        raise ValueError(f"{nothing_usable} ({len(rows)} rows, skipped {skipped}; {first_problem})")
    return parsed


def load_preferences(source: str, split: str = "train", chosen: str = "chosen",
                     rejected: str = "rejected") -> tuple[list[tuple[utils.Dialogue, utils.Dialogue]], dict[str, int]]:
    """(chosen, rejected) dialogues from a preference dataset whose two columns hold whole dialogues in any shape
    `as_messages` reads (HH-RLHF transcripts, UltraFeedback message lists). The two must end with an assistant
    answer and share everything before it; a row that does not is skipped and counted by cause, and a dataset with
    no usable row is an error naming the first bad row."""
    dataset, skipped = load_rows(source, split)
    missing = [c for c in (chosen, rejected) if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{source}: no column {missing}; its columns are {dataset.column_names}")

    def pair(row: tuple) -> tuple[utils.Dialogue, utils.Dialogue]:
        a, b = as_messages(row[0]), as_messages(row[1])
        if a[-1]["role"] != "assistant" or b[-1]["role"] != "assistant":
            raise ValueError("no final answer: the dialogues must end with an assistant message")
        if a[:-1] != b[:-1]:
            raise ValueError("different contexts: chosen and rejected differ before their final answers")
        return a, b

    rows = list(zip(dataset[chosen], dataset[rejected]))
    return parse_rows(rows, pair, skipped, f"{source}: no usable preference pair"), skipped


# ----------------------------------------------------------------------------------------------------------
# multi-turn dialogues: episodes, the rollout loop with a simulated user, evaluation by turn


@dataclasses.dataclass(eq=False)
class Episode:
    """One dialogue being played: the messages, and for every assistant turn the exact tokens behind it."""

    messages: utils.Dialogue
    info: dict = dataclasses.field(default_factory=dict)
    """task state the policy never sees: the secret number, the dataset's later user turns, ..."""
    prompts: list[list[int]] = dataclasses.field(default_factory=list)
    """per assistant turn, the token ids it was sampled from (the dialogue so far plus the generation prompt)"""
    responses: list[list[int]] = dataclasses.field(default_factory=list)
    """per assistant turn, the sampled token ids (end-of-turn token included when the turn ended)"""
    finished: list[bool] = dataclasses.field(default_factory=list)
    """per assistant turn, False when it ran into the length cap without ending"""
    done: bool = False
    """the user (the task) ended the dialogue, or its next turn would not fit the engine's context"""
    context_full: bool = False
    """the dialogue ended because its next turn would not fit the context (the policy's or the user's engine)"""

    @property
    def turns(self) -> int:
        return len(self.responses)

    def prefix(self, user_turn: int) -> "Episode":
        """A copy of the dialogue through user turn `user_turn` (0-indexed): the state s_h that turn h answers."""
        cut = [i for i, m in enumerate(self.messages) if m["role"] == "user"][user_turn] + 1
        return Episode([dict(m) for m in self.messages[:cut]], dict(self.info), self.prompts[:user_turn],
                       self.responses[:user_turn], self.finished[:user_turn])

    def truncated(self, turns: int) -> "Episode":
        """The dialogue through assistant turn `turns` (1-based), for scoring a dialogue at a shorter horizon."""
        if turns >= self.turns:
            return self
        cut = [i for i, m in enumerate(self.messages) if m["role"] == "assistant"][turns - 1] + 1
        return Episode(self.messages[:cut], self.info, self.prompts[:turns], self.responses[:turns],
                       self.finished[:turns])


TEMPLATE_TOKENS_PER_TURN = 64
"""room per turn for the chat template's role headers and end-of-turn tokens when sizing an engine's context"""


def model_positions(path: str, trust_remote_code: bool = False) -> int | None:
    """The longest sequence a model's config allows (`max_position_embeddings`, or the older names vLLM reads
    too), or None when the config names none. vLLM refuses a longer context at engine start: RoPE past it is
    garbage."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    config = getattr(config, "text_config", None) or config
    return next((getattr(config, key) for key in ("max_position_embeddings", "n_positions", "max_seq_len",
                                                  "seq_length") if getattr(config, key, None)), None)


def context_window(model_path: str, *, max_prompt_tokens: int, horizon: int, max_new_tokens: int,
                   user_max_tokens: int, max_context_tokens: int | None = None, role: str = "policy") -> int:
    """The rollout engine's context for dialogues of `horizon` assistant turns: `max_context_tokens` when given,
    else the longest dialogue the length flags allow, an opening and then per turn an answer, a user reply and
    the template's tokens. Raises ValueError, naming the flags and the sum, when it is longer than the model's
    positions (`model_positions`), before anything is loaded. Dialogues that reach the window end there
    (`play_turn`), so a window below the sum is a cap, not an error."""
    turn = max_new_tokens + user_max_tokens + TEMPLATE_TOKENS_PER_TURN
    wanted = max_context_tokens or max_prompt_tokens + horizon * turn
    if wanted < max_prompt_tokens + max_new_tokens:
        raise ValueError(f"--max_context_tokens {wanted:,} cannot hold one turn: the longest opening and its answer "
                         f"take --max_prompt_tokens {max_prompt_tokens:,} + --max_new_tokens {max_new_tokens:,}")
    limit = model_positions(model_path)
    if limit is None or wanted <= limit:
        return wanted
    if max_context_tokens:
        raise ValueError(f"--max_context_tokens {max_context_tokens:,} is longer than the {limit:,} positions of the "
                         f"{role} {model_path} (max_position_embeddings)")
    raise ValueError(
        f"the longest dialogue the length flags allow, --max_prompt_tokens {max_prompt_tokens:,} + --horizon "
        f"{horizon} x (--max_new_tokens {max_new_tokens:,} + --user_max_tokens {user_max_tokens:,} + "
        f"{TEMPLATE_TOKENS_PER_TURN} template tokens) = {wanted:,} tokens, is longer than the {limit:,} positions "
        f"of the {role} {model_path} (max_position_embeddings). Lower those flags, or cap the dialogues with "
        f"--max_context_tokens {limit} or less (a dialogue whose next turn would not fit then ends there, counted "
        "in skipped/context_full_dialogues)")


def openings_that_fit(openings: list[Episode], tokenizer, max_tokens: int) -> tuple[list[Episode], int, int]:
    """The openings whose templated prompt has at most `max_tokens` tokens, how many were left out, and the longest
    kept prompt's length. Openings with the same messages are templated once: a game's openings often are (the
    guessing game's 4,096 are one text, the secret being the user's), and templating each took seconds a rank."""
    keys, lengths = [json.dumps(e.messages) for e in openings], {}
    for key, e in zip(keys, openings):
        if key not in lengths:
            lengths[key] = len(utils.chat_token_ids(tokenizer, e.messages, True))
    kept = [(e, lengths[key]) for key, e in zip(keys, openings) if lengths[key] <= max_tokens]
    return [e for e, _ in kept], len(openings) - len(kept), max((n for _, n in kept), default=0)


class UserReply(str):
    """A simulated user's reply (the text the policy reads) that cost more generated tokens than that text: an LLM
    user writes a hidden justification before its question. `generated_tokens` counts everything it generated, for
    the budget; a plain `str` reply (a scripted user, a dataset's turn) is counted as its text."""

    def __new__(cls, text: str, generated_tokens: int = 0):
        reply = super().__new__(cls, text)
        reply.generated_tokens = generated_tokens
        return reply


def generated_tokens(episodes: list[Episode], tokenizer, first_turns: list[int]) -> tuple[int, int]:
    """Tokens generated in `episodes` from assistant turn `first_turns[i]` on: the policy's sampled tokens, and the
    user's replies after those turns (a `UserReply`'s own count, hidden text included; any other reply's text in
    the policy's tokenizer). What a method's data cost."""
    policy = sum(len(r) for e, first in zip(episodes, first_turns) for r in e.responses[first:])
    replies = [m["content"] for e, first in zip(episodes, first_turns)
               for m in [m for m in e.messages if m["role"] == "user"][first + 1 :]]
    texts = [r for r in replies if not isinstance(r, UserReply)]
    user = sum(r.generated_tokens for r in replies if isinstance(r, UserReply))
    return policy, user + (sum(map(len, tokenizer(texts, add_special_tokens=False).input_ids)) if texts else 0)


def play_turn(players: list[tuple[Episode, int, tuple]], engine, tokenizer, user, max_tokens: int,
              temperature: float) -> bool:
    """One turn of every dialogue still open among `players` (episode, horizon, seed key), in place: one batched
    engine call for all their assistant turns, then one batched user call for every dialogue that continues.
    Returns False when none was open.

    A turn's sampling seed depends on its key and turn only, never on the batch it is drawn in. A user reply of
    None ends that dialogue (the task is done). A dialogue whose prompt plus `max_tokens` would not fit the
    engine's context ends before the turn, marked `context_full` (vLLM would refuse the request). An assistant
    turn that hits `max_tokens` is kept, and marked unfinished, not silently cut; its text goes to the user as it is.
    """
    open_, prompts = [], []
    for e, horizon, key in players:
        if e.done or e.turns >= horizon:
            continue
        prompt = utils.chat_token_ids(tokenizer, e.messages, add_generation_prompt=True)
        if len(prompt) + max_tokens > engine.max_model_len:
            e.done = e.context_full = True
            continue
        open_.append((e, horizon, key))
        prompts.append(prompt)
    if not open_:
        return False
    seeds = [utils.sample_seed(*key, e.turns) for e, _, key in open_]
    for (e, _, _), p, c in zip(open_, prompts, engine.generate(prompts, max_tokens, temperature, seeds)):
        e.prompts.append(p)
        e.responses.append(c.token_ids)
        e.finished.append(c.finished)
        e.messages.append({"role": "assistant", "content": c.text})
    asking = [e for e, horizon, _ in open_ if e.turns < horizon]
    for e, reply in zip(asking, user(asking) if asking else []):
        if reply is None:
            e.done = True
        else:
            e.messages.append({"role": "user", "content": reply})
    return True


def rollout_dialogues(episodes: list[Episode], engine, *, tokenizer, user, horizons: list[int], max_tokens: int,
                      temperature: float, seed: tuple, keys: list[tuple] | None = None) -> list[Episode]:
    """Plays every episode on to its horizon (in assistant turns), in place, and returns them, turn by turn
    (`play_turn`). Episode i's turns are sampled with seeds fixed by `(*seed, *keys[i], turn)`; `keys` defaults
    to each episode's index."""
    keys = keys or [(i,) for i in range(len(episodes))]
    players = [(e, horizon, (*seed, *key)) for e, horizon, key in zip(episodes, horizons, keys)]
    while play_turn(players, engine, tokenizer, user, max_tokens, temperature):
        pass
    return episodes


def evaluate_by_turn(task, engine, *, tokenizer, max_tokens: int, temperature: float, seed: int, rank: int,
                     world_size: int) -> list[list[float]]:
    """Scores after each turn h = 1..H of this rank's share of a `tasks.Task`'s evaluation dialogues, played to H. The
    sampling seeds depend on (seed, rank, dialogue, turn) only and users answer a conversation the same way
    whenever asked, so evaluations of two policies stay paired until their dialogues differ."""
    mine = [Episode(copy.deepcopy(e.messages), copy.deepcopy(e.info)) for e in task.eval[rank::world_size]]
    episodes = rollout_dialogues(mine, engine, tokenizer=tokenizer, user=task.user, horizons=[task.horizon] * len(mine),
                                 max_tokens=max_tokens, temperature=temperature, seed=(seed, "eval", rank))
    return [task.reward([e.truncated(t) for e in episodes]) for t in range(1, task.horizon + 1)]


def eval_metrics(scores: list[list[float]], initial: list[list[float]]) -> dict[str, float]:
    """`eval/score_turn{h}` and the win rate against the initial policy on the same dialogues (ties 1/2), pooled
    over ranks. A NaN score stays NaN: left out of the means (a turn with none finite is NaN), counted in
    `eval/nan_scores` and reported on the console."""
    per_dialogue = {}
    for t, (now, before) in enumerate(zip(scores, initial), start=1):
        per_dialogue[f"eval/score_turn{t}"] = now
        per_dialogue[f"eval/winrate_vs_initial_turn{t}"] = [
            float(a > b) + 0.5 * float(a == b) if math.isfinite(a) and math.isfinite(b) else float("nan")
            for a, b in zip(now, before)]
    metrics = utils.mean_over_ranks(per_dialogue)
    nan_scores = float(sum(not math.isfinite(x) for s in scores for x in s))
    metrics.update(utils.sum_over_ranks({"eval/nan_scores": nan_scores}))
    if metrics["eval/nan_scores"]:
        utils.print0(f"warning: {metrics['eval/nan_scores']:.0f} evaluation scores are NaN (the reward gave no "
                     "number); they are left out of the means, and a turn with no number at all reads NaN")
    return metrics


# ----------------------------------------------------------------------------------------------------------
# reward models: scoring whole dialogues


class RewardModel:
    """Scores whole dialogues with a sequence-classification reward model through its own chat template.

    Works for any `AutoModelForSequenceClassification` with one output (FsfairX, Skywork, tiny test models)
    and for ArmoRM, whose custom code (`trust_remote_code`) returns `.score`.
    """

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype, max_length: int,
                 trust_remote_code: bool = False, batch_size: int = 8):
        from transformers import AutoModelForSequenceClassification

        self.tokenizer = utils.load_tokenizer(path, trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code).to(device).eval()
        self.device, self.max_length, self.batch_size = device, max_length, batch_size

    @torch.no_grad()
    def __call__(self, dialogues: list[utils.Dialogue]) -> list[float]:
        # the RM reads the end of the dialogue: cut from the left when it is too long
        sequences = [utils.chat_token_ids(self.tokenizer, d)[-self.max_length :] for d in dialogues]
        pad = self.model.config.pad_token_id
        # transformers scores the last token that is not the pad id; where that id occurs inside a sequence
        # (pad = EOS is common) batching would score the wrong token, so such sequences go one at a time
        batchable = pad is not None and not any(pad in s for s in sequences)
        size = self.batch_size if batchable else 1
        scores = []
        for start in range(0, len(sequences), size):
            chunk = sequences[start : start + size]
            input_ids = utils.pad_right(chunk, pad if pad is not None else 0).to(self.device)
            attention_mask = utils.pad_right([[1] * len(s) for s in chunk], 0, input_ids.shape[1]).to(self.device)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
            score = out.score if hasattr(out, "score") else out.logits[:, 0]
            scores.extend(score.float().flatten().tolist())
        return scores
