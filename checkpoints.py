"""Checkpoints of the four scripts: written atomically, resumed exactly.

Rule: a checkpoint holds everything a run needs to continue as if it had never stopped (every trained model's and
optimizer's shards, each rank's random states, the loop's own state) plus the policy as a Hugging Face folder, and
it counts only once complete: it is written to a temporary folder, listed in a manifest written last, and renamed.
No rank ever holds the whole model while writing one.

The same holds for reading a model: `load_sharded` builds it on the meta device, shards it, and fills each rank's
shards with only that rank's rows of the Hugging Face checkpoint's safetensors files, so a rank's host memory grows
with its shard, not with the model.

Copy it along with the script you fork; it is not a library.
"""

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

import utils


def save_checkpoint(run_dir: str, iteration: int, trained: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]],
                    trainer_state: dict, tokenizer, export: str = "policy", bucket_bytes: int = 2**29,
                    export_merged: bool = False) -> str:
    """Writes `runs/<run>/checkpoints/iteration_<n>/`, atomically (a temporary folder renamed when complete).

    - `dcp/`: every trained model's and optimizer's shards (torch.distributed.checkpoint; MA-PPO has two); with
      LoRA only what trains (`trained_state`): adapters, a critic's value head, their optimizer state;
    - `hf/`: the `export` model in Hugging Face format, fp32 (`save_hf_folder`: gathered `bucket_bytes` at a time);
      with LoRA its adapter folder (`save_adapter_folder`), and with `export_merged` the merged model in `hf_merged/`;
    - `rank<r>.pt`: each rank's random states and the loop's own state (schedulers, data order, counters);
    - `manifest.json`, written last: every file and its size, so `latest_checkpoint` can tell a complete one.
    """
    rank = dist.get_rank()
    final = os.path.join(run_dir, "checkpoints", f"iteration_{iteration:06d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    state = {}
    for name, (model, optimizer) in trained.items():
        model.reshard()  # a forward without backward leaves FSDP2's root parameters unsharded
        state[f"model/{name}"], state[f"optim/{name}"] = trained_state(model, optimizer)
    dcp.save(state, checkpoint_id=os.path.join(tmp, "dcp"))
    exported = trained[export][0]
    if utils.lora_layers(exported):
        save_adapter_folder(exported, os.path.join(tmp, "hf"), tokenizer)
    if export_merged or not utils.lora_layers(exported):
        save_hf_folder(exported, os.path.join(tmp, "hf_merged" if export_merged else "hf"), tokenizer, bucket_bytes)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save({"rng": rng, "trainer_state": trainer_state}, os.path.join(tmp, f"rank{rank}.pt"))
    dist.barrier()
    if rank == 0:
        files = {os.path.relpath(os.path.join(d, f), tmp): os.path.getsize(os.path.join(d, f))
                 for d, _, names in os.walk(tmp) for f in names}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump({"iteration": iteration, "world_size": dist.get_world_size(), "files": files}, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    dist.barrier()
    return final


def trained_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The model's and the optimizer's state dicts as a checkpoint holds them (`get_state_dict`): every weight, or
    with LoRA only those that train, a frozen weight left out under every name it has (a tied head too: the base
    model's own folder holds them, read again on resume)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in model_state.items() if k not in frozen}, optimizer_state


def save_adapter_folder(model: torch.nn.Module, folder: str, tokenizer) -> None:
    """Writes a LoRA model's adapters as the folder `peft` saves and `PeftModel.from_pretrained(base, folder)` loads
    (`adapter_config.json`, `adapter_model.safetensors` under peft's names, fp32), with the tokenizer. A collective
    (the adapters are gathered, a few MB); rank 0 writes."""
    from safetensors.torch import save_file

    adapters = [(n, p) for n, p in model.named_parameters() if ".lora_" in n]
    tensors = {}
    for bucket in utils.gathered_buckets(adapters, torch.float32, 0):
        tensors.update({"base_model.model." + n.replace(".default.", "."): t.cpu().contiguous() for n, t in bucket})
    if dist.get_rank() == 0:
        os.makedirs(folder, exist_ok=True)
        save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
        config = model.peft_config["default"]
        config.base_model_name_or_path = model.config.name_or_path
        config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)


def hf_export_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor | torch.nn.Module]]:
    """The named tensors `save_hf_folder` writes, in order: the state dict's parameters (a tied weight once, under
    its first name) and persistent buffers, under the names of a model without adapters (`utils.hf_weights`: a
    LoRA layer stands for its merged weight)."""
    return utils.hf_weights(model)


