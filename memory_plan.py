"""Per-rank memory plan of a colocated run (FSDP2 trainer + a vLLM engine on the same device), from the model's
config alone: the model is built on the meta device, so an 8B or 70B plan costs no memory and a second.

The terms follow what the code allocates: FSDP2 shards every parameter along dim 0 (`utils.shard_model`),
AdamW keeps two fp32 moments per parameter, the engine holds the whole model in its dtype (tensor parallel 1),
a weight sync adds one bucket (`engines.stream_weights`), a checkpoint's Hugging Face export one fp32 bucket
(`checkpoints.save_hf_folder`), FSDP2 gathers a decoder layer at a time in the compute dtype (and prefetches the next)
and keeps a root's own parameters gathered, the task's reward model and a colocated LLM user's engine are whole on
every rank, and activations are an upper bound from the run's longest sequence, labelled as such.

A run has two phases: rollout (the engine awake: sampling, the weight sync, evaluation, checkpoints) and training
(old log-probs, rewards, the optimizer steps). With `--engine_sleep` the engine frees its weights and KV cache while
the trainer trains, so the peak is the larger phase; without it every term is held at once. Either way the total
adds terms that never coexist within a phase (a sync and an export), so it is a bound. The policy engine's memory
share (vLLM's `gpu_memory_utilization`) defaults to what the rollout phase leaves it (`engine_memory_share`).
"""

import dataclasses
import math

import torch

import checkpoints
import engines
import utils

GiB = 2**30

DEVICE_SHARE = 0.9
"""the share of a GPU's memory the policy engine's default share is fitted into: the rest is for what no term counts
(the CUDA context, NCCL's buffers, the caching allocator's fragmentation, what a sleeping engine keeps)"""
DEFAULT_ENGINE_SHARE = 0.3
"""vLLM's memory share of an engine that does not sleep, of a colocated user's engine, and of every engine on a CPU
(there a share of the NUMA node's memory, next to a fixed KV cache: `engines.CPU_KV_CACHE_BYTES`)"""


@dataclasses.dataclass
class MemoryPlan:
    """Bytes per rank (rank 0, which holds the largest shard when a dimension does not divide evenly)."""

    parameters: int
    """parameters of the model (tied weights once; with LoRA the base model's)"""
    weights: int
    """fp32 master weight shard (with LoRA the frozen base's and the adapters')"""
    optimizer: int
    """AdamW's two fp32 moments for the shard of what trains (every weight, or with LoRA the adapters)"""
    reference: int
    """the frozen reference policy's shard (0 without a KL term, and with LoRA: the policy without its adapters)"""
    critic: int
    """a critic of the policy's shape trained beside it (MA-PPO): its fp32 shard, the gradients and AdamW state of
    what trains (with LoRA its own adapters and value head), and its root gathered in the compute dtype (0 without
    one)"""
    reward_model: int
    """the task's reward model, whole on every rank in the compute dtype (`dialogues.RewardModel`; 0 without one)"""
    gathered_root: int
    """the root FSDP2 unit's own parameters (embeddings, head, final norm) unsharded in the compute dtype, for the
    policy and the reference: FSDP2 keeps a root gathered from a forward to the end of its backward, and after a
    forward without backward (the sync's parity check, every forward of the frozen reference) until a reshard"""
    user_engine: int
    """a colocated LLM user's engine (`--user llm`): its weights in the engine dtype and its KV cache; it never
    sleeps (0 for a user on a server, from the dataset, or in code)"""
    engine_weights: int
    """the engine's full copy of the model in its dtype"""
    kv_cache: int
    """the engine's KV cache"""
    sync_bucket: int
    """the largest bucket a weight sync gathers, in the compute dtype"""
    checkpoint_bucket: int
    """the largest fp32 bucket a checkpoint's Hugging Face export gathers (same bucket size as the sync)"""
    gradients: int
    """fp32 gradient shard"""
    gathered_layers: int
    """two decoder layers unsharded in the compute dtype: the one running and the one FSDP2 prefetches"""
    activations: int
    """upper bound: saved activations of one micro-batch with every row at the longest sequence, plus the logits
    over its response columns"""
    engine_sleep: bool = False
    """the engine frees its weights and KV cache while the trainer trains (`--engine_sleep`)"""
    engine_memory_share: float = DEFAULT_ENGINE_SHARE
    """vLLM's `gpu_memory_utilization` for the policy's engine, as `policy_engine_share` chose it"""
    kv_bytes_per_token: int = 0
    """KV cache bytes of one token in the policy's engine"""
    trainable: int = 0
    """parameters that train (all of them; with LoRA the adapters'): not a term"""
    sync_bytes: int = 0
    """what one weight sync moves into the engine, in the compute dtype (with LoRA the adapted blocks' merged
    weights only): streamed in buckets, so not a term"""

    RESIDENT = ("weights", "optimizer", "reference", "critic", "reward_model", "gathered_root", "user_engine")
    """held in both phases"""
    ROLLOUT = ("engine_weights", "kv_cache", "sync_bucket", "checkpoint_bucket")
    """held while the engine is awake: a sync wakes its weights first, and checkpoints are written after evaluation"""
    TRAINING = ("gradients", "gathered_layers", "activations")
    """held while the trainer computes log-probs and takes its steps (gradients are freed after each step)"""

    def phase(self, terms: tuple[str, ...]) -> int:
        return sum(getattr(self, name) for name in self.RESIDENT + terms)

    @property
    def rollout(self) -> int:
        return self.phase(self.ROLLOUT)

    @property
    def training(self) -> int:
        return self.phase(self.TRAINING)

    @property
    def total(self) -> int:
        """The larger phase when the engine sleeps while the trainer trains, else every term at once."""
        if self.engine_sleep:
            return max(self.rollout, self.training)
        return self.phase(self.ROLLOUT + self.TRAINING)


