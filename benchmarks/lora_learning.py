"""Does REFUEL learn with LoRA adapters as it does with full fine-tuning? refuel.py on the guessing game with uniform
horizon sampling, from the same warm-started tiny policy, fully fine-tuned and with `--lora_rank 8`, each at the
learning rate that suits it:

1. Tuning, on `--tuning_seed` only: each side runs every learning rate of its grid (`--full_lrs`, `--lora_lrs`;
   adapters usually want a larger one) and keeps the one with the best final share of games solved at turn H.
2. The reported runs: each side at its chosen rate on every seed of `--seeds` (none of them the tuning seed). A
   seed fixes the training games and the sampling, and every run evaluates on the same 1024 games, so the two
   sides' runs on one seed are paired.
3. The report: per turn h, the share of evaluation games solved by turn h, the initial policy's and each side's
   final one as the mean and the 95% interval over the seeds, the paired difference LoRA minus full with its
   interval, and every tuning cell.

Every other flag is refuel.py's default or given after `--`. `--jobs 2` runs two runs at a time, each on one
intra-op thread (two runs on 2 cores, each with a thread per core, spin against each other). Writes
lora_learning.json and lora_learning.png to --output_dir; the flags all benchmarks share are described in
benchmarks/common.py.

    .venv/bin/python benchmarks/lora_learning.py [--seeds 1 2 3] [--tuning_seed 0] [--num_iterations 8]
        [--full_lrs ...] [--lora_lrs ...] [--jobs 2] [--output_dir docs] [--runs_dir DIR] [-- refuel.py flags]
    .venv/bin/python benchmarks/lora_learning.py --report     # the tables again, from docs/lora_learning.json
"""

import argparse
import concurrent.futures
import os

import common

SIDES = {"full fine-tuning": [], "LoRA r=8": ["--lora_rank", "8"]}
REFERENCES = ("random consistent", "binary search (optimal)")


def final_score(run: dict, turn: int | None = None) -> float:
    """The run's final share of games solved by `turn` (default: the last turn)."""
    last = run["metrics"][-1]
    return last[f"eval/score_turn{turn or common.score_turns(last)[-1]}"]


def measure(args: argparse.Namespace) -> dict:
    """The tuning grid of both sides on the tuning seed, then each side's chosen rate on every seed."""
    runs_dir = common.runs_dir(args, "lora_learning")
    n = args.num_iterations
    grids = {"full fine-tuning": args.full_lrs, "LoRA r=8": args.lora_lrs}

    def run(side: str, lr: float, seed: int) -> dict:
        flags = ["--seed", str(seed), "--num_iterations", str(n), "--eval_every", str(n), "--save_every", str(n),
                 "--horizon_sampling", "uniform", "--lr", str(lr), *SIDES[side], *common.budget_flags(args),
                 *args.script_flags]
        name = f"{'lora' if SIDES[side] else 'full'}_lr{lr:g}_seed{seed}"
        return {"seed": seed, "lr": lr, **common.run_script("refuel.py", flags, runs_dir, name,
                                                            keep_checkpoints=False)}

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:  # every run of a step queued before any ends
        tuning = {side: [pool.submit(run, side, lr, args.tuning_seed) for lr in lrs] for side, lrs in grids.items()}
        tuning = {side: [cell.result() for cell in cells] for side, cells in tuning.items()}
        chosen = {side: max(cells, key=final_score)["lr"] for side, cells in tuning.items()}
        reported = {side: [pool.submit(run, side, chosen[side], seed) for seed in args.seeds] for side in SIDES}
        reported = {side: [r.result() for r in side_runs] for side, side_runs in reported.items()}
    return {"tuning_seed": args.tuning_seed, "seeds": args.seeds, "num_iterations": n, "grid": tuning,
            "chosen": chosen, "runs": reported}


