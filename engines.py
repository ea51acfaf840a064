"""Rollout engines and the weight sync that keeps them in step with the trainer.

Rule: an engine samples turns from token ids and takes new weights; nothing here knows about dialogues or
algorithms. vLLM runs in the training process (one engine per rank, `external_launcher`); where vLLM is not
installed (GPU machines without it, tests) transformers `generate` offers the same interface. The trainer's FSDP2
shards reach the engine streamed in buckets, and every sync is checked twice: a few of the engine's own tensors are
read back and compared bitwise with the trainer's (staleness), and the engine's log-probs of a fixed probe answer are
compared with the trainer's (everything else: a wrong model, a missing tensor, a broken kernel).

Copy it along with the script you fork; it is not a library.
"""

import contextlib
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

        # vLLM freezes the heap once its engine has started (vllm.utils.gc_utils.freeze_gc_heap); freezing it now,
        # before, spares each of the start's own gc.collect() calls a scan of every object the imports and the
        # trainer made (about 0.4 s a call on a 2-core CPU, several calls a start)
        gc.freeze()

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
        self.enforce_eager = enforce_eager
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

    def read_weights(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The engine's own tensors under those of `names` it holds as plain tensors, by reference (for
        `check_weights_match`). vLLM's CPU build hands each linear layer's weight to its GEMM kernel in a packed
        form and keeps an empty placeholder: those are left out."""

        def read(worker) -> dict[str, torch.Tensor]:
            # get_model() unwraps the CUDA-graph wrapper of the GPU runner
            params = dict(worker.model_runner.get_model().named_parameters())
            return {n: params[n].detach() for n in names if n in params and params[n].numel() > 0}

        return self.llm.collective_rpc(read)[0]

    def prompt_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        from vllm import SamplingParams

        # vLLM ranks each prompt token among the vocabulary with a torch.compile'd kernel (batched_count_greater_than
        # in vllm/v1/sample/ops/logprobs.py). On an eager engine (the CPU build) compiling it would be the run's only
        # inductor compile, seconds per process for one short probe, so it runs eagerly; the log-probs are the same
        eager = torch.compiler.set_stance("force_eager") if self.enforce_eager else contextlib.nullcontext()
        with eager:
            out = self.llm.generate([{"prompt_token_ids": token_ids}],
                                    SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
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

    def read_weights(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The model's own tensors under those of `names` it has, by reference (for `check_weights_match`)."""
        state = self.model.state_dict()
        return {n: state[n] for n in names if n in state}

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


def weights_to_sync(model: torch.nn.Module) -> list[tuple[str, torch.Tensor | torch.nn.Module]]:
    """The tensors an engine needs, in the model's order, under the names of a model without adapters: the state
    dict's parameters (a tied head under its own name too: vLLM's reload waits for `lm_head.weight`) and persistent
    buffers. Non-persistent buffers such as rotary `inv_freq` are derived from the config and are not handed over.

    With LoRA only what training changes: the weights of the blocks (attention, MLP) that hold adapters, each
    adapted layer as its merged weight (`utils.gathered_buckets` merges it on this rank's rows), its unadapted
    siblings as they are, because vLLM fuses q/k/v and gate/up into one tensor that reloads only whole; every other
    tensor (embeddings, norms, head) is frozen and stays the engine's own."""
    weights = utils.hf_weights(model, remove_duplicate=False)
    blocks = {name.rsplit(".", 1)[0] for name in utils.lora_layers(model)}
    return [(n, t) for n, t in weights if n.rsplit(".", 2)[0] in blocks] if blocks else weights


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


PROBE_ANSWER = (
    "A fixed answer used to compare log-probs. After every weight sync the trainer and the rollout engine both "
    "score these same tokens, and the run goes on only while their log-probs agree, on average, to within what "
    "the rounding of the engine's number format allows. It is plain prose, like most of what a policy writes."
)
"""The answer of the probe sequence (over 48 tokens, so that a percentile of its per-token gaps means something)"""

SYNC_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.15}
"""The largest mean |trainer - engine| log-prob gap (nats per token of the probe's answer) accepted by a sync
check, by the engine's dtype. Measured with SmolLM2-135M on CPU, ten openings: in fp32 vLLM and FSDP2 agree to
1e-5 on average, so 1e-3 is headroom for rounding only. In bf16 each side rounds its logits to bf16 (a step of
0.06 at a logit of 10) and its layers differently: vLLM against FSDP2 gave means of 0.048-0.060 (p95 up to 0.16,
single tokens up to 0.4), while one of the 272 tensors left unloaded (zeroed) gave 0.25-3.2. 0.15 is 2.5 times
the noise and below the smallest fault. An engine one small optimizer step behind is not what these bounds are for
(every weight moved by one bf16 step gave a bf16 mean of 0.07, barely above the noise): `check_weights_match` is."""