def meta_model(config, lora: checkpoints.LoraArgs | None = None):
    """The causal LM of a transformers config (or a folder / hub id) on the meta device, with `lora` adapters when
    its rank is above 0: shapes, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config) if isinstance(config, str) else config
    with torch.device("meta"):
        return checkpoints.add_lora(AutoModelForCausalLM.from_config(config), lora)


def meta_reward_model(path: str, trust_remote_code: bool = False):
    """A reward model's shapes on the meta device: transformers' own sequence-classification class of its config's
    architecture, never the checkpoint's remote code (ArmoRM's config is a Llama one: a Llama-3-8B trunk and a linear
    head, where its own code has a small regression and gating head instead, about 12 MB in bf16). An architecture
    transformers has no such class for counts as its trunk alone, plus nothing for the head."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        try:
            return AutoModelForSequenceClassification.from_config(config)
        except ValueError:  # "Unrecognized configuration class": no classification head in transformers
            return AutoModel.from_config(config)


def shard_numel(shape: torch.Size, world_size: int) -> int:
    """Elements of rank 0's FSDP2 shard: dim 0 is split in chunks of ceil(rows / world_size)."""
    return math.ceil(shape[0] / world_size) * math.prod(shape[1:]) if len(shape) else 1


def largest_bucket(tensors: list[tuple[str, torch.Tensor]], itemsize: int, bucket_bytes: int) -> int:
    """Bytes of the largest bucket `utils.gathered_buckets` makes of `tensors` in a dtype of `itemsize` bytes."""
    nbytes = [utils.weight_numel(t) * itemsize for _, t in tensors]
    return max(sum(nbytes[i] for i in bucket) for bucket in utils.size_buckets(nbytes, bucket_bytes))