def report(results: dict) -> str:
    runs, chosen = results["runs"], results["chosen"]
    first = next(iter(runs.values()))[0]["metrics"][0]
    turns = common.score_turns(first)
    lines = [common.header(results),
             f"Reported seeds {', '.join(map(str, results['seeds']))}, tuned on seed {results['tuning_seed']}; "
             f"{results['num_iterations']} iterations a run. Chosen learning rates: "
             + ", ".join(f"{side} {lr:g}" for side, lr in chosen.items()) + ". Runs (`--output_dir` and "
             "`--run_name` left out): " + ", ".join(f"`{r['command']}` ({r['seconds'] / 60:.1f} min)"
                                                   for side in runs for r in runs[side][:1]) + ", and the same on "
             "the other seeds.\n",
             "Per turn h: share of the evaluation games solved by turn h, the mean and its 95% interval over the "
             "seeds; the difference is paired by seed.\n"]
    rows = []
    for t in turns:
        finals = {side: [final_score(r, t) for r in side_runs] for side, side_runs in runs.items()}
        full, lora = finals["full fine-tuning"], finals["LoRA r=8"]
        rows.append([t, common.with_interval([r["metrics"][0][f"eval/score_turn{t}"] for r in runs["LoRA r=8"]]),
                     common.with_interval(full), common.with_interval(lora),
                     common.with_interval([b - a for a, b in zip(full, lora)]),
                     *(f"{first[f'reference/{name}_turn{t}']:.3f}" for name in REFERENCES)])
    lines += [common.table(["turn h", "initial policy", "full fine-tuning", "LoRA r=8", "LoRA − full (paired)",
                            *REFERENCES], rows), ""]
    rows = [[side, f"{cell['lr']:g}", f"{final_score(cell):.3f}", f"{cell['seconds'] / 60:.1f}"]
            for side, cells in results["grid"].items() for cell in cells]
    lines += [f"Tuning grid on seed {results['tuning_seed']} (chosen: the best final share solved at turn "
              f"{turns[-1]}):\n", common.table(["side", "lr", f"solved by turn {turns[-1]}", "minutes"], rows)]
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    """Grouped bars with 95% intervals: the share of games solved by turn h, for the initial policy, both trained
    sides and the task's references."""
    runs = results["runs"]
    first = next(iter(runs.values()))[0]["metrics"][0]
    turns = common.score_turns(first)
    bars = {"initial policy": [common.interval95([r["metrics"][0][f"eval/score_turn{t}"] for r in runs["LoRA r=8"]])
                               for t in turns]}
    bars.update({f"REFUEL, {side}": [common.interval95([final_score(r, t) for r in side_runs]) for t in turns]
                 for side, side_runs in runs.items()})
    bars.update({name: [first[f"reference/{name}_turn{t}"] for t in turns] for name in REFERENCES})
    common.plot_by_turn(bars, turns, "share of games solved", path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_run_flags(parser, seeds=[1, 2, 3], num_iterations=8, token_budget=None)
    parser.add_argument("--tuning_seed", type=int, default=0, help="the seed the grids run on, never reported")
    parser.add_argument("--full_lrs", type=float, nargs="+", default=[2e-4, 5e-4, 1e-3, 2e-3],
                        help="full fine-tuning's learning rates to tune over (refuel.py's default is 5e-4)")
    parser.add_argument("--lora_lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2],
                        help="LoRA's learning rates to tune over")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each on one intra-op thread when > 1")
    args = common.parse_args(parser)
    if args.tuning_seed in args.seeds:
        parser.error("--tuning_seed must not be one of the reported --seeds")
    path = os.path.join(args.output_dir, "lora_learning.json")
    if not args.report:
        if args.jobs > 1:
            os.environ["OMP_NUM_THREADS"] = "1"
        common.save_results(path, measure(args))
        plot(common.load_results(path), os.path.join(args.output_dir, "lora_learning.png"))
    print(report(common.load_results(path)))
