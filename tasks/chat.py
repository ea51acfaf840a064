"""The chat task: dataset openings, a simulated user, and a reward model (or a reward function) on whole dialogues.

`--task chat` calls `make_task`. The user is chosen with `user`: an LLM on its own colocated engine prompted as in
the official REFUEL code (`llm`), the same prompt sent to an OpenAI-compatible vLLM server (`server`, for a user as
large as the paper's 70B), or the dataset's own later user turns (`dataset`, REFUEL's setting two).
"""

import json
import time

import torch

import dialogues
import engines
import utils
from tasks import Task, import_function

USER_PROMPT_TOKENS = 512
"""the user engine reads the whole dialogue inside the user-simulator prompt: room for that prompt's own text"""


LONG_ANSWER_WORDS = 64
"""the length at which the two length rewards below reach 0"""
TARGET_WORDS = 8
"""the length `target_length_reward` pays most for"""


def brevity_reward(dialogue: utils.Dialogue) -> float:
    """A verifiable reward for CPU learning checks: 1 for an empty last answer, down to 0 at `LONG_ANSWER_WORDS`
    words or more.

    Any model can earn it, so the mean reward shows within minutes whether an algorithm learns.
    """
    return max(0.0, 1.0 - len(dialogue[-1]["content"].split()) / LONG_ANSWER_WORDS)


def target_length_reward(dialogue: utils.Dialogue) -> float:
    """A verifiable reward whose best answer is not empty: 1 for a last answer of `TARGET_WORDS` words, falling
    linearly to 0 at no words and at `LONG_ANSWER_WORDS` words or more.

    `brevity_reward` pays most for saying nothing, and a policy that learns that stops spending tokens: under a token
    budget it then runs for ever more iterations with every pair tied. Here the empty answer scores 0, so a policy
    has to learn where to stop.
    """
    words = len(dialogue[-1]["content"].split())
    if words < TARGET_WORDS:
        return words / TARGET_WORDS
    return max(0.0, 1.0 - (words - TARGET_WORDS) / (LONG_ANSWER_WORDS - TARGET_WORDS))


USER_SIMULATOR_PROMPT = (
    "Below is a dialogue between the user and the assistant. Pretend you are the user in this conversation. "
    "What question would you ask next? \n\n{dialogue}### Instructions: \nFIRST provide a justification of the "
    "question you want to ask. \nSECOND, on a new line, state only the question. Your response should use the "
    "format: \nJustification: \nQuestion: "
)
"""The user-simulator prompt of the official REFUEL code (`setting_one/user_generator.py`)."""


def user_simulator_prompt(messages: utils.Dialogue) -> str:
    return USER_SIMULATOR_PROMPT.format(dialogue="".join(f"### {m['role']}: {m['content']}\n\n" for m in messages))


def parse_user_reply(text: str) -> str:
    """The question after the last `Question:`; the whole reply when the simulator ignored the format."""
    return text.rsplit("Question:", 1)[1].strip() if "Question:" in text else text.strip()


class LLMUser:
    """A chat model playing the user through its own rollout engine, prompted as in the REFUEL code.

    A reply's sampling seed is a hash of `seed` and the conversation so far, so the user answers the same
    conversation the same way whenever it is asked: a resumed run replays its user turns, and an evaluation
    of the trained policy meets the initial policy's user wherever their dialogues agree.
    """

    def __init__(self, engine, tokenizer, max_tokens: int, temperature: float, seed: int):
        self.engine, self.tokenizer = engine, tokenizer
        self.max_tokens, self.temperature, self.seed = max_tokens, temperature, seed

    def __call__(self, episodes: list[dialogues.Episode]) -> list[str | None]:
        texts = [user_simulator_prompt(e.messages) for e in episodes]
        prompts = [utils.chat_token_ids(self.tokenizer, [{"role": "user", "content": t}], add_generation_prompt=True)
                   for t in texts]
        # a dialogue the user's engine can no longer read ends here (None), marked as the policy's would be
        fits = [len(p) + self.max_tokens <= self.engine.max_model_len for p in prompts]
        for e, fit in zip(episodes, fits):
            e.context_full = e.context_full or not fit
        asked = [(p, utils.sample_seed(self.seed, t)) for p, t, fit in zip(prompts, texts, fits) if fit]
        completions = iter(self.engine.generate([p for p, _ in asked], self.max_tokens, self.temperature,
                                                [s for _, s in asked]) if asked else [])
        # each reply carries the count of all the user generated, its hidden justification too, for the budget
        return [dialogues.UserReply(parse_user_reply(c.text), len(c.token_ids)) if c else None
                for c in (next(completions) if fit else None for fit in fits)]