def plan_memory(model: torch.nn.Module, *, world_size: int, bf16: bool, gradient_checkpointing: bool,
                kv_cache_bytes: int, sync_bucket_bytes: int, rows: int, sequence_tokens: int, response_tokens: int,
                reference: bool = False, critic: bool = False, reward_model: torch.nn.Module | None = None,
                user_model: torch.nn.Module | None = None, user_kv_cache_bytes: int = 0,
                engine_sleep: bool = False) -> MemoryPlan:
    """The plan for an unsharded (meta or real) `model` trained on `world_size` ranks with micro-batches of `rows`
    sequences per rank, each at most `sequence_tokens` long (prompt and response, as `utils.batch_for_logprobs`
    lays them out), of which the last `response_tokens` columns get logits, next to an engine with a KV cache of
    `kv_cache_bytes`. Checkpoints export in buckets of `sync_bucket_bytes` too. `reward_model` and `user_model`
    (meta or real) are whole on every rank in the compute dtype, the user's engine with `user_kv_cache_bytes` of KV
    cache; `critic` adds a trained model of the policy's shape. A `model` with LoRA adapters (`meta_model`'s
    `lora`) trains only those: AdamW's state and the gradients are theirs, the reference is the model itself, and
    a sync moves only the adapted blocks."""
    compute = 2 if bf16 else 4
    parameters = sum(p.numel() for n, p in model.named_parameters() if ".lora_" not in n)  # tied weights once
    shard = sum(shard_numel(p.shape, world_size) for p in model.parameters())
    trained = sum(shard_numel(p.shape, world_size) for p in model.parameters() if p.requires_grad)
    reference = reference and not utils.lora_layers(model)  # with LoRA: the policy with its adapters off
    layer_sizes = [sum(p.numel() for n, p in block.named_parameters() if ".lora_" not in n)
                   for block in model.model.layers]
    root = parameters - sum(layer_sizes)  # embeddings, head, final norm: the root FSDP2 unit's own
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
    user = 0 if user_model is None else sum(p.numel() for p in user_model.parameters()) * compute + user_kv_cache_bytes
    return MemoryPlan(
        parameters=parameters, weights=4 * shard, optimizer=8 * trained, reference=4 * shard if reference else 0,
        critic=4 * shard + 12 * trained + root * compute if critic else 0,
        reward_model=0 if reward_model is None else sum(p.numel() for p in reward_model.parameters()) * compute,
        gathered_root=(2 if reference else 1) * root * compute, user_engine=user,
        engine_weights=parameters * compute, kv_cache=kv_cache_bytes,
        sync_bucket=largest_bucket(engines.weights_to_sync(model), compute, sync_bucket_bytes),
        checkpoint_bucket=largest_bucket(checkpoints.hf_export_tensors(model), 4, sync_bucket_bytes),
        gradients=4 * trained, gathered_layers=2 * max(layer_sizes) * compute,
        activations=rows * sequence_tokens * saved * compute + logits, engine_sleep=engine_sleep,
        kv_bytes_per_token=2 * layers * kv * compute,  # a key and a value per layer and KV head
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        sync_bytes=sum(utils.weight_numel(t) for _, t in engines.weights_to_sync(model)) * compute,
    )


def format_plan(plan: MemoryPlan, world_size: int) -> str:
    """The plan as lines for the log: each term under the phase that holds it, each phase's sum, and the total."""
    engine = "the engine sleeps while the trainer trains" if plan.engine_sleep else "the engine stays awake"
    lora = f", LoRA: {plan.trainable / 1e6:.1f}M trained" if plan.trainable < plan.parameters else ""
    lines = [f"memory plan per rank ({plan.parameters / 1e9:.2f}B parameters{lora}, {world_size} ranks; {engine}):"]
    for heading, terms in (("held throughout", plan.RESIDENT), ("rollout (engine awake)", plan.ROLLOUT),
                           ("training", plan.TRAINING)):
        lines.append(f"  {heading}:")
        for name in terms:
            # labelled, so that nobody reads the bound as a measurement
            label = "activations (bound)" if name == "activations" else name
            lines.append(f"    {label:<24} {getattr(plan, name) / GiB:8.2f} GiB")
    total = "total (the larger phase)" if plan.engine_sleep else "total (every term)"
    for label, nbytes in (("rollout phase", plan.rollout), ("training phase", plan.training), (total, plan.total)):
        lines.append(f"  {label:<26} {nbytes / GiB:8.2f} GiB")
    return "\n".join(lines)


