"""REFUEL against the REFUEL paper's single-turn baselines at an equal generation budget, over several seeds.

Every method starts from the same policy (the task's, e.g. the guessing game's warm start) and runs until it has
generated `--token_budget` tokens (policy and simulated user, counted the same way in refuel.py and
dpo_multiturn.py) or reaches its iteration cap (`--num_iterations` for REFUEL, `--baseline_iterations` for the
others). Reported per method: the evaluation score by turn h at the end, mean and standard deviation over the
seeds, the tokens and iterations actually spent, and the task's references. The baselines use the paper's
construction (contexts played once by pi_0 with the user, immediate targets); the ablations change one difference
from REFUEL at a time (on-policy contexts; future targets) with DPO. The baselines' dialogues played once by pi_0
count in their budget. Flags after `--` go to every method's script. 3 seeds: about 30 minutes on 2 CPU cores.
Writes multiturn_comparison.json and multiturn_comparison.png to --output_dir; the flags all benchmarks share are
described in benchmarks/common.py.

    .venv/bin/python benchmarks/multiturn_comparison.py [--seeds 1 2 3] [--token_budget 60000] [--num_iterations 16]
        [--baseline_iterations 8] [--task guess_number] [--output_dir docs] [--runs_dir DIR] [-- more script flags]
    .venv/bin/python benchmarks/multiturn_comparison.py --report   # the table again, from the JSON in docs/
"""

import argparse
import os
import statistics

import common

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


def scores(record: dict) -> dict[str, float]:
    """The evaluation score by turn h of one metrics record, keyed by h."""
    prefix = "eval/score_turn"
    return {k[len(prefix):]: v for k, v in record.items() if k.startswith(prefix)}


def run(method: str, seed: int, args: argparse.Namespace, runs_dir: str) -> dict:
    """One method's run for one seed: its initial and final scores by turn and what it spent."""
    script, *flags = METHODS[method]
    size = ["--pairs_per_rank", str(args.per_iteration)]
    if script != "refuel.py":
        size += ["--num_recorded_dialogues", str(args.recorded)]
    iterations = args.num_iterations if script == "refuel.py" else args.baseline_iterations
    flags = ["--task", args.task, "--seed", str(seed), "--num_iterations", str(iterations),
             *common.budget_flags(args), *size, "--eval_every", str(iterations), "--save_every", str(iterations),
             *flags, *args.script_flags]
    done = common.run_script(script, flags, runs_dir, f"{method.replace(' ', '').replace(',', '_')}_{seed}")
    first, last = done["metrics"][0], done["metrics"][-1]
    return {"seed": seed, "command": done["command"], "seconds": done["seconds"], "initial": scores(first),
            "final": scores(last), "generated_tokens": last["budget/generated_tokens"], "iterations": last["iteration"],
            "references": {k[len("reference/"):]: v for k, v in first.items() if k.startswith("reference/")}}


def references(results: dict) -> dict[str, list[float]]:
    """The task's yardsticks by turn, e.g. {"binary search (optimal)": [0.143, 0.430, 1.0]}."""
    first = next(iter(results["runs"].values()))[0]["references"]
    names = dict.fromkeys(k.rsplit("_turn", 1)[0] for k in first)
    return {n: [first[f"{n}_turn{t}"] for t in turns(results)] for n in names}


def turns(results: dict) -> list[str]:
    return sorted(next(iter(results["runs"].values()))[0]["initial"], key=int)


def report(results: dict) -> str:
    runs = results["runs"]
    ts = turns(results)
    minutes = sum(r["seconds"] for by_seed in runs.values() for r in by_seed) / 60
    rows = [["initial policy", *(common.spread([r["initial"][t] for r in next(iter(runs.values()))]) for t in ts),
             0, 0]]
    for method, by_seed in runs.items():
        rows.append([method, *(common.spread([r["final"][t] for r in by_seed]) for t in ts),
                     f"{statistics.mean(r['generated_tokens'] for r in by_seed):,.0f}",
                     f"{statistics.mean(r['iterations'] for r in by_seed):g}"])
    rows += [[name, *(f"{v:.3f}" for v in values), "", ""] for name, values in references(results).items()]
    return "\n".join([common.header(results),
                      f"Seeds {results['seeds']}; token budget {results['token_budget']}; the runs took {minutes:.0f} "
                      "min in all. Score = mean ± sd over the seeds of the evaluation score by turn h.\n",
                      common.table(["method", *(f"turn {t}" for t in ts), "generated tokens", "iterations"], rows)])


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, ts = results["runs"], turns(results)
    x = [int(t) for t in ts]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / (len(runs) + 1)
    for i, (method, by_seed) in enumerate(runs.items()):
        finals = [[r["final"][t] for r in by_seed] for t in ts]
        ax.bar([t + (i - len(runs) / 2) * width for t in x], [statistics.mean(v) for v in finals], width,
               yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in finals], capsize=2, label=method)
    initial = [statistics.mean(r["initial"][t] for r in next(iter(runs.values()))) for t in ts]
    ax.bar([t + len(runs) / 2 * width for t in x], initial, width, color="lightgray", label="initial policy")
    for name, values in references(results).items():
        ax.scatter(x, values, marker="_", s=400, label=name, zorder=3)
    ax.set_xticks(x, [f"turn {t}" for t in ts])
    ax.set_ylabel("evaluation score (mean, sd over seeds)")
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_run_flags(parser, seeds=[1, 2, 3], num_iterations=16, token_budget=60_000)
    parser.add_argument("--baseline_iterations", type=int, default=8, help="the baselines' iteration cap")
    parser.add_argument("--per_iteration", type=int, default=256, help="pairs per iteration (--pairs_per_rank)")
    parser.add_argument("--recorded", type=int, default=512, help="dialogues pi_0 plays once for the baselines")
    parser.add_argument("--task", default="guess_number")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = common.parse_args(parser)
    path = os.path.join(args.output_dir, "multiturn_comparison.json")
    if not args.report:
        runs_dir = common.runs_dir(args, "multiturn_comparison")
        common.save_results(path, {"seeds": args.seeds, "token_budget": args.token_budget,
                                   "runs": {m: [run(m, seed, args, runs_dir) for seed in args.seeds]
                                            for m in args.methods}})
        plot(common.load_results(path), os.path.join(args.output_dir, "multiturn_comparison.png"))
    print(report(common.load_results(path)))
