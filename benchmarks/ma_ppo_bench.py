"""MA-PPO's claim measured: macro actions reach token-level PPO's score in fewer updates (the paper: parity 1.7-2x
sooner), on a task where they have room.

Every variant runs ma_ppo.py with the same flags but its termination rule, from the same policy, for the same
iterations: the same samples (dialogues), generated tokens and optimizer steps. Each run is evaluated after every
iteration on the task's fixed evaluation set. Variants: token-level PPO (n = 1), MA-PPO with n-gram macros (n = 5,
the paper's), MA-PPO with randomized lengths (the official list 1, 2, 3, 5, 10, three times each), and optionally
n = 5 with the KL rewards summed per macro (`ngram5_sum`): the official mean aggregation divides each macro's KL
term by its length, so that control separates the credit assignment from a lighter KL penalty.

The default task is `digits` (48 one-token digits scored as a whole, tasks/digits.py): its answers are 48 actions,
where token-level GAE passes a tenth of the final TD error back to the first digit. Reported, over the seeds:

- the final evaluation score of each variant, mean and 95% interval, and its paired difference from PPO (same seed:
  same warm start, same evaluation dialogues);
- the updates (optimizer steps) and the training seconds each variant needs to first reach token-level PPO's final
  score (the paper's measure) and its best score (the means over seeds), with 95% intervals over the seeds that
  reach it, and the ratio to PPO's own;
- the seconds per iteration split by phase;
- a plot of the score against samples and against training seconds, means with 95% bands.

"Training seconds" are the run's own phase times (rollout, reward, old log-probs, train, sync), evaluation excluded.
`--task chat` runs the multi-turn chat task instead (SmolLM2-135M as the policy and the user, the target-length
reward, 3 turns, 16 dialogues an iteration). On digits, 5 seeds of 3 variants, 12 iterations of 256 dialogues take
about 70 minutes on 2 CPU cores; on chat, 5 seeds of 2 variants, 6 iterations, about 105 minutes. Writes
ma_ppo_bench_<task>.json and .png to --output_dir; the flags all benchmarks share are described in
benchmarks/common.py.

    .venv/bin/python benchmarks/ma_ppo_bench.py [--task digits] [--seeds 1 2 3 4 5] [--num_iterations 12]
        [--variants ppo ngram5 randomized [ngram5_sum]] [--output_dir docs] [--runs_dir DIR] [-- more ma_ppo.py flags]
    .venv/bin/python benchmarks/ma_ppo_bench.py --report     # the tables again, from docs/ma_ppo_bench_digits.json
"""

import argparse
import json
import math
import os
import statistics

import common

VARIANTS = {
    "ppo": ("token-level PPO (n = 1)", ["--ngram", "1"]),
    "ngram5": ("MA-PPO, n-gram (n = 5)", ["--ngram", "5"]),
    "randomized": ("MA-PPO, randomized lengths", ["--termination", "randomized"]),
    "perplexity": ("MA-PPO, perplexity", ["--termination", "perplexity"]),
    "ngram5_sum": ("MA-PPO, n = 5, KL summed per macro", ["--ngram", "5", "--reward_aggregation", "sum"]),
}
TASKS = {
    "digits": ["--task", "digits", "--max_new_tokens", "48"],
    "guess_number": ["--task", "guess_number"],
    # multi-turn chat: SmolLM2-135M as the policy and as the LLM user, 3 turns, the target-length reward (the
    # brevity reward's answers mostly ran to the token cap, so its score hardly varied); 16 dialogues an iteration
    # in two steps, the first two the critic's alone, and the actor's LR for a pretrained model (the default 1e-4
    # is the tiny policies')
    "chat": ["--task", "chat", "--horizon", "3", "--max_new_tokens", "48", "--user_max_tokens", "32",
             "--reward_function", "tasks.chat:target_length_reward", "--dialogues_per_rank", "16",
             "--minibatch_dialogues", "8", "--micro_batch_dialogues", "8", "--critic_warmup_steps", "2",
             "--lr", "3e-5", "--num_eval_prompts", "32"],
}
PHASES = ("rollout", "reward", "old_logprobs", "train", "sync")


def run(flags: list[str], name: str, iterations: int, runs_dir: str) -> dict:
    """One ma_ppo.py run evaluated after every iteration. Its per-iteration lists start at iteration 0 (before
    training): the evaluation score at the horizon, the samples (dialogues) and optimizer steps so far, and the
    training seconds so far."""
    done = common.run_script("ma_ppo.py", [*flags, "--num_iterations", str(iterations), "--eval_every", "1",
                                           "--save_every", str(iterations)], runs_dir, name,
                                 keep_checkpoints=False)
    metrics = done["metrics"]
    with open(os.path.join(runs_dir, name, "args.json")) as f:
        args = json.load(f)
    steps = args["dialogues_per_rank"] // args["minibatch_dialogues"] * args["num_epochs"]  # per iteration
    horizon = max(int(k.rsplit("turn", 1)[1]) for k in metrics[0] if k.startswith("eval/score_turn"))
    seconds = [0.0]
    for m in metrics[1:]:
        seconds.append(seconds[-1] + sum(m[f"time/{p}"] for p in PHASES))
    return {"command": done["command"], "curve": [m[f"eval/score_turn{horizon}"] for m in metrics],
            "samples": [0.0] + [m["budget/reward_calls"] for m in metrics[1:]],
            "updates": [i * steps for i in range(len(metrics))], "seconds": seconds,
            "phase_seconds": {p: statistics.mean(m[f"time/{p}"] for m in metrics[1:]) for p in PHASES}}


