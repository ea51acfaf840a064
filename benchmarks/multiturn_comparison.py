"""REFUEL against the REFUEL paper's single-turn baselines at an equal generation budget, over several seeds.

Every method starts from the same policy (the task's, e.g. the guessing game's warm start) and runs until it has
generated `--budget` tokens (policy and simulated user, counted the same way in refuel.py and dpo_multiturn.py)
or reaches `--max_iterations`. Reported per method: the evaluation score by turn h at the end, mean and standard
deviation over the seeds, the tokens and iterations actually spent, and the task's references. The baselines use
the paper's construction (contexts played once by pi_0 with the user, immediate targets); the ablations change
one difference from REFUEL at a time (on-policy contexts; future targets) with DPO. The baselines' dialogues
played once by pi_0 count in their budget.

    .venv/bin/python benchmarks/multiturn_comparison.py [--seeds 1 2 3] [--budget 60000] [--task guess_number]

Writes the markdown table to stdout and the plot to docs/multiturn_comparison.png.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = ["--contexts", "initial", "--target", "immediate"]
METHODS = {
    "REFUEL": ["refuel.py", "--horizon_sampling", "uniform"],
    "DPO-LT": ["dpo_multiturn.py", "--loss", "dpo", "--turns", "last", *BASELINE],
    "DPO-MT": ["dpo_multiturn.py", "--loss", "dpo", "--turns", "sampled", *BASELINE],
    "REBEL-LT": ["dpo_multiturn.py", "--loss", "rebel", "--turns", "last", *BASELINE],
    "REBEL-MT": ["dpo_multiturn.py", "--loss", "rebel", "--turns", "sampled", *BASELINE],
    "DPO-MT, on-policy contexts": ["dpo_multiturn.py", "--loss", "dpo", "--turns", "sampled", "--contexts",
                                   "onpolicy", "--target", "immediate"],
    "DPO-MT, future target": ["dpo_multiturn.py", "--loss", "dpo", "--turns", "sampled", "--contexts", "initial",
                              "--target", "future"],
}


def run(method: str, seed: int, args, output_dir: str) -> list[dict]:
    """One method's run for one seed; a finished run already in `output_dir` is read instead (`--output_dir` to
    continue an interrupted comparison)."""
    script, *flags = METHODS[method]
    size = ["--dialogues_per_rank", str(args.per_iteration)] if script == "refuel.py" else [
        "--states_per_rank", str(args.per_iteration), "--num_recorded_dialogues", str(args.recorded)]
    name = f"{method.replace(' ', '').replace(',', '_')}_{seed}"
    iterations = args.max_iterations if script == "refuel.py" else args.baseline_iterations
    metrics_path = os.path.join(output_dir, name, "metrics.jsonl")
    if os.path.exists(os.path.join(output_dir, name, "checkpoints")):
        with open(metrics_path) as f:
            return [json.loads(line) for line in f]
    command = [sys.executable, os.path.join(REPO, script), "--task", args.task, "--seed", str(seed),
               "--output_dir", output_dir, "--run_name", name, "--num_iterations", str(iterations),
               "--token_budget", str(args.budget), *size, "--eval_every", str(iterations), "--save_every",
               str(iterations), *flags, *args.extra]
    print(f"[{time.strftime('%H:%M:%S')}] {method}, seed {seed}: {' '.join(shlex.quote(c) for c in command[1:])}",
          file=sys.stderr, flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    with open(metrics_path) as f:
        return [json.loads(line) for line in f]


def plot(results: dict[str, list[list[dict]]], turns: list[int], references: dict[str, list[float]], path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / (len(results) + 1)
    for i, (method, runs) in enumerate(results.items()):
        finals = [[r[-1][f"eval/score_turn{t}"] for r in runs] for t in turns]
        ax.bar([t + (i - len(results) / 2) * width for t in turns], [statistics.mean(v) for v in finals], width,
               yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in finals], capsize=2, label=method)
    initial = [statistics.mean(r[0][f"eval/score_turn{t}"] for r in next(iter(results.values()))) for t in turns]
    ax.bar([t + len(results) / 2 * width for t in turns], initial, width, color="lightgray", label="initial policy")
    for name, values in references.items():
        ax.scatter(turns, values, marker="_", s=400, label=name, zorder=3)
    ax.set_xticks(turns, [f"turn {t}" for t in turns])
    ax.set_ylabel("evaluation score (mean, sd over seeds)")
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--budget", type=int, default=60_000, help="generated tokens per run (policy and user)")
    parser.add_argument("--max_iterations", type=int, default=16, help="REFUEL's iteration cap (its LR schedule)")
    parser.add_argument("--baseline_iterations", type=int, default=8, help="the baselines' iteration cap")
    parser.add_argument("--per_iteration", type=int, default=256, help="dialogues (REFUEL) or states per iteration")
    parser.add_argument("--recorded", type=int, default=512, help="dialogues pi_0 plays once for the baselines")
    parser.add_argument("--task", default="guess_number")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--plot", default=os.path.join(REPO, "docs", "multiturn_comparison.png"))
    parser.add_argument("--output_dir", default=None, help="where the runs go; finished runs there are reused")
    args, args.extra = parser.parse_known_args()

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="multiturn_comparison_")
    started = time.time()
    results = {m: [run(m, seed, args, output_dir) for seed in args.seeds] for m in args.methods}
    first = next(iter(results.values()))[0][0]
    turns = sorted(int(k.rsplit("turn", 1)[1]) for k in first if k.startswith("eval/score_turn"))
    references = {k[len("reference/") :].rsplit("_turn", 1)[0]: None for k in first if k.startswith("reference/")}
    references = {n: [first[f"reference/{n}_turn{t}"] for t in turns] for n in references}

    def cell(values):
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0:.3f}"

    print(f"\nCommand: `python benchmarks/multiturn_comparison.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}`; "
          f"seeds {args.seeds}; {(time.time() - started) / 60:.0f} min on {os.cpu_count()} CPU cores.\n")
    print("| method | " + " | ".join(f"turn {t}" for t in turns) + " | generated tokens | iterations |")
    print("|---|" + "---|" * (len(turns) + 2))
    base = next(iter(results.values()))
    initial = [[r[0][f"eval/score_turn{t}"] for r in base] for t in turns]
    print("| initial policy | " + " | ".join(cell(v) for v in initial) + " | 0 | 0 |")
    for method, runs in results.items():
        finals = [cell([r[-1][f"eval/score_turn{t}"] for r in runs]) for t in turns]
        tokens = statistics.mean(r[-1]["budget/generated_tokens"] for r in runs)
        iterations = statistics.mean(r[-1]["iteration"] for r in runs)
        print(f"| {method} | " + " | ".join(finals) + f" | {tokens:,.0f} | {iterations:g} |")
    for name, values in references.items():
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " | | |")
    plot(results, turns, references, args.plot)
    print(f"\nplot: {args.plot}; runs in {output_dir}")
