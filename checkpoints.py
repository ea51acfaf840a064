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
import json
import math
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

import utils


def save_checkpoint(run_dir: str, iteration: int, trained: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]],
                    trainer_state: dict, tokenizer, export: str = "policy", bucket_bytes: int = 2**29) -> str:
    """Writes `runs/<run>/checkpoints/iteration_<n>/`, atomically (a temporary folder renamed when complete).

    - `dcp/`: every trained model's and optimizer's shards (torch.distributed.checkpoint; MA-PPO has two);
    - `hf/`: the `export` model in Hugging Face format, fp32 (`save_hf_folder`: gathered `bucket_bytes` at a time);
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
        state[f"model/{name}"], state[f"optim/{name}"] = get_state_dict(model, optimizer)
    dcp.save(state, checkpoint_id=os.path.join(tmp, "dcp"))
    save_hf_folder(trained[export][0], os.path.join(tmp, "hf"), tokenizer, bucket_bytes)
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


def hf_export_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The named tensors `save_hf_folder` writes, in order: the state dict's parameters (a tied weight once, under
    its first name) and persistent buffers."""
    keys = model.state_dict().keys()
    return [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()] if n in keys]


def save_hf_folder(model: torch.nn.Module, folder: str, tokenizer, bucket_bytes: int) -> None:
    """Writes an FSDP2-sharded causal LM as a Hugging Face folder that transformers and vLLM load: config, generation
    config, tokenizer, and the weights in fp32 (the master weights, as trained) as safetensors shards with their
    index. A collective: every rank gathers one bucket of at most `bucket_bytes` at a time and rank 0 writes it as
    one shard, so no rank ever holds the whole model (`memory_plan` counts the bucket). Tied weights are written
    once, under the first name, as `save_pretrained` does."""
    from safetensors.torch import save_file

    tensors = hf_export_tensors(model)
    count = len(utils.size_buckets([t.numel() * 4 for _, t in tensors], bucket_bytes))
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
        state[f"model/{name}"], state[f"optim/{name}"] = get_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=os.path.join(path, "dcp"))
    for name, (model, optimizer) in trained.items():
        set_state_dict(model, optimizer, model_state_dict=state[f"model/{name}"],
                       optim_state_dict=state[f"optim/{name}"])
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
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            name = next((n for n in names if n in stored), None)
            if name is None:
                local.zero_()
                missing.append(names[0])
                continue
            rows = stored[name].get_slice(name)  # reads only the rows asked for
            local.copy_(rows[slice(*rank_rows(tensor.shape[0]))] if isinstance(tensor, DTensor) else rows[:])
    return missing


def load_sharded(path: str, auto_class, device: torch.device | str, *, bf16: bool, gradient_checkpointing: bool = False,
                 config=None) -> tuple[torch.nn.Module, list[str]]:
    """`auto_class` (an `AutoModelFor...`) of the folder or hub id `path` (with `config`, default its own) in fp32,
    sharded by `utils.shard_model`, and the names of the weights the checkpoint lacks, which start at zero.

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
        return utils.shard_model(model.to(device), bf16, gradient_checkpointing), sorted(missing)
    utils.shard_model(model, bf16, gradient_checkpointing)
    model.to_empty(device=device)
    for name in derived:
        module = model.get_submodule(name)
        with torch.device(device):
            model.set_submodule(name, type(module)(module.config))
    missing = fill_from_safetensors(model, files)
    if model.can_generate():
        # from_pretrained reads generation_config.json (EOS ids, sampling defaults) too; a folder without one keeps
        # the generation config derived from the model config, as there
        with contextlib.suppress(OSError):
            model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval(), missing  # in eval mode, as from_pretrained returns a model


def load_sharded_causal_lm(path: str, device: torch.device | str, *, bf16: bool,
                           gradient_checkpointing: bool = False) -> torch.nn.Module:
    """The causal LM of `path`, FSDP2-sharded in fp32, each rank reading only its own rows (`load_sharded`); a
    checkpoint that lacks a weight is refused."""
    from transformers import AutoModelForCausalLM

    model, missing = load_sharded(path, AutoModelForCausalLM, device, bf16=bf16,
                                  gradient_checkpointing=gradient_checkpointing)
    if missing:
        raise ValueError(f"{path} has no weights for {missing}")
    return model
