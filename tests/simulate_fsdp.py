"""Builds a model from a config.json on the meta device and shards it with FSDP2 as one rank of a simulated
8-rank job (torch's fake process group: collectives return without moving data), then prints that rank's shard
shapes, what a weight sync would stream, and the bytes of each fp32 bucket a checkpoint's Hugging Face export
(`checkpoints.save_hf_folder`) would gather, as JSON. No weights are allocated.

Each CONFIG_JSON:RANK is one simulated rank, in turn in this one process (a fresh fake process group each: a
process start costs more than all the simulations), one JSON line each, in the order given.

Usage: python tests/simulate_fsdp.py WORLD_SIZE CONFIG_JSON:RANK [CONFIG_JSON:RANK ...]
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoints  # noqa: E402
import engines  # noqa: E402
import memory_plan  # noqa: E402
import utils  # noqa: E402


def simulate(config: str, rank: int, world_size: int) -> dict:
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    model = utils.shard_model(memory_plan.meta_model(config), bf16=True, gradient_checkpointing=True)
    local = {name: list(p.to_local().shape) for name, p in model.named_parameters()}
    streamed = [(name, list(t.shape), str(t.dtype))
                for name, t in engines.stream_weights(model, torch.bfloat16, 2**29)]
    exported = [[(name, t.numel() * t.element_size()) for name, t in bucket]
                for bucket in utils.gathered_buckets(checkpoints.hf_export_tensors(model), torch.float32, 2**29)]
    result = {"local": local, "streamed": streamed, "exported": exported,
              "meta": all(p.device.type == "meta" for p in model.parameters())}
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    world_size = int(sys.argv[1])
    for case in sys.argv[2:]:
        config, _, rank = case.rpartition(":")
        print(json.dumps({"config": config, "rank": int(rank), **simulate(config, int(rank), world_size)}))
