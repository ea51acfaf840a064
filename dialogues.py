"""Dialogues for the four scripts: where they come from, how they are sampled and played, how they are scored.

Datasets in the common chat shapes become openings; a rollout engine (vLLM, or transformers `generate`) samples
the policy's turns and is kept in step with the trainer by a streamed weight sync that is checked after every
load; episodes are played turn by turn against a simulated user to a horizon; a `Task` bundles openings, user,
reward and horizon; `evaluate_by_turn` scores a policy after each turn. Training plumbing (processes, FSDP2,
tokenization, log-probs, logging, checkpoints) is in utils.py.

Copy it along with the script you fork; it is not a library.
"""

import copy
import dataclasses
import gc
import hashlib
import importlib.util
import json
import math
import os
import re
from typing import Callable

import torch
from torch.distributed.tensor import DTensor

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
    if not os.path.isfile(source):
        if os.path.isdir(source) and os.path.exists(os.path.join(source, "dataset_info.json")):
            return datasets.load_from_disk(source), {}
        return datasets.load_dataset(source, split=split), {}
    kind = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(extension)
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
# rollout engines: vLLM, and transformers `generate` where vLLM is not installed


@dataclasses.dataclass
class Completion:
    token_ids: list[int]
    """sampled tokens, the end-of-turn token included when the turn ended"""
    text: str
    """the decoded text without special tokens"""
    finished: bool
    """True when the model ended the turn itself; False when it ran into the token limit"""