class UserServerError(RuntimeError):
    pass


class ServerUser:
    """The same simulated user served by a vLLM OpenAI-compatible server (e.g. a 70B model with its own GPUs).

    Each request waits `timeout` seconds and is retried `retries` times with a growing pause, except a request
    the server refuses (4xx but 408/429); a failure raises `UserServerError` with the URL and the server's own
    error text, so no dialogue is silently dropped. Seeds as in `LLMUser`.
    """

    def __init__(self, url: str, model: str, max_tokens: int, temperature: float, seed: int, timeout: float = 120,
                 retries: int = 3, concurrency: int = 16):
        self.url, self.model, self.max_tokens, self.temperature = url.rstrip("/"), model, max_tokens, temperature
        self.seed, self.timeout, self.retries, self.concurrency = seed, timeout, retries, concurrency

    def _ask(self, prompt: str, seed: int) -> dialogues.UserReply:
        import urllib.error
        import urllib.request

        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "max_tokens": self.max_tokens, "temperature": self.temperature, "seed": seed}).encode()
        error = None
        for attempt in range(self.retries + 1):
            try:
                request = urllib.request.Request(f"{self.url}/v1/chat/completions", body,
                                                 {"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    answer = json.load(response)
                # the budget counts all the user generated, its hidden justification too (the server's count)
                return dialogues.UserReply(parse_user_reply(answer["choices"][0]["message"]["content"]),
                                           answer["usage"]["completion_tokens"])
            except urllib.error.HTTPError as e:
                # keep the server's own words (vLLM explains a 400 or a 404 in the body)
                error = f"HTTP {e.code} {e.reason}: {e.read().decode(errors='replace')[:500]}"
                if 400 <= e.code < 500 and e.code not in (408, 429):
                    break  # a request the server refuses will be refused again
            except (urllib.error.URLError, TimeoutError, ConnectionError, KeyError, json.JSONDecodeError) as e:
                error = repr(e)
            if attempt < self.retries:
                time.sleep(min(2**attempt, 10))
        raise UserServerError(f"the user server at {self.url} failed after {attempt + 1} tries (--user_timeout "
                              f"{self.timeout:g} s, --user_retries {self.retries}); last error: {error}")

    def __call__(self, episodes: list[dialogues.Episode]) -> list[str]:
        from concurrent.futures import ThreadPoolExecutor

        prompts = [user_simulator_prompt(e.messages) for e in episodes]
        seeds = [utils.sample_seed(self.seed, p) for p in prompts]
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._ask, prompts, seeds))


class DatasetUser:
    """The dataset's own next user turns (REFUEL's setting two: the user does not react to the assistant).

    Reads them from `info["user_turns"]`; the dialogue ends when they run out.
    """

    def __call__(self, episodes: list[dialogues.Episode]) -> list[str | None]:
        replies = []
        for e in episodes:
            turns = e.info.get("user_turns", [])
            replies.append(turns[e.turns - 1] if e.turns - 1 < len(turns) else None)
        return replies


def dataset_openings(dataset: str, prompt_column: str,
                     split: str) -> tuple[list[dialogues.Episode], list[dialogues.Episode | None], dict[str, int]]:
    """Each usable row as an episode ending at its first user turn; the row's later user turns are kept in
    `info["user_turns"]` for the dataset user. A row that also holds assistant turns (UltraInteract's `trajectory`,
    a message list) is a recorded dialogue as well: the whole row, its assistant turns included, with the same info
    (the offline contexts of dpo_multiturn.py); other rows have None there. Also returns the skipped rows' counts by
    cause."""
    chats, skipped = dialogues.load_prompts(dataset, prompt_column, split)
    openings, recorded = [], []
    for d in chats:
        first_user = next(i for i, m in enumerate(d) if m["role"] == "user")
        later_user_turns = [m["content"] for m in d[first_user + 1 :] if m["role"] == "user"]
        openings.append(dialogues.Episode(d[: first_user + 1], {"user_turns": later_user_turns}))
        answered = any(m["role"] == "assistant" for m in d[first_user + 1 :])
        recorded.append(dialogues.Episode(d, {"user_turns": later_user_turns}) if answered else None)
    return openings, recorded, skipped


