"""Per-rank memory plan of a colocated run (FSDP2 trainer + a vLLM engine on the same device), from the model's
config alone: the model is built on the meta device, so an 8B or 70B plan costs no memory and a second.

The terms follow what the code allocates: FSDP2 shards every parameter along dim 0 (`utils.shard_model`),
AdamW keeps two fp32 moments per parameter, the engine holds the whole model in its dtype (tensor parallel 1),
a weight sync adds one bucket (`engines.stream_weights`), a checkpoint's Hugging Face export one fp32 bucket
(`checkpoints.save_hf_folder`), FSDP2 gathers a decoder layer at a time in the compute dtype (and prefetches the next),
and activations are an upper bound from the run's longest sequence, labelled as such. The total adds terms that
never coexist (a sync, an export, a training step's activations), so it too is a bound.
"""

import dataclasses
import math

import torch

import checkpoints
import engines
import utils

GiB = 2**30


@dataclasses.dataclass
class MemoryPlan:
    """Bytes per rank (rank 0, which holds the largest shard when a dimension does not divide evenly)."""

    parameters: int
    """parameters of the model (tied weights once)"""
    weights: int
    """fp32 master weight shard"""
    gradients: int
    """fp32 gradient shard"""
    optimizer: int
    """AdamW's two fp32 moments for the shard"""
    reference: int
    """the frozen reference policy's shard (0 without a KL term)"""
    gathered_layers: int
    """two decoder layers unsharded in the compute dtype: the one running and the one FSDP2 prefetches"""
    engine_weights: int
    """the engine's full copy of the model in its dtype"""
    kv_cache: int
    """the engine's KV cache"""
    sync_bucket: int
    """the largest bucket a weight sync gathers, in the compute dtype"""
    checkpoint_bucket: int
    """the largest fp32 bucket a checkpoint's Hugging Face export gathers (same bucket size as the sync)"""
    activations: int
    """upper bound: saved activations of one micro-batch with every row at the longest sequence, plus the logits
    over its response columns"""

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "parameters")


def meta_model(config):
    """The causal LM of a transformers config (or a folder / hub id) on the meta device: shapes, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config) if isinstance(config, str) else config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def shard_numel(shape: torch.Size, world_size: int) -> int:
    """Elements of rank 0's FSDP2 shard: dim 0 is split in chunks of ceil(rows / world_size)."""
    return math.ceil(shape[0] / world_size) * math.prod(shape[1:]) if len(shape) else 1


def largest_bucket(tensors: list[tuple[str, torch.Tensor]], itemsize: int, bucket_bytes: int) -> int:
    """Bytes of the largest bucket `utils.gathered_buckets` makes of `tensors` in a dtype of `itemsize` bytes."""
    nbytes = [t.numel() * itemsize for _, t in tensors]
    return max(sum(nbytes[i] for i in bucket) for bucket in utils.size_buckets(nbytes, bucket_bytes))


