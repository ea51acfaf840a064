"""MA-PPO (macro actions of n tokens) against token-level PPO (n = 1) at equal budget, over several seeds.

Both run ma_ppo.py with the same flags but `--ngram`, from the same policy, for the same iterations (so the same
generated tokens and optimizer steps), evaluated every iteration. Reported per task: the evaluation score at the
horizon against iteration (mean and spread over seeds), and the paper's measure: the iterations MA-PPO needs to
reach token-level PPO's final score, as a ratio (the paper reports parity 1.7-2x sooner), per seed. Tasks: the
guessing game (multi-turn) and the chat task with one turn (brevity reward). Then the seconds per update split
by phase (rollout, reward, old log-probs and values, train, sync), next to refuel.py's on the guessing game (its
own defaults and the first seed, plus `--refuel_flags`). Flags after `--` go to every ma_ppo.py run. 3 seeds of 10
iterations: about 55 minutes on 2 CPU cores. Writes ma_ppo_bench.json and ma_ppo_bench.png to --output_dir; the
flags all benchmarks share are described in benchmarks/common.py.

    .venv/bin/python benchmarks/ma_ppo_bench.py [--seeds 1 2 3] [--num_iterations 10] [--token_budget T] [--ngram 5]
        [--output_dir docs] [--runs_dir DIR] [-- more ma_ppo.py flags]
    .venv/bin/python benchmarks/ma_ppo_bench.py --report     # the tables again, from docs/ma_ppo_bench.json
"""

import argparse
import os
import re
import shlex
import statistics

import common

TASKS = {
    "guessing game (3 turns)": ["--task", "guess_number"],
    # 16 dialogues per iteration in minibatches of 8 (two optimizer steps): the default 256 takes ~5 min an
    # iteration with SmolLM2-135M on 2 cores. The actor's default LR (1e-4, for the guessing game's tiny policy)
    # moves SmolLM2 by ~3 nats of KL in its first two steps, while the critic's new value head is still noise
    "chat, one turn (brevity)": ["--task", "chat", "--horizon", "1", "--max_new_tokens", "32", "--dialogues_per_rank",
                                 "16", "--minibatch_dialogues", "8", "--micro_batch_dialogues", "8", "--lr", "1e-5"],
}
PHASES = ("rollout", "reward", "old_logprobs", "train", "sync")


def run(script: str, flags: list[str], name: str, iterations: int, runs_dir: str) -> dict:
    """One run evaluated after every iteration: its evaluation score at the horizon per iteration (iteration 0
    first) and its mean seconds per update of each phase."""
    done = common.run_script(script, [*flags, "--num_iterations", str(iterations), "--eval_every", "1",
                                      "--save_every", str(iterations)], runs_dir, name)
    metrics = done["metrics"]
    horizon = max(int(k.rsplit("turn", 1)[1]) for k in metrics[0] if k.startswith("eval/score_turn"))
    return {"command": done["command"], "curve": [m[f"eval/score_turn{horizon}"] for m in metrics],
            "seconds": {p: statistics.mean(m[f"time/{p}"] for m in metrics[1:]) for p in PHASES}}


def measure(args: argparse.Namespace) -> dict:
    runs_dir = common.runs_dir(args, "ma_ppo_bench")
    tasks = {}
    for task in args.tasks:
        short = re.sub(r"\W", "", task.split()[0])
        tasks[task] = {str(n): [{"seed": seed, **run("ma_ppo.py", [*TASKS[task], "--ngram", str(n), "--seed", str(seed),
                                                                   *common.budget_flags(args), *args.script_flags],
                                                     f"{short}_{n}_{seed}", args.num_iterations, runs_dir)}
                                for seed in args.seeds]
                       for n in (1, args.ngram)}
    refuel = run("refuel.py", ["--task", "guess_number", "--seed", str(args.seeds[0]), *shlex.split(args.refuel_flags)],
                 "refuel_guess", args.refuel_iterations, runs_dir)
    return {"seeds": args.seeds, "ngram": args.ngram, "tasks": tasks, "refuel": refuel}


def iterations_to_reach(curve: list[float], target: float) -> int | None:
    return next((i for i, score in enumerate(curve) if score >= target), None)


def label(n: str) -> str:
    return "token-level PPO (n = 1)" if n == "1" else f"MA-PPO (n = {n})"


def split_row(name: str, seconds: dict[str, float]) -> list[str]:
    total = sum(seconds.values())
    return [name, f"{total:.1f}", *(f"{seconds[p]:.1f} ({seconds[p] / total:.0%})" for p in PHASES)]


def report(results: dict) -> str:
    rows, splits = [], []
    for task, by_n in results["tasks"].items():
        ppo = [r["curve"] for r in by_n["1"]]
        for n, runs in by_n.items():
            curves = [r["curve"] for r in runs]
            reach = [iterations_to_reach(c, p[-1]) for c, p in zip(curves, ppo)]
            rows.append([task, label(n), f"{statistics.mean(c[0] for c in curves):.3f}",
                         common.spread([c[-1] for c in curves]),
                         ", ".join("never" if i is None else str(i) for i in reach)])
            seconds = {p: statistics.mean(r["seconds"][p] for r in runs) for p in PHASES}
            splits.append(split_row(f"ma_ppo.py n = {n}, {task}", seconds))
        ratios = [p_i / m_i if m_i else float("inf") for p_i, m_i in
                  ((iterations_to_reach(p, p[-1]), iterations_to_reach(m["curve"], p[-1]))
                   for p, m in zip(ppo, by_n[str(results["ngram"])])) if m_i is not None]
        rows.append([task, "speed-up to PPO's final score (per seed, PPO iterations / MA-PPO iterations)", "", "",
                     ", ".join(f"{r:.2f}" for r in ratios)])
    splits.append(split_row("refuel.py, guessing game (3 turns)", results["refuel"]["seconds"]))
    return "\n".join([
        common.header(results),
        f"refuel.py's run: `{results['refuel']['command']}`.\n",
        common.table(["task", "method", "initial", f"final (mean ± sd over {len(results['seeds'])} seeds)",
                      "iterations to reach PPO's final score, per seed"], rows),
        "",
        "Time per update, split by phase (mean over the runs' iterations):\n",
        common.table(["run", "seconds per update", *PHASES], splits)])


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.5), squeeze=False)
    for ax, (task, by_n) in zip(axes[0], tasks.items()):
        for n, runs in by_n.items():
            curves = [r["curve"] for r in runs]
            steps = range(min(map(len, curves)))
            mean = [statistics.mean(c[i] for c in curves) for i in steps]
            sd = [statistics.stdev(c[i] for c in curves) if len(curves) > 1 else 0 for i in steps]
            ax.plot(steps, mean, marker="o", label=label(n))
            ax.fill_between(steps, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], alpha=0.2)
        ax.set_title(task)
        ax.set_xlabel("iteration (equal tokens and steps)")
        ax.set_ylabel("evaluation score at the horizon")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_run_flags(parser, seeds=[1, 2, 3], num_iterations=10, token_budget=None)
    parser.add_argument("--ngram", type=int, default=5, help="MA-PPO's macro length (compared with n = 1)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--refuel_iterations", type=int, default=3, help="iterations of the refuel.py run")
    parser.add_argument("--refuel_flags", default="", help='more refuel.py flags, one string (e.g. "--lr 1e-4")')
    args = common.parse_args(parser)
    path = os.path.join(args.output_dir, "ma_ppo_bench.json")
    if not args.report:
        common.save_results(path, measure(args))
        plot(common.load_results(path), os.path.join(args.output_dir, "ma_ppo_bench.png"))
    print(report(common.load_results(path)))
