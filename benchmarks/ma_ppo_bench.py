"""MA-PPO (macro actions of n tokens) against token-level PPO (n = 1) at equal budget, over several seeds.

Both run ma_ppo.py with the same flags but `--ngram`, from the same policy, for the same iterations (so the same
generated tokens and optimizer steps), evaluated every iteration. Reported per task: the evaluation score at the
horizon against iteration (mean and spread over seeds), and the paper's measure: the iterations MA-PPO needs to
reach token-level PPO's final score, as a ratio (the paper reports parity 1.7-2x sooner), per seed. Tasks: the
guessing game (multi-turn) and the chat task with one turn (brevity reward).

    .venv/bin/python benchmarks/ma_ppo_bench.py [--seeds 1 2 3] [--iterations 12] [--ngram 5]

Writes the markdown table to stdout and the plot to docs/ma_ppo_bench.png.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = {
    "guessing game (3 turns)": ["--task", "guess_number"],
    "chat, one turn (brevity)": ["--task", "chat", "--horizon", "1", "--max_new_tokens", "32"],
}


def run(task: str, ngram: int, seed: int, args, output_dir: str) -> list[float]:
    """Evaluation score at the horizon after each iteration (iteration 0 first)."""
    name = f"{task.split()[0]}_{ngram}_{seed}"
    command = [sys.executable, os.path.join(REPO, "ma_ppo.py"), *TASKS[task], "--ngram", str(ngram), "--seed",
               str(seed), "--num_iterations", str(args.iterations), "--eval_every", "1", "--save_every",
               str(args.iterations), "--output_dir", output_dir, "--run_name", name, *args.extra]
    print(" ".join(command[1:]), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(output_dir, name, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    horizon = max(int(k.rsplit("turn", 1)[1]) for k in metrics[0] if k.startswith("eval/score_turn"))
    return [m[f"eval/score_turn{horizon}"] for m in metrics]


def iterations_to_reach(curve: list[float], target: float) -> int | None:
    return next((i for i, score in enumerate(curve) if score >= target), None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--ngram", type=int, default=5)
    parser.add_argument("--plot", default=os.path.join(REPO, "docs", "ma_ppo_bench.png"))
    args, args.extra = parser.parse_known_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = tempfile.mkdtemp(prefix="ma_ppo_bench_")
    fig, axes = plt.subplots(1, len(TASKS), figsize=(5 * len(TASKS), 3.5), squeeze=False)
    print("| task | method | initial | final (mean ± sd over seeds) | iterations to reach PPO's final score |")
    print("|---|---|---|---|---|")
    for ax, task in zip(axes[0], TASKS):
        curves = {n: [run(task, n, seed, args, output_dir) for seed in args.seeds] for n in (1, args.ngram)}
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
    print(f"\nplot: {args.plot}; runs in {output_dir}")