def check_fits(plan: MemoryPlan, capacity: int) -> None:
    """Raises SystemExit, before anything is loaded, when the plan needs more than `capacity` bytes, naming the
    flag that shrinks the largest reducible term of what is held at the peak (the larger phase when the engine
    sleeps)."""
    if plan.total <= capacity:
        return
    advice = {
        "activations": "turn on --gradient_checkpointing or lower the pairs per forward",
        "kv_cache": "lower --kv_cache_gib or --engine_memory_share",
        "sync_bucket": "lower --sync_bucket_mb",
        "checkpoint_bucket": "lower --sync_bucket_mb (checkpoints export in buckets of the same size)",
        "optimizer": "run on more ranks (torchrun --nproc_per_node / --nnodes): the shards shrink with the ranks",
        "engine_weights": "the engine holds the whole model on every rank (tensor parallel 1): turn on --bf16, "
                          "or train a smaller model or on a device with more memory",
        "reward_model": "the reward model is whole on every rank: turn on --bf16 or use a smaller one",
        "user_engine": "serve the simulated user from its own GPUs (--user server), or lower --engine_memory_share "
                       "or --kv_cache_gib (its engine takes the same share)",
    }
    held = plan.RESIDENT + plan.ROLLOUT + plan.TRAINING
    if plan.engine_sleep:
        held = plan.RESIDENT + (plan.ROLLOUT if plan.rollout >= plan.training else plan.TRAINING)
    worst = max((name for name in advice if name in held), key=lambda name: getattr(plan, name))
    raise SystemExit(f"the memory plan needs {plan.total / GiB:.1f} GiB per rank but the device has "
                     f"{capacity / GiB:.1f} GiB; the largest reducible term is {worst} "
                     f"({getattr(plan, worst) / GiB:.1f} GiB): {advice[worst]}")


def user_engine_share(requested: float | None) -> float:
    """vLLM's memory share of a colocated LLM user's engine: `requested` (`--engine_memory_share`), else
    `DEFAULT_ENGINE_SHARE`. The user's engine starts with the task, before the policy is known, so the plan cannot
    size it; it never sleeps, and the policy's engine gets what it leaves (`policy_engine_share`)."""
    return DEFAULT_ENGINE_SHARE if requested is None else requested


def policy_engine_share(requested: float | None, plan: MemoryPlan, capacity: int, context_kv_bytes: int) -> float:
    """vLLM's `gpu_memory_utilization` for the policy's engine: the fraction of the device's total memory it may use
    (vLLM refuses to start unless that much is free, and gives its KV cache what its weights, activations and CUDA
    graphs leave of it). `requested` when given. On a GPU with the engine asleep while the trainer trains: what
    the rollout phase leaves it of `DEVICE_SHARE` of the device `capacity` (everything else the phase holds: the
    trainer's resident state, the reward model, the user's engine, the sync and export buckets); SystemExit when
    that is less than its weights and a KV cache of `context_kv_bytes` (one longest sequence). Otherwise
    `DEFAULT_ENGINE_SHARE`: an engine that does not sleep holds its share through training too."""
    if requested is not None:
        return requested
    if not capacity or not plan.engine_sleep:
        return DEFAULT_ENGINE_SHARE
    others = plan.rollout - plan.engine_weights - plan.kv_cache
    room = DEVICE_SHARE * capacity - others
    needed = plan.engine_weights + max(context_kv_bytes, plan.kv_cache)
    if room < needed:
        raise SystemExit(
            f"the policy's engine needs {needed / GiB:.1f} GiB (its weights, {plan.engine_weights / GiB:.1f} GiB, and "
            f"a KV cache of {max(context_kv_bytes, plan.kv_cache) / GiB:.1f} GiB), but the rollout phase leaves it "
            f"{max(room, 0) / GiB:.1f} GiB of {DEVICE_SHARE:g} x {capacity / GiB:.1f} GiB: the rest holds "
            f"{others / GiB:.1f} GiB (the trainer's shards and AdamW state, the reward model "
            f"{plan.reward_model / GiB:.1f} GiB, the user's engine {plan.user_engine / GiB:.1f} GiB, the sync and "
            "export buckets). Run on more ranks (the shards shrink), serve the user with --user server, or lower "
            "--max_context_tokens")
    return room / capacity


