"""What LoRA costs against full fine-tuning, side by side in one run: rebel.py on its defaults (the embedded
SmolLM2-135M-Instruct, brevity reward) with and without `--lora_rank 8`, alternating, per repeat: seconds per
iteration by phase (the script's own `time/*` metrics, iterations 2 on: the first carries one-time costs) and each
run's peak resident memory (engine and trainer share the process). Both sides train at a learning rate of 1e-12,
so that neither policy moves: they then sample the same answers and do the same work in every phase, and the ratio
is what the adapters cost (at rebel.py's own rate full fine-tuning moves far more than LoRA, and the answers'
lengths, with them the rollout and log-prob phases, drift apart). One repeat of both at 3 iterations: about 2.5
minutes on 2 idle CPU cores. Flags after `--` go to both runs (a `--lr` there replaces 1e-12). Writes
lora_bench.json and lora_bench.png to --output_dir.

    .venv/bin/python benchmarks/lora_bench.py [--repeats 2] [--num_iterations 4] [--output_dir docs] [-- rebel.py flags]
    .venv/bin/python benchmarks/lora_bench.py --report     # the table again, from docs/lora_bench.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import common

PHASES = ("rollout", "reward", "old_logprobs", "train", "sync")
SIDES = {"full fine-tuning": [], "LoRA r=8": ["--lora_rank", "8"]}
SAME_WORK = ["--lr", "1e-12"]
"""a learning rate at which neither side's policy moves, so that both sample the same answers"""


def launch(flags: list[str], work: str, name: str) -> dict:
    """One rebel.py run to its end: its metrics after iteration 0 and its peak resident memory (ru_maxrss, from
    wait4)."""
    command = [sys.executable, os.path.join(common.REPO, "rebel.py"), *flags, "--output_dir", work, "--run_name", name]
    common.log(f"{name}: {' '.join(command[1:])}")
    with open(os.path.join(work, f"{name}.log"), "w") as log_file:
        process = subprocess.Popen(command, cwd=common.REPO, env=common.child_env(), stdout=log_file,
                                   stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"rebel.py failed; its log: {os.path.join(work, name + '.log')}")
    with open(os.path.join(work, name, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f][1:]
    return {"peak_rss_gib": usage.ru_maxrss * 1024 / 2**30,
            "iterations": [{p: m[f"time/{p}"] for p in PHASES} for m in metrics],
            "sync_gap": max(m["sync/logprob_gap"] for m in metrics)}


def seconds(run: dict) -> float:
    """A run's mean seconds per iteration over iterations 2+."""
    return statistics.mean(sum(it[p] for p in PHASES) for it in run["iterations"][1:])


def min_max(values: list[float]) -> tuple[float, float]:
    return min(values), max(values)


def report(results: dict) -> str:
    """Seconds per iteration by phase (mean over iterations 2+ and repeats), peak memory, and LoRA / full."""
    rows, means = [], {}
    for side, runs in results["runs"].items():
        later = [it for run in runs for it in run["iterations"][1:]]
        phases = {p: statistics.mean(it[p] for it in later) for p in PHASES}
        means[side] = {"seconds": sum(phases.values()), "peak": statistics.mean(r["peak_rss_gib"] for r in runs)}
        rows.append([side, *[round(phases[p], 2) for p in PHASES], round(means[side]["seconds"], 2),
                     round(means[side]["peak"], 2), f"{max(r['sync_gap'] for r in runs):.1e}"])
    lora, full = means["LoRA r=8"], means["full fine-tuning"]
    rows.append(["LoRA / full", "", "", "", "", "", f"{lora['seconds'] / full['seconds']:.2f}x",
                 f"{lora['peak'] / full['peak']:.2f}x", ""])
    # the same ratios repeat by repeat: a repeat's two runs ran one after the other, under the same load
    pairs = list(zip(results["runs"]["full fine-tuning"], results["runs"]["LoRA r=8"]))
    rows.append(["LoRA / full, per repeat (min-max)", "", "", "", "", "",
                 "-".join(f"{x:.2f}x" for x in min_max([seconds(b) / seconds(a) for a, b in pairs])),
                 "-".join(f"{x:.2f}x" for x in min_max([b["peak_rss_gib"] / a["peak_rss_gib"] for a, b in pairs])),
                 ""])
    head = ["rebel.py", *[f"{p} (s)" for p in PHASES], "s / iteration", "peak RSS (GiB)", "largest sync gap"]
    return common.header(results) + "\n" + common.table(head, rows)


def plot(results: dict, path: str) -> None:
    """Seconds per iteration stacked by phase, and peak memory, per side (means over iterations 2+ and repeats)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = list(results["runs"])
    fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(8, 3.2))
    bottom = [0.0] * len(sides)
    for phase in PHASES:
        heights = [statistics.mean(it[phase] for run in results["runs"][side] for it in run["iterations"][1:])
                   for side in sides]
        time_ax.bar(sides, heights, bottom=bottom, label=phase)
        bottom = [b + h for b, h in zip(bottom, heights)]
    time_ax.set_ylabel("seconds per iteration")
    time_ax.legend(fontsize=7)
    memory_ax.bar(sides, [statistics.mean(r["peak_rss_gib"] for r in results["runs"][side]) for side in sides])
    memory_ax.set_ylabel("peak resident memory (GiB)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="alternating pairs of runs (full, LoRA)")
    parser.add_argument("--num_iterations", type=int, default=4, help="iterations of each run")
    common.add_output_flags(parser)
    args = common.parse_args(parser)
    path = os.path.join(args.output_dir, "lora_bench.json")
    if not args.report:
        work, runs = tempfile.mkdtemp(prefix="lora_bench_"), {side: [] for side in SIDES}
        for repeat in range(args.repeats):
            for k, (side, flags) in enumerate(SIDES.items()):
                runs[side].append(launch(["--num_iterations", str(args.num_iterations), "--eval_every",
                                          str(args.num_iterations), *SAME_WORK, *flags, *args.script_flags], work,
                                         f"r{repeat}_{k}"))
        common.save_results(path, {"repeats": args.repeats, "num_iterations": args.num_iterations, "runs": runs,
                                   "finished": time.strftime("%H:%M")})
        plot(common.load_results(path), os.path.join(args.output_dir, "lora_bench.png"))
    print(report(common.load_results(path)))