def plan_memory(model: torch.nn.Module, *, world_size: int, bf16: bool, gradient_checkpointing: bool,
                kv_cache_bytes: int | None, sync_bucket_bytes: int, rows: int, sequence_tokens: int,
                response_tokens: int, reference: bool = False, engine_memory_bytes: int = 0) -> MemoryPlan:
    """The plan for an unsharded (meta or real) `model` trained on `world_size` ranks with micro-batches of `rows`
    sequences per rank, each at most `sequence_tokens` long (prompt and response, as `utils.batch_for_logprobs`
    lays them out), of which the last `response_tokens` columns get logits. Checkpoints export in buckets of
    `sync_bucket_bytes` too. `kv_cache_bytes` None is vLLM's own sizing: what `engine_memory_bytes` (its share of
    the device) leaves after the engine's weights."""
    compute = 2 if bf16 else 4
    parameters = sum(p.numel() for p in model.parameters())  # tied weights once, as the engine holds them
    shard = sum(shard_numel(p.shape, world_size) for p in model.parameters())
    layer = max(sum(p.numel() for p in block.parameters()) for block in model.model.layers)
    config = model.config
    hidden, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (getattr(config, "head_dim", None) or hidden // config.num_attention_heads)
    # saved per token and layer in a Llama-style block: both norms' inputs and outputs (4h), q/k/v (h + 2 kv),
    # the attention output (h), gate, up, act(gate) and their product (4 i); with checkpointing only the layer's
    # input is kept and one layer is recomputed at a time
    per_layer = 6 * hidden + 2 * kv + 4 * config.intermediate_size
    saved = layers * hidden + per_layer if gradient_checkpointing else layers * per_layer
    # `utils.token_logprobs` projects onto the vocabulary over the response columns only (`logits_to_keep`): the
    # head's output there and its fp32 copy for the log-softmax
    logits = rows * response_tokens * config.vocab_size * (compute + 4)
    return MemoryPlan(
        parameters=parameters, weights=4 * shard, gradients=4 * shard, optimizer=8 * shard,
        reference=4 * shard if reference else 0, gathered_layers=2 * layer * compute,
        engine_weights=parameters * compute,
        kv_cache=kv_cache_bytes if kv_cache_bytes is not None else max(0, engine_memory_bytes - parameters * compute),
        sync_bucket=largest_bucket(engines.weights_to_sync(model), compute, sync_bucket_bytes),
        checkpoint_bucket=largest_bucket(checkpoints.hf_export_tensors(model), 4, sync_bucket_bytes),
        activations=rows * sequence_tokens * saved * compute + logits,
    )


def format_plan(plan: MemoryPlan, world_size: int) -> str:
    """The plan as lines for the log."""
    lines = [f"memory plan per rank ({plan.parameters / 1e9:.2f}B parameters, {world_size} ranks):"]
    for field in dataclasses.fields(plan):
        if field.name != "parameters":
            # labelled, so that nobody reads the bound as a measurement
            label = "activations (bound)" if field.name == "activations" else field.name
            lines.append(f"  {label:<20} {getattr(plan, field.name) / GiB:8.2f} GiB")
    lines.append(f"  {'total':<20} {plan.total / GiB:8.2f} GiB")
    return "\n".join(lines)


def check_fits(plan: MemoryPlan, capacity: int) -> None:
    """Raises SystemExit, before anything is loaded, when the plan needs more than `capacity` bytes, naming the
    flag that shrinks its largest reducible term."""
    if plan.total <= capacity:
        return
    advice = {
        "activations": "turn on --gradient_checkpointing or lower the pairs per forward",
        "kv_cache": "lower --kv_cache_gib",
        "sync_bucket": "lower --sync_bucket_mb",
        "checkpoint_bucket": "lower --sync_bucket_mb (checkpoints export in buckets of the same size)",
        "optimizer": "run on more ranks (torchrun --nproc_per_node / --nnodes): the shards shrink with the ranks",
        "engine_weights": "the engine holds the whole model on every rank (tensor parallel 1): turn on --bf16, "
                          "or train a smaller model or on a device with more memory",
    }
    worst = max(advice, key=lambda name: getattr(plan, name))
    raise SystemExit(f"the memory plan needs {plan.total / GiB:.1f} GiB per rank but the device has "
                     f"{capacity / GiB:.1f} GiB; the largest reducible term is {worst} "
                     f"({getattr(plan, worst) / GiB:.1f} GiB): {advice[worst]}")


def plan_and_check(*, model_path: str, device: torch.device, world_size: int, bf16: bool,
                   gradient_checkpointing: bool, kv_cache_bytes: int | None, sync_bucket_mb: float, rows: int,
                   sequence_tokens: int, response_tokens: int, reference: bool,
                   engine_memory_share: float) -> MemoryPlan:
    """A run's plan for this rank, printed (rank 0) and, on CUDA, checked against the device before anything large
    is loaded. A micro-batch is `rows` sequences of at most `sequence_tokens`, the last `response_tokens` of which
    get logits (`plan_memory`). Without a KV size vLLM sizes the cache itself: from its memory share on a GPU, a
    fixed size on CPU."""
    capacity = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    if kv_cache_bytes is None and not capacity:
        kv_cache_bytes = engines.CPU_KV_CACHE_BYTES
    plan = plan_memory(meta_model(model_path), world_size=world_size, bf16=bf16,
                       gradient_checkpointing=gradient_checkpointing, kv_cache_bytes=kv_cache_bytes,
                       sync_bucket_bytes=int(sync_bucket_mb * 2**20), rows=rows, sequence_tokens=sequence_tokens,
                       response_tokens=response_tokens, reference=reference,
                       engine_memory_bytes=int(engine_memory_share * capacity))
    utils.print0(format_plan(plan, world_size))
    if capacity:
        check_fits(plan, capacity)
    return plan
