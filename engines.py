"""Rollout engines and the weight sync that keeps them in step with the trainer.

Rule: an engine samples turns from token ids and takes new weights; nothing here knows about dialogues or
algorithms. vLLM runs in the training process (one engine per rank, `external_launcher`); where vLLM is not
installed (GPU machines without it, tests) transformers `generate` offers the same interface. The trainer's FSDP2
shards reach the engine streamed in buckets, and every sync is checked by comparing the engine's log-probs of a
fixed probe sequence with the trainer's.

Copy it along with the script you fork; it is not a library.
"""

import dataclasses
import gc
import importlib.util
import os

import torch

import utils

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
        self.max_model_len = max_model_len
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

    def __init__(self, model_path: str, device: torch.device, dtype: torch.dtype, max_model_len: int | None = None,
                 batch_size: int = 64):
        self.model = utils.load_causal_lm(model_path, dtype, device).eval()
        self.asleep = False
        # the context the dialogue loop keeps prompts within, as with vLLM; by default the model's positions
        self.max_model_len = max_model_len or self.model.config.max_position_embeddings
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


def make_engine(model_path: str, device: torch.device, *, max_model_len: int, seed: int, bf16: bool,
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
    return TransformersEngine(model_path, device, torch.bfloat16 if bf16 else torch.float32, max_model_len)


# ----------------------------------------------------------------------------------------------------------
# weight sync: the trainer's weights into the engine, streamed, then checked


def weights_to_sync(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The tensors an engine needs, in the model's order: the state dict's parameters (a tied head under its own
    name too: vLLM's reload waits for `lm_head.weight`) and persistent buffers. Non-persistent buffers such as
    rotary `inv_freq` are derived from the config and are not handed over."""
    keys = model.state_dict().keys()
    return [(n, t) for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()] if n in keys]


def stream_weights(model: torch.nn.Module, dtype: torch.dtype, bucket_bytes: int):
    """Yields `(name, tensor)` unsharded in `dtype`, one bucket of at most `bucket_bytes` gathered at a time (a
    collective: all ranks must consume it in step; see `utils.gathered_buckets`): the extra memory of a sync is one
    bucket (or the largest tensor), not the model."""
    for bucket in utils.gathered_buckets(weights_to_sync(model), dtype, bucket_bytes):
        yield from bucket
        del bucket  # dropped before the next bucket is gathered


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
