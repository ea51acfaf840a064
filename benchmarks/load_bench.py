"""Host memory of loading the policy on one rank of 8: whole then sharded, against sharded as it loads.

Before (`utils.load_causal_lm`, then `utils.shard_model`): every rank builds the whole model in fp32 on the host,
then FSDP2 keeps its shard. After (`checkpoints.load_sharded_causal_lm`): every rank builds the model on the meta
device, shards it, and reads only its own rows of each tensor from the safetensors files. Measured on rank 0 of a
simulated 8-rank job (torch's fake process group, as tests/simulate_fsdp.py: collectives return at once; loading
needs none), loading a random Llama saved here in bf16 safetensors as Llama-3's checkpoints are (shards of at most
2 GiB with an index): one of about 1.1B parameters (TinyLlama's shape) with both loads, and one of Llama-3-8B's shape
(tests/data/llama3_8b_config.json, 16 GB on disk) with the sharded load only, since the whole load's fp32 copy
(32 GB) does not fit this machine's 24 GiB. Each case runs in a fresh process; its peak is the largest resident set
size above the one just before the load (sampled every millisecond, `scale_bench.peak_above_baseline`), and what it
holds after is the resident set then, above the same level. Writes load_bench.json to --output_dir; the checkpoints
are written once to --checkpoint_dir (18 GB) and reused.

    .venv/bin/python benchmarks/load_bench.py [--models 1b 8b] [--checkpoint_dir DIR] [--output_dir docs]
        [--model FOLDER]   # both loads of this model alone (tests)
    .venv/bin/python benchmarks/load_bench.py --report   # the table again, from docs/load_bench.json
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import common

sys.path.insert(0, common.REPO)

import torch  # noqa: E402

GiB = 2**30
RANKS = 8
MODELS = {
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False),
    "8b": os.path.join(common.REPO, "tests", "data", "llama3_8b_config.json"),
}
"""a random Llama of TinyLlama-1.1B's shape, and Llama-3-8B's"""
CASES = {"1b": ("whole", "sharded"), "8b": ("sharded",)}
SHARD_BYTES = 2 * GiB


def random_checkpoint(name: str, folder: str) -> str:
    """A Llama of `MODELS[name]`'s shape with random bf16 weights, saved as safetensors shards with their index
    (written once: tensor by tensor, so that no more than one shard is ever in memory)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, LlamaConfig

    import memory_plan

    folder = os.path.join(folder, f"random-llama-{name}")
    if os.path.exists(os.path.join(folder, "model.safetensors.index.json")):
        return folder
    spec = MODELS[name]
    config = AutoConfig.from_pretrained(spec) if isinstance(spec, str) else LlamaConfig(**spec)
    config.dtype = torch.bfloat16
    shapes = {n: t.shape for n, t in memory_plan.meta_model(config).state_dict().items()}
    os.makedirs(folder, exist_ok=True)
    weight_map, shard, total = {}, {}, 0

    def write() -> None:
        file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in shard})
        shard.clear()

    generator = torch.Generator().manual_seed(0)
    for n, shape in shapes.items():
        if shard and sum(t.nbytes for t in shard.values()) + 2 * shape.numel() > SHARD_BYTES:
            write()
        shard[n] = torch.randn(shape, generator=generator, dtype=torch.bfloat16) * 0.02
        total += shard[n].nbytes
    write()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    config.save_pretrained(folder)
    return folder


def run_case(case: str, path: str) -> dict:
    """One load on rank 0 of a simulated 8-rank job in this process: its peak and held memory above the start."""
    import psutil
    import torch.distributed as dist
    from scale_bench import peak_above_baseline
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import checkpoints
    import utils

    def load() -> torch.nn.Module:
        if case == "whole":
            return utils.shard_model(utils.load_causal_lm(path, torch.float32), bf16=False)
        return checkpoints.load_sharded_causal_lm(path, "cpu", bf16=False)

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=RANKS)
    loaded = []
    baseline = psutil.Process().memory_info().rss
    peak, seconds = peak_above_baseline(lambda: loaded.append(load()))
    model = loaded[0]
    return {"case": case, "parameters": sum(p.numel() for p in model.parameters()),
            "local_bytes": sum(p.to_local().nbytes for p in model.parameters()), "peak_bytes": peak,
            "held_bytes": psutil.Process().memory_info().rss - baseline, "seconds": seconds}


def report(results: dict) -> str:
    rows = [[f"{r['model']} ({r['parameters'] / 1e9:.2f}B)", r["case"], f"{r['file_bytes'] / GiB:.2f}",
             f"{r['peak_bytes'] / GiB:.2f}", f"{r['held_bytes'] / GiB:.2f}", f"{r['local_bytes'] / GiB:.2f}",
             f"{r['seconds']:.1f}"] for r in results["results"]]
    return "\n".join([common.header(results), f"Rank 0 of {RANKS} (fake process group), fp32 shards from bf16 "
                      "safetensors:\n", common.table(
                          ["model", "load", "checkpoint on disk (GiB)", "peak RSS growth (GiB)",
                           "held after (GiB)", "rank 0's fp32 shards (GiB)", "seconds"], rows)])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--checkpoint_dir", default=os.path.join(tempfile.gettempdir(), "load_bench"),
                        help="where the random checkpoints are written once and reused")
    common.add_output_flags(parser)
    parser.add_argument("--model", help="measure both loads of this model folder alone, instead of --models")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--model_path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # a measurement, in a process of its own
        print(json.dumps(run_case(args.case, args.model_path)), flush=True)
        os._exit(0)  # the fake group's teardown would only cost time
    path = os.path.join(args.output_dir, "load_bench.json")
    if not args.report:
        results = []
        measured = [(os.path.basename(args.model), args.model, ("whole", "sharded"))] if args.model else [
            (f"random-llama-{name}", random_checkpoint(name, args.checkpoint_dir), CASES[name]) for name in args.models]
        for name, folder, cases in measured:
            file_bytes = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                             if f.endswith(".safetensors"))
            for case in cases:
                common.log(f"{name}: {case} load")
                out = subprocess.run([sys.executable, __file__, "--case", case, "--model_path", folder],
                                     capture_output=True, text=True, check=True, env=common.child_env())
                results.append({"model": name, "file_bytes": file_bytes,
                                **json.loads(out.stdout.strip().splitlines()[-1])})
        common.save_results(path, {"ranks": RANKS, "results": results})
    print(f"\n{report(common.load_results(path))}\n", flush=True)