def save_hf_folder(model: torch.nn.Module, folder: str, tokenizer, bucket_bytes: int) -> None:
    """Writes an FSDP2-sharded causal LM as a Hugging Face folder that transformers and vLLM load: config, generation
    config, tokenizer, and the weights in fp32 (the master weights, as trained) as safetensors shards with their
    index. A collective: every rank gathers one bucket of at most `bucket_bytes` at a time and rank 0 writes it as
    one shard, so no rank ever holds the whole model (`memory_plan` counts the bucket). Tied weights are written
    once, under the first name, as `save_pretrained` does."""
    from safetensors.torch import save_file

    tensors = hf_export_tensors(model)
    count = len(utils.size_buckets([utils.weight_numel(t) * 4 for _, t in tensors], bucket_bytes))
    index, total = {}, 0
    if dist.get_rank() == 0:
        os.makedirs(folder, exist_ok=True)
    for k, bucket in enumerate(utils.gathered_buckets(tensors, torch.float32, bucket_bytes), start=1):
        if dist.get_rank() == 0:
            shard = f"model-{k:05d}-of-{count:05d}.safetensors"
            save_file({n: t.cpu().contiguous() for n, t in bucket}, os.path.join(folder, shard),
                      metadata={"format": "pt"})
            index.update({n: shard for n, _ in bucket})
            total += sum(t.numel() * 4 for _, t in bucket)
        del bucket
    if dist.get_rank() == 0:
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": index}, f, indent=2)
        model.config.save_pretrained(folder)
        model.generation_config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)