def make_task(seed: int, rank: int, device: torch.device, bf16: bool, model: str | None = None,
              horizon: int | None = None, dataset: str = "data/prompts.jsonl", prompt_column: str = "prompt",
              dataset_split: str = "train", num_eval_prompts: int = 16, user: str = "llm",
              user_model: str | None = None, user_url: str | None = None, user_max_tokens: int = 128,
              user_temperature: float = 0.8, user_timeout: float = 120, user_retries: int = 3,
              reward_model: str | None = None, reward_function: str = "tasks.chat:brevity_reward",
              trust_remote_code: bool = False, reward_max_length: int = 4096, max_prompt_tokens: int = 1024,
              max_new_tokens: int = 1024, max_context_tokens: int | None = None,
              engine_memory_share: float = 0.3, kv_cache_bytes: int | None = None,
              rollout_backend: str = "auto") -> Task:
    """The chat task; the first `num_eval_prompts` openings are held out for evaluation. `horizon` None is the
    paper's 5 turns. The `llm` user defaults to the policy's own base model (`model`, else the embedded SmolLM2),
    frozen, on an engine of its own; its task's `engines` list holds it so the script can close it. The dialogues'
    context is checked against the policy's positions (and a colocated user's) before any model loads."""
    horizon = horizon or 5
    if user not in ("llm", "server", "dataset"):
        raise ValueError(f"unknown --user {user!r}: use llm, server or dataset")
    if user == "server" and (user_url is None or user_model is None):
        raise ValueError("--user server needs --user_url and --user_model")
    lengths = dict(max_prompt_tokens=max_prompt_tokens, horizon=horizon, max_new_tokens=max_new_tokens,
                   user_max_tokens=user_max_tokens, max_context_tokens=max_context_tokens)
    context = dialogues.context_window(utils.resolve_model_path(model or utils.EMBEDDED_SMOLLM2), **lengths)
    user_path = utils.resolve_model_path(user_model or model or utils.EMBEDDED_SMOLLM2) if user == "llm" else None
    if user_path is not None:
        dialogues.context_window(user_path, **lengths, role="colocated user")
    openings, recorded, skipped = dataset_openings(dataset, prompt_column, dataset_split)
    if skipped:
        utils.print0(f"{dataset}: skipped rows {skipped}")
    if len(openings) <= num_eval_prompts:
        raise ValueError(f"{dataset}: {len(openings)} openings, fewer than num_eval_prompts + 1 (skipped: {skipped})")
    # the recorded dialogues of the training rows only: the evaluation openings' rows are never trained on
    train_recorded = [e for e in recorded[num_eval_prompts:] if e is not None]
    if train_recorded:
        utils.print0(f"{dataset}: {len(train_recorded)} training rows hold assistant turns (recorded dialogues, for "
                     f"offline contexts), {len(recorded) - num_eval_prompts - len(train_recorded)} do not")
    # the reward first: a reward function that cannot be imported fails before an engine starts
    if reward_model is not None:
        scorer = dialogues.RewardModel(reward_model, device, torch.bfloat16 if bf16 else torch.float32,
                                   reward_max_length, trust_remote_code)

        def reward(episodes):
            return scorer([e.messages for e in episodes])
    else:
        score_dialogue = import_function(reward_function)

        def reward(episodes):
            return [float(score_dialogue(e.messages)) for e in episodes]
    started = []
    user_seed = utils.sample_seed(seed, "user", rank)
    if user == "llm":
        # room for the simulator prompt's own text around the dialogue, within the user model's positions (a
        # dialogue the user cannot read in full ends there: LLMUser)
        wanted = context + USER_PROMPT_TOKENS
        user_context = min(wanted, dialogues.model_positions(user_path) or wanted)
        engine = engines.make_engine(user_path, device, max_model_len=user_context, seed=seed + 1,
                                     bf16=bf16, gpu_memory_utilization=engine_memory_share,
                                     kv_cache_memory_bytes=kv_cache_bytes, backend=rollout_backend)
        started.append(engine)
        simulated_user = LLMUser(engine, utils.load_tokenizer(user_path), user_max_tokens, user_temperature,
                                 user_seed)
    elif user == "server":
        simulated_user = ServerUser(user_url, user_model, user_max_tokens, user_temperature, user_seed,
                                    user_timeout, user_retries)
    else:
        simulated_user = DatasetUser()
    return Task(train=openings[num_eval_prompts:], eval=openings[:num_eval_prompts], user=simulated_user,
                reward=reward, horizon=horizon, engines=started, skipped=skipped, recorded=train_recorded)