class VLLMEngine:
    """A vLLM engine inside this process (one per rank), sampling from token ids.

    `external_launcher` makes vLLM reuse the torchrun processes instead of spawning its own workers, so
    each rank owns an engine that lives next to its FSDP2 shard of the same model.
    """

    def __init__(self, model_path: str, max_model_len: int, seed: int, dtype: str, gpu_memory_utilization: float,
                 kv_cache_memory_bytes: int | None, enforce_eager: bool, sleep_mode: bool = False):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its INFO lines would bury the progress lines
        from vllm import LLM

        self.llm = LLM(
            model=model_path, dtype=dtype, max_model_len=max_model_len, seed=seed,
            distributed_executor_backend="external_launcher", tensor_parallel_size=1,
            gpu_memory_utilization=gpu_memory_utilization, kv_cache_memory_bytes=kv_cache_memory_bytes,
            enforce_eager=enforce_eager,
            # vLLM's CPU sampler cannot rewind a seeded generator when a chunked prompt's token is discarded
            # ("CPU Generator does not use offset"), so every prompt is prefilled whole
            enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 8192),
            use_tqdm_on_load=False,  # no progress bar per engine start
            enable_sleep_mode=sleep_mode,
        )
        self.asleep = False
        self.tokenizer = self.llm.get_tokenizer()
        self.dtype = getattr(torch, dtype)

    def generate(self, prompts: list[list[int]], max_tokens: int, temperature: float,
                 seeds: list[int]) -> list[Completion]:
        from vllm import SamplingParams

        # top_p=1 and top_k off: the trainer scores the full softmax at `temperature`, so sampling must too
        params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=1.0, top_k=-1, seed=s)
                  for s in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [
            Completion(list(o.outputs[0].token_ids), o.outputs[0].text, o.outputs[0].finish_reason == "stop")
            for o in outputs
        ]

    def load_weights(self, weights) -> None:
        """Loads `(name, tensor)` pairs (or a state dict) in the checkpoint's names; an iterator is consumed
        lazily, so a streamed sync never holds more than the bucket being loaded."""
        weights = weights.items() if isinstance(weights, dict) else weights
        if self.asleep:  # vLLM's documented order for new weights after sleep level 2: weights, then the cache
            self.llm.wake_up(tags=["weights"])

        def reload(worker) -> None:
            from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

            # vLLM's layerwise reload (model_loader/reload/layerwise.py) recreates each module's tensors from
            # metadata recorded at start-up and, in finalize_layerwise_processing, warns about every module that
            # received none. RotaryEmbedding holds only its cos/sin cache, a non-persistent buffer computed from
            # the config that no checkpoint has: each reload logged "RotaryEmbedding: Failed to load weights"
            # and put the old cache back. For such modules the reload is told there is nothing to load (empty
            # metadata); it then puts their tensors back silently, and the metadata is restored afterwards.
            derived = [get_layerwise_info(m) for m in worker.model_runner.model.modules()
                       if not m._parameters and m._buffers and set(m._buffers) <= m._non_persistent_buffers_set]
            recorded = [info.restore_metadata for info in derived]
            for info in derived:
                info.restore_metadata = ({}, {})
            try:
                worker.model_runner.reload_weights(weights_iterator=iter(weights))
            finally:
                for info, metadata in zip(derived, recorded):
                    info.restore_metadata = metadata

        # in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, external_launcher) the callable runs on this rank's
        # worker, so the iterator is not serialized
        self.llm.collective_rpc(reload)
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        # cached prefixes hold keys/values computed with the old weights
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Frees the engine's device memory while the trainer runs (vLLM sleep mode, level 2: weights and KV cache
        discarded, since the next sync brings new weights anyway); `load_weights` wakes it. GPU only."""
        self.llm.sleep(level=2)
        self.asleep = True

    def prompt_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        from vllm import SamplingParams

        out = self.llm.generate([{"prompt_token_ids": token_ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                                use_tqdm=False)[0]
        return torch.tensor([entry[tok].logprob for tok, entry in zip(token_ids[1:], out.prompt_logprobs[1:])])

    def close(self) -> None:
        del self.llm
        gc.collect()


class TransformersEngine:
    """The same interface on transformers `generate`: for GPU machines without vLLM, and a reference in tests.

    It keeps its own unsharded copy of the model; `load_weights` copies the trainer's weights into it.
    """

    def __init__(self, model_path: str, device: torch.device, dtype: torch.dtype, batch_size: int = 64):
        self.model = utils.load_causal_lm(model_path, dtype, device).eval()
        self.asleep = False
        self.tokenizer = utils.load_tokenizer(model_path)
        self.device, self.batch_size, self.dtype = device, batch_size, dtype
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_tokens: int, temperature: float,
                 seeds: list[int]) -> list[Completion]:
        completions = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            width = max(len(p) for p in chunk)
            # left padding: transformers derives position ids from the attention mask, so each prompt still
            # starts at position 0
            pad = self.tokenizer.pad_token_id
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=self.device)
            attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=self.device)
            sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
                dict(do_sample=False)  # temperature 0 means greedy, as in vLLM
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(seeds[start])
                out = self.model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_tokens,
                    pad_token_id=pad, eos_token_id=sorted(self.stop_ids), **sampling,
                )
            for row in out[:, width:].tolist():
                end = next((i + 1 for i, t in enumerate(row) if t in self.stop_ids), None)
                tokens = row[:end] if end else row
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                completions.append(Completion(tokens, text, end is not None))
        return completions

    def load_weights(self, weights) -> None:
        """Copies `(name, tensor)` pairs (or a whole state dict, checked for completeness) into the model, back
        on its device if it was asleep."""
        if self.asleep:
            self.model.to(self.device)
            self.asleep = False
        if isinstance(weights, dict):
            self.model.load_state_dict(weights)
            return
        targets = dict(self.model.named_parameters(remove_duplicate=False)) | dict(self.model.named_buffers())
        with torch.no_grad():
            for name, tensor in weights:
                targets[name].copy_(tensor)

    def sleep(self) -> None:
        """Moves the model to the CPU while the trainer runs; `load_weights` brings it back."""
        self.model.to("cpu")
        self.asleep = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def prompt_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        return probe_logprobs(self.model, token_ids, self.device)

    def close(self) -> None:
        del self.model


CPU_KV_CACHE_BYTES = 2**28
"""vLLM's KV cache on CPU when no size is given: 0.25 GiB"""


def make_engine(model_path: str, device: torch.device, max_model_len: int, seed: int, bf16: bool,
                gpu_memory_utilization: float, kv_cache_memory_bytes: int | None, backend: str = "auto",
                sleep_mode: bool = False):
    """vLLM when it is installed (or `backend="vllm"`), else transformers `generate`. The KV cache has
    `kv_cache_memory_bytes`; None sizes it from the memory `gpu_memory_utilization` leaves (vLLM's own sizing)
    on a GPU, and `CPU_KV_CACHE_BYTES` on a CPU."""
    if backend == "auto":
        backend = "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"
    if backend == "vllm":
        if kv_cache_memory_bytes is None and device.type == "cpu":
            kv_cache_memory_bytes = CPU_KV_CACHE_BYTES  # on CPU vLLM would take a share of the whole node
        threads = torch.get_num_threads()
        # on CPU, vLLM's torch.compile warm-up costs over a minute per engine start for a ~20% faster decode
        engine = VLLMEngine(model_path, max_model_len, seed, "bfloat16" if bf16 else "float32",
                            gpu_memory_utilization, kv_cache_memory_bytes, enforce_eager=device.type == "cpu",
                            sleep_mode=sleep_mode)
        torch.set_num_threads(threads)  # vLLM lowers it for serving; training on the CPU then runs 1.5x slower
        return engine
    return TransformersEngine(model_path, device, torch.bfloat16 if bf16 else torch.float32)