def checkpoint_problem(path: str) -> str | None:
    """Why a checkpoint folder cannot be resumed from (no manifest, a file missing or of another size), or None."""
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        return f"no readable manifest ({e})"
    for name, size in manifest["files"].items():
        file = os.path.join(path, name)
        if not os.path.exists(file) or os.path.getsize(file) != size:
            return f"{name} is missing or has another size than when it was written"
    if manifest["world_size"] != dist.get_world_size():
        return f"written by {manifest['world_size']} ranks, resumed with {dist.get_world_size()}"
    return None


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint of a run; an incomplete or damaged newer one is reported and passed over."""
    folder = os.path.join(run_dir, "checkpoints")
    done = sorted(d for d in os.listdir(folder) if d.startswith("iteration_") and not d.endswith(".tmp")) \
        if os.path.isdir(folder) else []
    for name in reversed(done):
        problem = checkpoint_problem(os.path.join(folder, name))
        if problem is None:
            return os.path.join(folder, name)
        utils.print0(f"warning: checkpoint {name} is not usable, {problem}; trying the one before")
    return None


def load_checkpoint(path: str, trained: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]) -> dict:
    """Restores every trained model and optimizer and this rank's random states; returns the loop's saved state."""
    state = {}
    for name, (model, optimizer) in trained.items():
        model.reshard()
        state[f"model/{name}"], state[f"optim/{name}"] = trained_state(model, optimizer)
    dcp.load(state, checkpoint_id=os.path.join(path, "dcp"))
    for name, (model, optimizer) in trained.items():
        frozen = any(not p.requires_grad for p in model.parameters())  # with LoRA the base is not in the checkpoint
        set_state_dict(model, optimizer, model_state_dict=state[f"model/{name}"],
                       optim_state_dict=state[f"optim/{name}"], options=StateDictOptions(strict=not frozen))
    saved = torch.load(os.path.join(path, f"rank{dist.get_rank()}.pt"), weights_only=False)
    random.setstate(saved["rng"]["python"])
    np.random.set_state(saved["rng"]["numpy"])
    torch.set_rng_state(saved["rng"]["torch"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["rng"]["cuda"])
    return saved["trainer_state"]


# ----------------------------------------------------------------------------------------------------------
# a Hugging Face folder read straight into FSDP2 shards


def safetensors_files(path: str) -> list[str] | None:
    """The safetensors files of a model folder or hub id, as its index lists them (a hub id resolves through the
    Hugging Face cache, downloaded there first if missing, as `from_pretrained` does); None when it has none."""
    from huggingface_hub import snapshot_download

    folder = path if os.path.isdir(path) else snapshot_download(path, allow_patterns=["model*.safetensors*"])
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return [os.path.join(folder, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
    single = os.path.join(folder, "model.safetensors")
    return [single] if os.path.exists(single) else None


def rank_rows(rows: int) -> tuple[int, int]:
    """This rank's rows [start, stop) of a tensor FSDP2 shards along dim 0: chunks of ceil(rows / ranks), as
    `torch.chunk` cuts them (the last ranks may get fewer, or none; `memory_plan.shard_numel` counts the same)."""
    chunk = math.ceil(rows / dist.get_world_size())
    start = min(dist.get_rank() * chunk, rows)
    return start, min(start + chunk, rows)


def derived_buffer_modules(model: torch.nn.Module) -> list[str] | None:
    """The modules whose only state is non-persistent buffers computed from the config (rotary embeddings'
    `inv_freq`: in no checkpoint), by name, when each can be built again as `type(module)(module.config)`; None
    when some other module holds a non-persistent buffer."""
    names = []
    for name, module in model.named_modules():
        if module._non_persistent_buffers_set:
            if module._parameters or set(module._buffers) != module._non_persistent_buffers_set \
                    or not hasattr(module, "config"):
                return None
            names.append(name)
    return names


def state_tensors(model: torch.nn.Module) -> list[tuple[list[str], torch.Tensor]]:
    """The state dict's tensors, each once with every name it goes by (a tied weight has two)."""
    keys, found = model.state_dict().keys(), {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if name in keys:
            found.setdefault(id(tensor), (tensor, []))[1].append(name)
    return [(names, tensor) for tensor, names in found.values()]


@torch.no_grad()
def fill_from_safetensors(model: torch.nn.Module, files: list[str]) -> list[str]:
    """Copies into the (sharded, materialized) `model` each tensor's local rows from `files`, under whichever of its
    names they hold it, cast to the model's dtype; a tensor that is not an FSDP2 shard is read whole. Returns the
    names of the tensors no file holds, which are set to zero."""
    from safetensors import safe_open

    missing = []
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(f, framework="pt")) for f in files]
        stored = {name: handle for handle in handles for name in handle.keys()}
        for names, tensor in state_tensors(model):
            if any(".lora_" in n for n in names):  # adapters are no checkpoint's: `init_lora` sets them
                continue
            names = [n.replace(".base_layer.", ".") for n in names]  # an adapted layer's weight, as it is stored
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            name = next((n for n in names if n in stored), None)
            if name is None:
                local.zero_()
                missing.append(names[0])
                continue
            rows = stored[name].get_slice(name)  # reads only the rows asked for
            local.copy_(rows[slice(*rank_rows(tensor.shape[0]))] if isinstance(tensor, DTensor) else rows[:])
    return missing


# ----------------------------------------------------------------------------------------------------------
# LoRA adapters (peft): added as a model loads, off for the reference


@dataclasses.dataclass
class LoraArgs:
    """LoRA instead of full fine-tuning, the same in the four scripts: a script attaches them as
    `lora: Annotated[LoraArgs, tyro.conf.arg(name="")]`, so that they read `--lora_rank`, ... on its command line.
    The base weights stay frozen (and sharded); only the adapters (and a critic's value head) train."""

    lora_rank: int = 0
    """rank r of the adapters (peft's LoRA); 0 trains every weight (full fine-tuning). Common values: 8 to 64
    (peft's default: 8)"""
    lora_alpha: float = 16.0
    """the adapters' update is scaled by alpha / r. Common values: 16 to 32, or twice the rank (peft's default: 8)"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input in the training forwards (those that take gradients; the scoring forwards,
    old log-probs and sync checks, never drop). Common values: 0 to 0.1 (peft's default: 0)"""
    lora_target_modules: tuple[str, ...] = ("all-linear",)
    """the linear layers that get adapters, by name (`q_proj v_proj`, the LoRA paper's choice); `all-linear`: every
    linear projection of the attention and MLP blocks (for Llama q/k/v/o_proj and gate/up/down_proj)"""
    export_merged: bool = False
    """with LoRA a checkpoint's `hf/` is the adapter folder `peft` loads (`PeftModel.from_pretrained`); this also
    writes the merged model, a plain Hugging Face folder, to `hf_merged/`"""


