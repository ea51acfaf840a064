"""Loads each model folder given twice on however many ranks torchrun starts: whole then sharded (the scripts'
load before `checkpoints.load_sharded`) and sharded as it loads (`checkpoints.load_sharded`), and writes to argv[1]
(rank 0), per folder, whether the two give bitwise the same parameters and buffers, the same logits, and the same
config.

Usage: torchrun --nproc_per_node N tests/sharded_load.py OUT_JSON CAUSAL_LM_FOLDER... [--token_classification FOLDER]
"""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import helpers  # noqa: E402

import checkpoints  # noqa: E402
import utils  # noqa: E402


def compare(path: str, auto_class, config, device: torch.device) -> dict:
    """The two loads of `path` side by side (a collective: every rank gathers both models)."""
    whole = auto_class.from_pretrained(path, config=config, dtype=torch.float32).to(device)
    whole = utils.shard_model(whole, bf16=False)
    sharded, missing = checkpoints.load_sharded(path, auto_class, device, bf16=False, config=config)
    local_rows = {name: list(p.to_local().shape) for name, p in sharded.named_parameters()}  # before a forward
    expected, got = helpers.full_state_dict(whole), helpers.full_state_dict(sharded)
    ids = torch.randint(0, 1000, (2, 19), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        same_logits = torch.equal(whole(input_ids=ids).logits, sharded(input_ids=ids).logits)
    return {"missing": missing, "names": sorted(got) == sorted(expected),
            "bitwise": all(torch.equal(got[name], expected[name]) for name in expected), "logits": same_logits,
            "config": whole.config.to_dict() == sharded.config.to_dict(),
            "local_rows": local_rows}


if __name__ == "__main__":
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification

    out, folders = sys.argv[1], sys.argv[2:]
    rank, world_size, device = utils.init_distributed()
    results = {}
    while folders:
        path = folders.pop(0)
        if path == "--token_classification":  # a critic as ma_ppo.load_critic builds it: a one-output head
            path = folders.pop(0)
            config = AutoConfig.from_pretrained(path, num_labels=1)
            config.token_classification_bias = False
            results[path] = compare(path, AutoModelForTokenClassification, config, device)
        else:
            results[path] = compare(path, AutoModelForCausalLM, AutoConfig.from_pretrained(path), device)
    all_results = [None] * world_size
    dist.all_gather_object(all_results, results)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(all_results, f)
    dist.destroy_process_group()
    # skip the interpreter's finalization, where gloo's worker threads sometimes abort a finished process (as in
    # fsdp_step.py)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