def share_line(plan: MemoryPlan, capacity: int, requested: float | None, max_model_len: int) -> str:
    """The policy engine's share for the log: how it was chosen and the KV cache it leaves, in tokens."""
    chosen = "as given" if requested is not None else "the default"
    if capacity and requested is None and plan.engine_sleep:
        chosen = f"what the rollout phase leaves of {DEVICE_SHARE:g} of the device"
    tokens = plan.kv_cache // plan.kv_bytes_per_token
    return (f"policy engine memory share {plan.engine_memory_share:.3f} ({chosen}): a KV cache of "
            f"{plan.kv_cache / GiB:.2f} GiB, {tokens:,} tokens, {tokens / max_model_len:.1f} contexts of "
            f"{max_model_len:,}" + (" (less vLLM's own activations and CUDA graphs)" if capacity else ""))


def run_plan(*, model_path: str, capacity: int, world_size: int, bf16: bool, gradient_checkpointing: bool,
             kv_cache_bytes: int | None, sync_bucket_mb: float, rows: int, sequence_tokens: int, response_tokens: int,
             reference: bool, engine_memory_share: float | None, engine_sleep: bool, max_model_len: int,
             critic: bool = False, reward_model: str | None = None, user_model: str | None = None,
             trust_remote_code: bool = False, lora: checkpoints.LoraArgs | None = None) -> MemoryPlan:
    """A run's plan on a device of `capacity` bytes (0: a CPU), with the policy engine's share resolved
    (`policy_engine_share`) and its KV cache sized from it as vLLM sizes it. A micro-batch is `rows` sequences of at
    most `sequence_tokens`, the last `response_tokens` of which get logits (`plan_memory`); the engine's context
    is `max_model_len`. `reward_model` and a colocated user's `user_model` (folders or hub ids; None without) are
    counted whole; `lora`: the policy's (and a critic's) adapters. Without a KV size vLLM sizes each engine's cache
    from its share on a GPU; on a CPU it is fixed (`engines.CPU_KV_CACHE_BYTES`)."""
    if kv_cache_bytes is None and not capacity:
        kv_cache_bytes = engines.CPU_KV_CACHE_BYTES
    user = None if user_model is None else meta_model(user_model)
    user_kv = kv_cache_bytes
    if user is not None and kv_cache_bytes is None:  # vLLM's own sizing: what the share leaves after the weights
        user_kv = max(0, int(user_engine_share(engine_memory_share) * capacity)
                      - sum(p.numel() for p in user.parameters()) * (2 if bf16 else 4))
    plan = plan_memory(
        meta_model(model_path, lora), world_size=world_size, bf16=bf16, gradient_checkpointing=gradient_checkpointing,
        kv_cache_bytes=kv_cache_bytes or 0, sync_bucket_bytes=int(sync_bucket_mb * 2**20), rows=rows,
        sequence_tokens=sequence_tokens, response_tokens=response_tokens, reference=reference, critic=critic,
        reward_model=None if reward_model is None else meta_reward_model(reward_model, trust_remote_code),
        user_model=user, user_kv_cache_bytes=user_kv or 0, engine_sleep=engine_sleep)
    share = policy_engine_share(engine_memory_share, plan, capacity, max_model_len * plan.kv_bytes_per_token)
    return dataclasses.replace(plan, engine_memory_share=share, kv_cache=kv_cache_bytes if kv_cache_bytes is not None
                               else max(0, int(share * capacity) - plan.engine_weights))


def plan_and_check(*, device: torch.device, **run) -> MemoryPlan:
    """The run's plan for this rank (`run_plan`, with the flags in `run`) on `device`, printed (rank 0) with the
    policy engine's share and, on CUDA, checked against the device before anything large is loaded. Start the
    policy's engine with the plan's `engine_memory_share`."""
    capacity = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    plan = run_plan(capacity=capacity, **run)
    utils.print0(format_plan(plan, run["world_size"]))
    utils.print0(share_line(plan, capacity, run["engine_memory_share"], run["max_model_len"]))
    if capacity:
        check_fits(plan, capacity)
    return plan
