"""Memory of a weight sync and of a training step, measured side by side in one run.

Sync: the whole-model gather of before (`utils.full_state_dict`, fp32, then one reload) against the streamed sync
(`dialogues.sync_weights`, buckets of --bucket_mb), into a colocated vLLM engine per rank, on 2 ranks (rank 0's
numbers), for the embedded SmolLM2-135M and a random Llama of about 370M parameters built here. Training: one
forward and backward of SmolLM2-135M on a fixed batch, with and without activation checkpointing. Each case runs
in a fresh process (so one case's freed memory cannot hide the next one's peak); peak memory is the largest
resident set size above the one just before the measured call, sampled every millisecond. Writes
docs/scale_bench.json and the plot docs/scale.png. About 6 minutes on 2 CPU cores.

    .venv/bin/python benchmarks/scale_bench.py [--bucket_mb 32] [--repeats 3]
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import psutil  # noqa: E402
import torch  # noqa: E402

import dialogues  # noqa: E402
import utils  # noqa: E402

MiB = 2**20
RANDOM_370M = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=16,
                   num_key_value_heads=16, tie_word_embeddings=False)


def peak_above_baseline(work) -> tuple[int, float]:
    """Runs `work()`; returns the peak resident memory above the level just before it (bytes) and its seconds."""
    process, peak, done = psutil.Process(), [0], threading.Event()
    baseline = process.memory_info().rss

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    work()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return max(peak[0], process.memory_info().rss) - baseline, seconds


def random_model(folder: str) -> str:
    """A random Llama of about 370M parameters with SmolLM2's tokenizer (built once, cached)."""
    if not os.path.exists(os.path.join(folder, "config.json")):
        utils.make_tiny_model(folder, utils.embedded_smollm2_folder(), seed=0, **RANDOM_370M)
    return folder


def run_case(case: str, model_path: str, bucket_mb: float, repeats: int) -> dict:
    """One measurement in this process: `sync_full`, `sync_stream`, `train` or `train_checkpointed`."""
    rank, _, device = utils.init_distributed()
    torch.manual_seed(0)
    checkpointing = case == "train_checkpointed"
    model = utils.shard_model(utils.load_causal_lm(model_path, torch.float32, device), False, checkpointing)
    parameters = sum(p.full_tensor().numel() for p in model.parameters())
    runs = []
    if case.startswith("sync"):
        engine = dialogues.make_engine(model_path, device, 512, 0, False, 0.3, 256 * MiB, "vllm")
        tokenizer = utils.load_tokenizer(model_path)
        probe = tokenizer("A fixed sentence whose log-probs are compared after the sync.").input_ids
        for _ in range(repeats + 1):  # the first sync warms vLLM's reload path up and is not counted
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1e-3 * torch.randn_like(p))
            if case == "sync_full":
                runs.append(peak_above_baseline(lambda: engine.load_weights(utils.full_state_dict(model))))
                dialogues.check_logprob_parity(engine, model, probe, device, 1e-3)
            else:
                runs.append(peak_above_baseline(lambda: dialogues.sync_weights(engine, model, probe, device, 1e-3,
                                                                               bucket_mb)))
        runs = runs[1:]
    else:
        model.train()
        batch = torch.randint(0, 1000, (4, 256), generator=torch.Generator().manual_seed(0))
        for _ in range(repeats):
            runs.append(peak_above_baseline(lambda: model(input_ids=batch, labels=batch).loss.backward()))
            model.zero_grad(set_to_none=True)
    return {"case": case, "rank": rank, "parameters": parameters, "peak_bytes": min(r[0] for r in runs),
            "seconds": min(r[1] for r in runs)}


