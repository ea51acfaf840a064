"""MA-PPO (macro actions of n tokens) against token-level PPO (n = 1) at equal budget, over several seeds.

Both run ma_ppo.py with the same flags but `--ngram`, from the same policy, for the same iterations (so the same
generated tokens and optimizer steps), evaluated every iteration. Reported per task: the evaluation score at the
horizon against iteration (mean and spread over seeds), and the paper's measure: the iterations MA-PPO needs to
reach token-level PPO's final score, as a ratio (the paper reports parity 1.7-2x sooner), per seed. Tasks: the
guessing game (multi-turn) and the chat task with one turn (brevity reward). Then the seconds per update split
by phase (rollout, reward, old log-probs and values, train, sync), next to refuel.py's on the guessing game.

    .venv/bin/python benchmarks/ma_ppo_bench.py [--seeds 1 2 3] [--iterations 10] [--ngram 5] [--output_dir DIR]

Writes the markdown table to stdout and the plot to docs/ma_ppo_bench.png.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = {
    "guessing game (3 turns)": ["--task", "guess_number"],
    # 16 dialogues per iteration in minibatches of 8 (two optimizer steps): the default 256 takes ~5 min an
    # iteration with SmolLM2-135M on 2 cores. The actor's default LR (1e-4, for the guessing game's tiny policy)
    # moves SmolLM2 by ~3 nats of KL in its first two steps, while the critic's new value head is still noise
    "chat, one turn (brevity)": ["--task", "chat", "--horizon", "1", "--max_new_tokens", "32", "--dialogues_per_rank",
                                 "16", "--minibatch_dialogues", "8", "--micro_batch_dialogues", "8", "--lr", "1e-5"],
}
PHASES = ("rollout", "reward", "old_logprobs", "train", "sync")


def run(script: str, flags: list[str], name: str, iterations: int, output_dir: str) -> list[dict]:
    """The metrics of one run of `script`, evaluated after every iteration (iteration 0 first). A run that already
    finished in `output_dir` (an interrupted benchmark given its folder again) is read, not repeated."""
    metrics_file = os.path.join(output_dir, name, "metrics.jsonl")
    if os.path.exists(metrics_file):
        with open(metrics_file) as f:
            done = [json.loads(line) for line in f]
        if done and done[-1]["iteration"] == iterations:
            return done
        shutil.rmtree(os.path.join(output_dir, name))
    command = [sys.executable, os.path.join(REPO, script), *flags, "--num_iterations", str(iterations),
               "--eval_every", "1", "--save_every", str(iterations), "--output_dir", output_dir, "--run_name", name]
    print(" ".join(command[1:]), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    with open(metrics_file) as f:
        return [json.loads(line) for line in f]


def short_name(task: str) -> str:
    return re.sub(r"\W", "", task.split()[0])


def scores_at_horizon(metrics: list[dict]) -> list[float]:
    horizon = max(int(k.rsplit("turn", 1)[1]) for k in metrics[0] if k.startswith("eval/score_turn"))
    return [m[f"eval/score_turn{horizon}"] for m in metrics]


def seconds_per_phase(runs: list[list[dict]]) -> dict[str, float]:
    """Mean seconds per update of each phase over the runs' iterations (iteration 0 only evaluates)."""
    return {p: statistics.mean(m[f"time/{p}"] for metrics in runs for m in metrics[1:]) for p in PHASES}


def split_row(name: str, seconds: dict[str, float]) -> str:
    total = sum(seconds.values())
    shares = " | ".join(f"{seconds[p]:.1f} ({seconds[p] / total:.0%})" for p in PHASES)
    return f"| {name} | {total:.1f} | {shares} |"


def iterations_to_reach(curve: list[float], target: float) -> int | None:
    return next((i for i, score in enumerate(curve) if score >= target), None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--ngram", type=int, default=5)
    parser.add_argument("--refuel_iterations", type=int, default=3)
    parser.add_argument("--plot", default=os.path.join(REPO, "docs", "ma_ppo_bench.png"))
    parser.add_argument("--output_dir", help="the runs' folder (default: a new temporary one); give an interrupted "
                        "benchmark's folder to keep its finished runs")
    args, args.extra = parser.parse_known_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="ma_ppo_bench_")
    splits = {}
    fig, axes = plt.subplots(1, len(TASKS), figsize=(5 * len(TASKS), 3.5), squeeze=False)
    print("| task | method | initial | final (mean ± sd over seeds) | iterations to reach PPO's final score |")
    print("|---|---|---|---|---|")
    for ax, task in zip(axes[0], TASKS):
        metrics = {n: [run("ma_ppo.py", [*TASKS[task], "--ngram", str(n), "--seed", str(seed), *args.extra],
                           f"{short_name(task)}_{n}_{seed}", args.iterations, output_dir) for seed in args.seeds]
                   for n in (1, args.ngram)}
        splits[task] = {n: seconds_per_phase(runs) for n, runs in metrics.items()}
        curves = {n: [scores_at_horizon(m) for m in runs] for n, runs in metrics.items()}
        for n, runs in curves.items():
            mean = [statistics.mean(c[i] for c in runs) for i in range(len(runs[0]))]
            sd = [statistics.stdev(c[i] for c in runs) if len(runs) > 1 else 0 for i in range(len(runs[0]))]
            label = "token-level PPO (n = 1)" if n == 1 else f"MA-PPO (n = {n})"
            ax.plot(range(len(mean)), mean, marker="o", label=label)
            ax.fill_between(range(len(mean)), [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                            alpha=0.2)
            finals = [c[-1] for c in runs]
            reach = [iterations_to_reach(c, ppo[-1]) for c, ppo in zip(runs, curves[1])]
            print(f"| {task} | {label} | {mean[0]:.3f} | {statistics.mean(finals):.3f} ± "
                  f"{statistics.stdev(finals) if len(finals) > 1 else 0:.3f} | {reach} |")
        ratios = [ppo / ma if ma else float("inf") for ppo, ma in
                  ((iterations_to_reach(p, p[-1]), iterations_to_reach(m, p[-1]))
                   for p, m in zip(curves[1], curves[args.ngram])) if ma is not None and ppo is not None]
        print(f"| {task} | speed-up to PPO's final score (per seed, PPO iterations / MA-PPO iterations) | | | "
              f"{[round(r, 2) for r in ratios]} |")
        ax.set_title(task)
        ax.set_xlabel("iteration (equal tokens and steps)")
        ax.set_ylabel("evaluation score at the horizon")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)

    # time per update, split by phase, next to refuel.py's on the guessing game (its own defaults: 512 dialogues a
    # rank, each with a branch from a sampled turn; the first seed)
    refuel = run("refuel.py", ["--task", "guess_number", "--seed", str(args.seeds[0])], "refuel_guess",
                 args.refuel_iterations, output_dir)
    print("\n| run | seconds per update | " + " | ".join(PHASES) + " |")
    print("|---|---|" + "---|" * len(PHASES))
    for task, by_n in splits.items():
        for n, seconds in by_n.items():
            print(split_row(f"ma_ppo.py n = {n}, {task}", seconds))
    print(split_row("refuel.py, guessing game (3 turns)", seconds_per_phase([refuel])))
    print(f"\nplot: {args.plot}; runs in {output_dir}")