def measure(args: argparse.Namespace) -> dict:
    runs_dir = common.runs_dir(args, "ma_ppo_bench")
    runs = {v: [] for v in args.variants}
    for seed in args.seeds:  # seed by seed, so that an interrupted benchmark has every variant of its first seeds
        for v in args.variants:
            flags = [*TASKS[args.task], *VARIANTS[v][1], "--seed", str(seed), *args.script_flags]
            runs[v].append({"seed": seed, **run(flags, f"{args.task}_{v}_{seed}", args.num_iterations, runs_dir)})
    return {"task": args.task, "seeds": args.seeds, "runs": runs}


def first_reach(run: dict, target: float) -> int | None:
    """The first evaluation (iteration index) at or above `target`, or None."""
    return next((i for i, score in enumerate(run["curve"]) if score >= target), None)


def reach_rows(runs: dict, what: str, target: float) -> list[list[str]]:
    """Per variant: the seeds whose runs reach `target`, and the updates and training seconds of their first
    evaluation at or above it (95% intervals over those seeds), with the ratio of PPO's mean updates to the
    variant's."""
    rows, ppo_updates = [], None
    for v, variant_runs in runs.items():
        hits = [(r["updates"][i], r["seconds"][i]) for r in variant_runs if (i := first_reach(r, target)) is not None]
        updates = [u for u, _ in hits]
        if v == "ppo":
            ppo_updates = updates
        ratio = (f"{statistics.mean(ppo_updates) / statistics.mean(updates):.2f}x"
                 if hits and ppo_updates and statistics.mean(updates) > 0 else "")
        rows.append([f"{what} ({target:.3f})", VARIANTS[v][0], f"{len(hits)}/{len(variant_runs)}",
                     common.with_interval(updates, 1) if hits else "never",
                     common.with_interval([s for _, s in hits], 0) if hits else "never", ratio])
    return rows


def report(results: dict) -> str:
    runs = results["runs"]
    ppo_final = {r["seed"]: r["curve"][-1] for r in runs["ppo"]}
    scores, splits = [], []
    for v, variant_runs in runs.items():
        name = VARIANTS[v][0]
        finals = [r["curve"][-1] for r in variant_runs]
        paired = [r["curve"][-1] - ppo_final[r["seed"]] for r in variant_runs if r["seed"] in ppo_final]
        scores.append([name, common.with_interval([r["curve"][0] for r in variant_runs]), common.with_interval(finals),
                       common.with_interval([max(r["curve"]) for r in variant_runs]),
                       "" if v == "ppo" else common.with_interval(paired)])
        seconds = {p: statistics.mean(r["phase_seconds"][p] for r in variant_runs) for p in PHASES}
        total = sum(seconds.values())
        splits.append([name, f"{total:.1f}", *(f"{seconds[p]:.1f} ({seconds[p] / total:.0%})" for p in PHASES)])
    # the paper's measure is PPO's final score; where PPO's curve falls back from a peak, its best one says more
    reach = (reach_rows(runs, "PPO's final score", statistics.mean(ppo_final.values()))
             + reach_rows(runs, "PPO's best score", statistics.mean(max(r["curve"]) for r in runs["ppo"])))
    n = len(results["seeds"])
    return "\n".join([
        common.header(results),
        f"Task `{results['task']}`, seeds {', '.join(map(str, results['seeds']))}; every cell is the mean ± the "
        f"half-width of its 95% interval over the {n} seeds (Student's t).\n",
        common.table(["variant", "initial score", "final score", "best score", "final minus PPO's (paired)"], scores),
        "",
        "Reaching token-level PPO's final and best scores (their means over seeds): the first evaluation at or above "
        "each, in optimizer steps and training seconds (over the seeds that reach it).\n",
        common.table(["target", "variant", "seeds that reach it", "updates", "training seconds",
                      "speed-up (PPO's updates / the variant's)"], reach),
        "",
        "Seconds per iteration, split by phase (mean over the runs' iterations):\n",
        common.table(["variant", "seconds per iteration", *PHASES], splits)])


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for v, variant_runs in results["runs"].items():
        length = min(len(r["curve"]) for r in variant_runs)
        steps = range(length)
        mean, half = zip(*(common.interval95([r["curve"][i] for r in variant_runs]) for i in steps))
        half = [0.0 if math.isinf(h) else h for h in half]
        for ax, x_key in zip(axes, ("samples", "seconds")):
            x = [statistics.mean(r[x_key][i] for r in variant_runs) for i in steps]
            ax.plot(x, mean, marker="o", markersize=3, label=VARIANTS[v][0])
            ax.fill_between(x, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)], alpha=0.2)
    axes[0].set_xlabel("samples (dialogues)")
    axes[1].set_xlabel("training seconds (mean over seeds)")
    for ax in axes:
        ax.set_ylabel("evaluation score")
        ax.legend(fontsize=7)
    fig.suptitle(f"{results['task']}: mean and 95% band over {len(results['seeds'])} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_run_flags(parser, seeds=[1, 2, 3, 4, 5], num_iterations=12, token_budget=None)
    parser.add_argument("--task", default="digits", choices=list(TASKS), help="the task every variant runs on")
    parser.add_argument("--variants", nargs="+", default=["ppo", "ngram5", "randomized"], choices=list(VARIANTS),
                        help="what runs; `ppo` (token-level PPO, the reference of the comparison) is always one")
    args = common.parse_args(parser)
    if "ppo" not in args.variants:
        parser.error("--variants must include ppo: the others are measured against it")
    if args.token_budget is not None:
        args.script_flags = [*common.budget_flags(args), *args.script_flags]
    path = os.path.join(args.output_dir, f"ma_ppo_bench_{args.task}.json")
    if not args.report:
        common.save_results(path, measure(args))
        plot(common.load_results(path), os.path.join(args.output_dir, f"ma_ppo_bench_{args.task}.png"))
    print(report(common.load_results(path)))
