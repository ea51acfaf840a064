"""Checkpoints of the four scripts: written atomically, resumed exactly.

Rule: a checkpoint holds everything a run needs to continue as if it had never stopped (every trained model's and
optimizer's shards, each rank's random states, the loop's own state) plus the policy as a Hugging Face folder, and
it counts only once complete: it is written to a temporary folder, listed in a manifest written last, and renamed.
No rank ever holds the whole model while writing one.

Copy it along with the script you fork; it is not a library.
"""

import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

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