def plot(results: list[dict], path: str) -> None:
    """Bars of peak memory per case, grouped by model, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (sync_ax, train_ax) = plt.subplots(1, 2, figsize=(10, 4))
    syncs = [r for r in results if r["case"].startswith("sync")]
    models = sorted({r["model"] for r in syncs}, key=[r["model"] for r in syncs].index)
    for offset, case, label in ((-0.2, "sync_full", "whole-model gather (before)"),
                                (0.2, "sync_stream", "streamed buckets")):
        values = [next(r["peak_bytes"] / MiB for r in syncs if r["model"] == m and r["case"] == case) for m in models]
        sync_ax.bar([i + offset for i in range(len(models))], values, width=0.4, label=label)
    sync_ax.set_xticks(range(len(models)), models)
    sync_ax.set_ylabel("peak extra memory of one sync (MiB)")
    sync_ax.set_title("weight sync into vLLM")
    sync_ax.legend(loc="upper left")
    trains = [r for r in results if r["case"].startswith("train")]
    train_ax.bar(["without checkpointing", "with checkpointing"], [r["peak_bytes"] / MiB for r in trains],
                 color=["C0", "C1"])
    train_ax.set_ylabel("peak extra memory of forward+backward (MiB)")
    train_ax.set_title(f"checkpointing, {trains[0]['model']}, 4x256 tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--bucket_mb", type=float, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--model_path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.model_path, args.bucket_mb, args.repeats)), flush=True)
        os._exit(0)  # the measurement is out; vLLM's and the process group's teardown would only cost time

    smollm2 = utils.embedded_smollm2_folder()
    models = {"SmolLM2-135M": smollm2, "random-370M": random_model(os.path.join(utils.cache_dir(), "random_370m"))}
    cases = [(name, case) for name in models for case in ("sync_full", "sync_stream")]
    cases += [("SmolLM2-135M", "train"), ("SmolLM2-135M", "train_checkpointed")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    # glibc raises its mmap threshold after large frees and then keeps freed tensors in its heap: a later sync's
    # allocations would reuse that memory without the resident set growing. A fixed threshold maps every block
    # over 64 KiB on its own and unmaps it when freed, so the resident set follows the live tensors.
    env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    results = []
    for name, case in cases:
        # syncs on 2 ranks: on one, an FSDP2 "shard" is the whole tensor and a gather copies nothing
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] \
            if case.startswith("sync") else [sys.executable]
        out = subprocess.run([*launcher, __file__, "--case", case, "--model_path", models[name], "--bucket_mb",
                              str(args.bucket_mb), "--repeats", str(args.repeats)], env=env, capture_output=True,
                             text=True, check=True)
        results.append({"model": name, **next(json.loads(line) for line in out.stdout.splitlines()
                                               if line.startswith('{"case"') and '"rank": 0' in line)})
        print(f"{name:<14} {case:<20} peak {results[-1]['peak_bytes'] / MiB:8.1f} MiB  "
              f"{results[-1]['seconds']:6.2f} s", flush=True)

    print("\n| model | measurement | before (MiB, s) | after (MiB, s) | memory ratio | time ratio |")
    print("|---|---|---|---|---|---|")
    pairs = [(m, "sync", "sync_full", "sync_stream") for m in models]
    pairs.append(("SmolLM2-135M", "forward+backward", "train", "train_checkpointed"))
    for model, what, before, after in pairs:
        b, a = (next(r for r in results if r["model"] == model and r["case"] == c) for c in (before, after))
        print(f"| {model} ({b['parameters'] / 1e6:.0f}M) | {what} | {b['peak_bytes'] / MiB:.0f}, {b['seconds']:.2f} | "
              f"{a['peak_bytes'] / MiB:.0f}, {a['seconds']:.2f} | {a['peak_bytes'] / b['peak_bytes']:.2f} | "
              f"{a['seconds'] / b['seconds']:.2f} |")
    with open(os.path.join(REPO, "docs", "scale_bench.json"), "w") as f:
        json.dump({"bucket_mb": args.bucket_mb, "results": results}, f, indent=2)
    plot(results, os.path.join(REPO, "docs", "scale.png"))