def check_lora_args(lora: LoraArgs) -> list[str]:
    """What is wrong with the LoRA flags, one message per problem."""
    return [message for bad, message in [
        (lora.lora_rank < 0, "--lora_rank must be >= 0 (0: full fine-tuning)"),
        (lora.lora_alpha <= 0, "--lora_alpha must be > 0: it scales the adapters' update"),
        (not 0 <= lora.lora_dropout < 1, "--lora_dropout must be in [0, 1)"),
        (not lora.lora_target_modules, "--lora_target_modules needs at least one name"),
        (lora.export_merged and lora.lora_rank == 0, "--export_merged needs --lora_rank > 0 (full fine-tuning "
                                                     "exports the whole model already)"),
    ] if bad]


class TrainingDropout(torch.nn.Dropout):
    """Dropout only in forwards that take gradients: the scripts run their models in eval mode, and a forward
    without gradients (old log-probs, the reference, the sync checks) must be deterministic."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(x, self.p, training=torch.is_grad_enabled())


def add_lora(model: torch.nn.Module, lora: LoraArgs | None) -> torch.nn.Module:
    """Adds LoRA adapters (`peft.inject_adapter_in_model`, in place: the model keeps its class and names, its
    adapted layers' weights under `<layer>.base_layer.weight`) to the decoder layers' linear layers that
    `lora.lora_target_modules` names, and freezes every other weight but a task head (a critic's value head, which
    the base checkpoint does not train). Works on the meta device; `init_lora` gives the adapters their values.
    A model without decoder layers of linear layers, or a name none of them has, is refused."""
    if lora is None or lora.lora_rank == 0:
        return model
    import peft

    layers = getattr(getattr(model, "model", None), "layers", None)
    names = sorted({n.rsplit(".", 1)[-1] for n, m in layers.named_modules() if isinstance(m, torch.nn.Linear)}) \
        if layers is not None else []
    if not names:
        raise SystemExit(f"--lora_rank: {type(model).__name__} has no decoder layers of linear layers "
                         "(model.model.layers) for LoRA adapters; train it with --lora_rank 0")
    targets = names if "all-linear" in lora.lora_target_modules else list(lora.lora_target_modules)
    unknown = sorted(set(targets) - set(names))
    if unknown:
        raise SystemExit(f"--lora_target_modules: {type(model).__name__} has no linear layers named {unknown} in its "
                         f"decoder layers; it has {names}")
    # a regular expression (peft matches it against whole module names): the decoder layers' linear layers only
    pattern = rf"model\.layers\.\d+\..*\.({'|'.join(targets)})"
    config = peft.LoraConfig(r=lora.lora_rank, lora_alpha=lora.lora_alpha, target_modules=pattern,
                             lora_dropout=lora.lora_dropout)
    peft.inject_adapter_in_model(config, model)
    for layer in utils.lora_layers(model).values():
        if lora.lora_dropout > 0:
            layer.lora_dropout["default"] = TrainingDropout(lora.lora_dropout)
    output = model.get_output_embeddings()
    for name, parameter in model.named_parameters():
        if not name.startswith("model.") and (output is None or parameter is not output.weight):
            parameter.requires_grad_(True)  # a task head: new, or a reward model's, trained whole
    return model


@torch.no_grad()
def init_lora(model: torch.nn.Module, seed: int = 0) -> None:
    """Gives the adapters peft's initial values on every rank alike whatever the number of ranks: A uniform as
    `kaiming_uniform_(a=sqrt(5))` from one generator (`seed`) in the model's order, B zero, so that the adapted
    model starts as the base model. Each rank copies its own rows of A; sharded or not."""
    generator = torch.Generator().manual_seed(seed)
    for layer in utils.lora_layers(model).values():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        full = torch.empty(a.shape)
        torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=generator)
        if isinstance(a, DTensor):
            a, full = a.to_local(), full[slice(*rank_rows(a.shape[0]))]
        a.copy_(full)
        b.zero_()


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """The model without its adapters inside the block: the base model, i.e. the initial policy."""
    layers = utils.lora_layers(model).values()
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class WithoutAdapters:
    """A LoRA model with its adapters off, called like a model, without gradients: the initial policy as a
    reference without a second copy of the weights."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @torch.no_grad()
    def __call__(self, **inputs):
        with adapters_disabled(self.model):
            return self.model(**inputs)


# ----------------------------------------------------------------------------------------------------------
# a model loaded into FSDP2 shards


def load_sharded(path: str, auto_class, device: torch.device | str, *, bf16: bool, gradient_checkpointing: bool = False,
                 config=None, lora: LoraArgs | None = None) -> tuple[torch.nn.Module, list[str]]:
    """`auto_class` (an `AutoModelFor...`) of the folder or hub id `path` (with `config`, default its own) in fp32,
    with `lora` adapters when its rank is above 0 (`add_lora`, `init_lora`), sharded by `utils.shard_model`, and
    the names of the weights the checkpoint lacks, which start at zero.

    The model is built on the meta device, sharded, given memory for this rank's shards only (`to_empty`), and
    filled with this rank's rows of each tensor (`fill_from_safetensors`): a rank's host memory grows with its
    shard, not the model. Parameters and logits are bitwise those of `from_pretrained` then `shard_model`
    (tests/test_sharded_load.py). Tied weights stay one parameter; rotary `inv_freq`, a non-persistent buffer that
    `to_empty` leaves uninitialised, is computed again by building its module anew from the config. A checkpoint
    without safetensors files, or a model with other non-persistent buffers, is loaded whole, then sharded."""
    from transformers import AutoConfig, GenerationConfig

    config = config or AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = auto_class.from_config(config, dtype=torch.float32)
    files, derived = safetensors_files(path), derived_buffer_modules(model)
    if files is None or derived is None:
        model, loading = auto_class.from_pretrained(path, config=config, dtype=torch.float32, output_loading_info=True)
        missing = loading["missing_keys"]
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name in missing:
                    parameter.zero_()
        add_lora(model, lora)
        init_lora(model)
        return utils.shard_model(model.to(device), bf16, gradient_checkpointing), sorted(missing)
    add_lora(model, lora)
    utils.shard_model(model, bf16, gradient_checkpointing)
    model.to_empty(device=device)
    for name in derived:
        module = model.get_submodule(name)
        with torch.device(device):
            model.set_submodule(name, type(module)(module.config))
    missing = fill_from_safetensors(model, files)
    init_lora(model)
    if model.can_generate():
        # from_pretrained reads generation_config.json (EOS ids, sampling defaults) too; a folder without one keeps
        # the generation config derived from the model config, as there
        with contextlib.suppress(OSError):
            model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval(), missing  # in eval mode, as from_pretrained returns a model


def load_sharded_causal_lm(path: str, device: torch.device | str, *, bf16: bool,
                           gradient_checkpointing: bool = False, lora: LoraArgs | None = None) -> torch.nn.Module:
    """The causal LM of `path`, FSDP2-sharded in fp32, each rank reading only its own rows (`load_sharded`), with
    `lora` adapters when its rank is above 0; a checkpoint that lacks a weight is refused."""
    from transformers import AutoModelForCausalLM

    model, missing = load_sharded(path, AutoModelForCausalLM, device, bf16=bf16,
                                  gradient_checkpointing=gradient_checkpointing, lora=lora)
    if missing:
        raise ValueError(f"{path} has no weights for {missing}")
    return model


def load_reference(policy: torch.nn.Module, path: str, device: torch.device | str, *, bf16: bool):
    """The frozen reference policy pi_0 of `policy` (loaded from `path`): with LoRA the policy itself with its adapters
    off (`WithoutAdapters`), no second copy; else a second sharded copy of `path` without gradients."""
    if utils.lora_layers(policy):
        return WithoutAdapters(policy)
    return load_sharded_causal_lm(path, device, bf16=bf16).requires_grad_(False)