def probe_sequence(tokenizer, opening_ids: list[int], max_len: int) -> tuple[list[int], int]:
    """The probe the sync checks score: a training opening (templated, with its generation prompt) answered by
    `PROBE_ANSWER` and the end-of-turn token, the answer cut so that the probe stays shorter than `max_len` (the
    engine's context: vLLM scores a prompt only if one token still fits after it). Returns the probe's ids and the
    position where its answer starts."""
    answer = tokenizer(PROBE_ANSWER, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    room = max_len - 1 - len(opening_ids)
    if room < 1:
        raise ValueError(f"the probe's opening ({len(opening_ids)} tokens) leaves no room for an answer in the "
                         f"engine's context of {max_len} tokens")
    return opening_ids + answer[:room], len(opening_ids)


class WeightSyncError(RuntimeError):
    pass


def readback_names(num_layers: int) -> list[str]:
    """The tensors `check_weights_match` reads back: the embedding, the final norm, and the input norm, attention
    output and MLP output projections of a middle and of the last decoder layer. transformers and vLLM name and
    shape these alike (vLLM fuses q/k/v and gate/up, so those are not among them)."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in sorted({(num_layers - 1) // 2, num_layers - 1}):
        names += [f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.self_attn.o_proj.weight",
                  f"model.layers.{i}.mlp.down_proj.weight"]
    return names


def check_weights_match(engine, model: torch.nn.Module) -> int:
    """Reads a few of the engine's own tensors back (`readback_names`, those the engine holds as plain tensors) and
    compares them bitwise with the trainer's, cast to the engine's dtype as a sync casts them; returns how many were
    compared (vLLM's CPU build holds only the embedding and the norms that way). Raises `WeightSyncError` naming the
    first that differs.

    This is the test for a stale engine: a small optimizer step changes the log-probs by less than bf16 rounding
    does, so no log-prob comparison can tell a stale engine from a fresh one, and equal bits can. The trainer's
    tensors are gathered one at a time (a collective: all ranks call this in step; every rank gathers them all
    before it raises).
    """
    trainer_weights = dict(utils.hf_weights(model, remove_duplicate=False))  # with LoRA the frozen ones too
    held = engine.read_weights([n for n in readback_names(len(model.model.layers)) if n in trainer_weights])
    if not held:
        raise WeightSyncError("the rollout engine holds none of the tensors the weight check reads back")
    differing = []
    for [(name, expected)] in utils.gathered_buckets([(n, trainer_weights[n]) for n in held], engine.dtype, 0):
        # vLLM pads the embedding's rows to a multiple of 64: the rows past the vocabulary are not the trainer's
        actual = held[name][: len(expected)]
        if not torch.equal(actual.to(expected.device), expected):
            differing.append(name)
    if differing:
        raise WeightSyncError(
            f"the rollout engine's {differing[0]} differs from the trainer's ({len(differing)} of {len(held)} tensors "
            "read back differ): the engine is not sampling from the weights being trained"
        )
    return len(held)


def logprob_gap(engine, model: torch.nn.Module, probe_ids: list[int], answer_start: int,
                device: torch.device) -> dict[str, float]:
    """The |trainer - engine| log-probs of the probe's answer tokens (`probe_ids[answer_start:]`), summarized as
    "mean", "p95" and "max". The opening's tokens are left out: the trainer scores answers, and an opening's rare
    tokens (its first words, template markers) carry the largest and least telling bf16 gaps."""
    trainer = probe_logprobs(model, probe_ids, device)
    gaps = (trainer - engine.prompt_logprobs(probe_ids)).abs()[answer_start - 1 :]  # entry k scores token k + 1
    return {"mean": gaps.mean().item(), "p95": torch.quantile(gaps, 0.95).item(), "max": gaps.max().item()}


def check_logprob_parity(engine, model: torch.nn.Module, probe_ids: list[int], answer_start: int,
                         device: torch.device, tolerance: float | None = None) -> dict[str, float]:
    """`logprob_gap`, checked: raises `WeightSyncError` when the mean gap exceeds `tolerance` (None: the engine
    dtype's `SYNC_TOLERANCE`). The mean, not the max, because in bf16 one token's gap says more about rounding
    than about the weights."""
    tolerance = SYNC_TOLERANCE[engine.dtype] if tolerance is None else tolerance
    gap = logprob_gap(engine, model, probe_ids, answer_start, device)
    if not gap["mean"] <= tolerance:
        raise WeightSyncError(
            f"the rollout engine's log-probs of the probe's answer differ from the trainer's by {gap['mean']:.3g} on "
            f"average (p95 {gap['p95']:.3g}, max {gap['max']:.3g}; tolerance {tolerance:g}): the engine does not "
            "compute what the trainer computes"
        )
    return gap


def check_sync(engine, model: torch.nn.Module, probe_ids: list[int], answer_start: int, device: torch.device,
               tolerance: float | None = None) -> dict[str, float]:
    """Both checks of the engine's weights, the bitwise read-back (`check_weights_match`) first, then the log-prob
    gap (`check_logprob_parity`). Returns what the scripts log under `sync/`: "logprob_gap" (the mean),
    "logprob_gap_p95", "logprob_gap_max" and "tensors_checked"."""
    checked = check_weights_match(engine, model)
    gap = check_logprob_parity(engine, model, probe_ids, answer_start, device, tolerance)
    return {"logprob_gap": gap["mean"], "logprob_gap_p95": gap["p95"], "logprob_gap_max": gap["max"],
            "tensors_checked": checked}


def sync_weights(engine, model: torch.nn.Module, probe_ids: list[int], answer_start: int, device: torch.device,
                 tolerance: float | None = None, bucket_mb: float = 512) -> dict[str, float]:
    """Pushes the trainer's weights into the rollout engine, streamed in buckets of `bucket_mb` MiB in the
    engine's dtype (see `stream_weights`), then proves they arrived (`check_sync`, whose metrics it returns).

    Peers' quietest bug is an engine that keeps sampling from stale weights; the bitwise read-back catches it
    even when one step changed the weights by a single rounding step, and the log-prob gap catches what a few
    tensors cannot show.
    """
    engine.load_weights(stream_weights(model, engine.dtype, int(bucket_mb * 2**20)))
    return check_sync(engine, model, probe_ids, answer_start, device, tolerance)