# ----------------------------------------------------------------------------------------------------------
# weight sync: the trainer's weights into the engine, streamed, then checked


def sync_buckets(nbytes: list[int], bucket_bytes: int) -> list[list[int]]:
    """Groups consecutive tensors (their sizes in bytes) into buckets of at most `bucket_bytes`; a tensor larger
    than that is a bucket of its own. Returns the tensors' indices per bucket."""
    buckets, size = [], 0
    for i, n in enumerate(nbytes):
        if not buckets or size + n > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += n
    return buckets


def weights_to_sync(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The tensors an engine needs, in the model's order: the state dict's parameters (a tied head under its own
    name too: vLLM's reload waits for `lm_head.weight`) and persistent buffers. Non-persistent buffers such as
    rotary `inv_freq` are derived from the config and are not handed over."""
    keys = model.state_dict().keys()
    return [(n, t) for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()] if n in keys]


def stream_weights(model: torch.nn.Module, dtype: torch.dtype, bucket_bytes: int):
    """Yields `(name, tensor)` unsharded in `dtype`, one bucket of at most `bucket_bytes` gathered at a time (a
    collective: all ranks must consume it in step). Each shard is cast before the all-gather, so the traffic and
    the gathered copy are in the engine's dtype; a bucket is dropped before the next is gathered, so the extra
    memory of a sync is one bucket (or the largest tensor), not the model."""
    tensors = weights_to_sync(model)
    for bucket in sync_buckets([t.numel() * dtype.itemsize for _, t in tensors], bucket_bytes):
        gathered = []
        for i in bucket:
            name, tensor = tensors[i]
            tensor = tensor.detach().to(dtype)
            gathered.append((name, tensor.full_tensor() if isinstance(tensor, DTensor) else tensor))
        yield from gathered
        del gathered


def probe_logprobs(model: torch.nn.Module, token_ids: list[int], device: torch.device) -> torch.Tensor:
    """Log-probs (temperature 1) of tokens 1.. of one probe sequence: the trainer's side of the sync check."""
    input_ids = torch.tensor([token_ids], device=device)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[0, :-1].float()
    return (logits.gather(-1, input_ids[0, 1:, None]).squeeze(-1) - logits.logsumexp(-1)).cpu()


class WeightSyncError(RuntimeError):
    pass


def sync_weights(engine, model: torch.nn.Module, probe_ids: list[int], device: torch.device, tolerance: float,
                 bucket_mb: float = 512) -> float:
    """Pushes the trainer's weights into the rollout engine, streamed in buckets of `bucket_mb` MiB in the
    engine's dtype (see `stream_weights`), then proves they arrived.

    Peers' quietest bug is an engine that keeps sampling from stale weights. After loading, the engine's
    log-probs of a fixed sequence are compared with the trainer's; the largest difference is returned, and
    above `tolerance` the run stops.
    """
    engine.load_weights(stream_weights(model, engine.dtype, int(bucket_mb * 2**20)))
    return check_logprob_parity(engine, model, probe_ids, device, tolerance)


def check_logprob_parity(engine, model, probe_ids: list[int], device: torch.device, tolerance: float) -> float:
    trainer = probe_logprobs(model, probe_ids, device)
    sampler = engine.prompt_logprobs(probe_ids)
    gap = (trainer - sampler).abs().max().item()
    if not gap <= tolerance:
        raise WeightSyncError(
            f"the rollout engine's log-probs differ from the trainer's by up to {gap:.3g} (tolerance {tolerance:g}) "
            "on the probe sequence: the engine is not sampling from the weights being trained"
        )
    return gap


# ----------------------------------------------------------------------------------------------------------
# multi-turn dialogues: episodes, simulated users, the rollout loop, tasks, evaluation by turn


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
    """the user (the task) ended the dialogue"""

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


def openings_that_fit(openings: list[Episode], tokenizer, max_tokens: int) -> tuple[list[Episode], int]:
    """The openings whose templated prompt has at most `max_tokens` tokens, and how many were left out."""
    fits = [e for e in openings if len(utils.chat_token_ids(tokenizer, e.messages, True)) <= max_tokens]
    return fits, len(openings) - len(fits)


def generated_tokens(episodes: list[Episode], tokenizer, first_turns: list[int]) -> tuple[int, int]:
    """Tokens generated in `episodes` from assistant turn `first_turns[i]` on: the policy's sampled tokens, and the
    user's replies after those turns (counted in the policy's tokenizer). What a method's data cost."""
    policy = sum(len(r) for e, first in zip(episodes, first_turns) for r in e.responses[first:])
    replies = [m["content"] for e, first in zip(episodes, first_turns)
               for m in [m for m in e.messages if m["role"] == "user"][first + 1 :]]
    user = sum(map(len, tokenizer(replies, add_special_tokens=False).input_ids)) if replies else 0
    return policy, user


def sample_seed(*parts) -> int:
    """A sampling seed fixed by its parts (seed, iteration, rank, dialogue, turn, ...): reruns draw the same."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


def rollout_dialogues(episodes: list[Episode], engine, tokenizer, user, horizons: list[int], max_tokens: int,
                      temperature: float, seed: tuple) -> list[Episode]:
    """Plays every episode on to its horizon (in assistant turns), in place, and returns them.

    Turn by turn: one batched engine call for every assistant turn still open, then one batched user call
    for every dialogue that continues. A user reply of None ends that dialogue (the task is done). An
    assistant turn that hits `max_tokens` is kept, and marked unfinished, not silently cut; its text goes
    to the user as it is.
    """
    while True:
        open_ = [i for i, (e, h) in enumerate(zip(episodes, horizons)) if not e.done and e.turns < h]
        if not open_:
            return episodes
        prompts = [utils.chat_token_ids(tokenizer, episodes[i].messages, add_generation_prompt=True) for i in open_]
        seeds = [sample_seed(*seed, i, episodes[i].turns) for i in open_]
        for i, p, c in zip(open_, prompts, engine.generate(prompts, max_tokens, temperature, seeds)):
            episodes[i].prompts.append(p)
            episodes[i].responses.append(c.token_ids)
            episodes[i].finished.append(c.finished)
            episodes[i].messages.append({"role": "assistant", "content": c.text})
        asking = [episodes[i] for i in open_ if episodes[i].turns < horizons[i]]
        for e, reply in zip(asking, user(asking) if asking else []):
            if reply is None:
                e.done = True
            else:
                e.messages.append({"role": "user", "content": reply})


@dataclasses.dataclass
class Task:
    """What an algorithm needs to train on dialogues. Forks build their own and pass `--task module:function`."""

    train: list[Episode]
    """dialogue openings (ending with the first user turn) to sample from"""
    eval: list[Episode]
    """held-out openings for evaluation"""
    user: Callable[[list[Episode]], list[str | None]]
    """writes the next user turn of each dialogue, or None to end it"""
    reward: Callable[[list[Episode]], list[float]]
    """a score for each finished (or truncated) dialogue"""
    horizon: int
    """the largest number of assistant turns"""
    reference_scores: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    """known per-turn scores to read results against, e.g. {"optimal": [...], "random": [...]}"""
    policy: str | None = None
    """a policy that suits the task (a warm-started model folder), used when the script is given no model"""
    engines: list = dataclasses.field(default_factory=list)
    """rollout engines the task started (an LLM user's), for the script to close at the end"""
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    """dataset rows the task could not read, by cause (the scripts log them as `skipped/rows_<cause>`)"""
    recorded: list[Episode] = dataclasses.field(default_factory=list)
    """whole dialogues played by some other policy (a dataset's own, the guessing game's random consistent play):
    the offline contexts of the single-turn baselines (dpo_multiturn.py --contexts offline)"""


def evaluate_by_turn(task: Task, engine, tokenizer, max_tokens: int, temperature: float, seed: int, rank: int,
                     world_size: int) -> list[list[float]]:
    """Scores after each turn h = 1..H of this rank's share of the task's evaluation dialogues, played to H. The
    sampling seeds depend on (seed, rank, dialogue, turn) only and users answer a conversation the same way
    whenever asked, so evaluations of two policies stay paired until their dialogues differ."""
    mine = [Episode(copy.deepcopy(e.messages), copy.deepcopy(e.info)) for e in task.eval[rank::world_size]]
    episodes = rollout_dialogues(mine, engine, tokenizer, task.user, [task.horizon] * len(mine), max_tokens,
                                 temperature, (seed, "eval", rank))
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
