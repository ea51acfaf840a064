"""Learning check for refuel.py on the guessing task: success rate per turn before and after training.

Runs refuel.py, per seed, from the same warm-started tiny policy, with the paper's horizon sampling
(H' ~ U{1..H}, h ~ U{1..H'}) and with uniform sampling (every dialogue played to H, h ~ U{1..H}), all other flags
refuel.py's defaults (or those given after `--`). Reports, per turn h, the share of the 1024 evaluation games
solved by turn h for the initial policy, each trained policy (mean ± sd over the seeds), random consistent play and
binary search (the optimum), the paired win rates against the initial policy, the opening guess of each policy,
the time split and the regression diagnostics per iteration. One seed: about 13 minutes on 2 CPU cores, plus 6 for
the warm start the first time (cached). Writes refuel_bench.json and refuel_bench.png to --output_dir; the flags
all benchmarks share are described in benchmarks/common.py.

    .venv/bin/python benchmarks/refuel_bench.py [--seeds 1] [--num_iterations 16] [--token_budget T] [--nproc 1]
        [--output_dir docs] [--runs_dir DIR] [-- more refuel.py flags]
    .venv/bin/python benchmarks/refuel_bench.py --report     # the tables again, from docs/refuel_bench.json
"""

import argparse
import collections
import json
import os
import statistics
import sys

import common

sys.path.insert(0, common.REPO)
import engines  # noqa: E402
import lifecycle  # noqa: E402
import utils  # noqa: E402
from tasks.guess_number import GuessNumber, warm_start_policy  # noqa: E402

SAMPLINGS = ("paper", "uniform")
REFERENCES = ("random consistent", "binary search (optimal)")
PHASES = ("rollout", "reward", "old_logprobs", "train", "sync")


def first_guesses(policy: str, game: GuessNumber, seed: int, games: int) -> list[int | None]:
    """The opening guess of `games` games at the training temperature. Turn 1 sees the same state in every
    game, so its choice pays off only through the later turns: the midpoint is best, an end worst."""
    tokenizer = utils.load_tokenizer(policy)
    prompt = utils.chat_token_ids(tokenizer, game.new_episode(1).messages, add_generation_prompt=True)
    engine = engines.make_engine(policy, utils.init_distributed()[2], max_model_len=1024, seed=seed, bf16=False,
                                 gpu_memory_utilization=0.3, kv_cache_memory_bytes=2**28, backend="vllm")
    seeds = [utils.sample_seed(seed, "first guess", i) for i in range(games)]
    completions = engine.generate([prompt] * games, 8, 0.8, seeds)
    engine.close()
    return [game.parse(c.text) for c in completions]


def measure(args: argparse.Namespace) -> dict:
    """Both samplings for every seed, then the opening guesses of the initial and the trained policies."""
    runs_dir = common.runs_dir(args, "refuel_bench")
    n = args.num_iterations
    runs = {s: [] for s in SAMPLINGS}
    for seed in args.seeds:
        for sampling in SAMPLINGS:
            flags = ["--seed", str(seed), "--num_iterations", str(n), "--eval_every", str(n), "--horizon_sampling",
                     sampling, *common.budget_flags(args), *args.script_flags]
            runs[sampling].append({"seed": seed, **common.run_script("refuel.py", flags, runs_dir,
                                                                     f"{sampling}_{seed}", args.nproc)})
    with open(os.path.join(runs_dir, f"{SAMPLINGS[0]}_{args.seeds[0]}", "args.json")) as f:
        run_args = json.load(f)
    turns = common.score_turns(runs[SAMPLINGS[0]][0]["metrics"][0])
    game = GuessNumber(run_args["guess_max"], len(turns))
    initial = run_args["model"] or warm_start_policy(game, utils.resolve_model_path(utils.EMBEDDED_SMOLLM2),
                                                     run_args["warm_start_steps"])
    guesses = collections.defaultdict(list)
    for i, seed in enumerate(args.seeds):
        guesses["initial policy"] += first_guesses(initial, game, seed, args.first_guess_games)
        for s in SAMPLINGS:
            last = runs[s][i]["metrics"][-1]["iteration"]
            trained = os.path.join(runs_dir, f"{s}_{seed}", "checkpoints", f"iteration_{last:06d}", "hf")
            guesses[f"REFUEL, {s} h"] += first_guesses(trained, game, seed, args.first_guess_games)
    return {"seeds": args.seeds, "num_iterations": n, "guess_max": game.n, "first_guess_games": args.first_guess_games,
            "runs": runs, "first_guesses": guesses}


def report(results: dict) -> str:
    runs = results["runs"]
    initials = [r["metrics"][0] for r in runs[SAMPLINGS[0]]]
    finals = {s: [r["metrics"][-1] for r in runs[s]] for s in SAMPLINGS}
    turns = common.score_turns(initials[0])
    lines = [common.header(results), "Runs (`--output_dir` and `--run_name` left out): " + ", ".join(
        f"`{r['command']}` ({r['seconds'] / 60:.1f} min)" for s in SAMPLINGS for r in runs[s]) + ".\n",
        "Per turn h: share of evaluation games solved by turn h, and in brackets the paired win rate against the "
        "initial policy on the same games (ties 1/2).\n"]
    rows = []
    for t in turns:
        trained = [f"{common.spread([m[f'eval/score_turn{t}'] for m in finals[s]])} "
                   f"({statistics.mean(m[f'eval/winrate_vs_initial_turn{t}'] for m in finals[s]):.3f})"
                   for s in SAMPLINGS]
        rows.append([t, common.spread([m[f"eval/score_turn{t}"] for m in initials]), *trained,
                     *(f"{initials[0][f'reference/{name}_turn{t}']:.3f}" for name in REFERENCES)])
    lines += [common.table(["turn h", "initial policy", *(f"REFUEL, {s} h (win rate)" for s in SAMPLINGS),
                            *REFERENCES], rows), ""]

    middle = (results["guess_max"] + 1) / 2
    rows = []
    for name, guesses in results["first_guesses"].items():
        valid = [g for g in guesses if g is not None]
        common_guesses = ", ".join(f"{g} ({k})" for g, k in collections.Counter(guesses).most_common(3))
        rows.append([name, f"{sum(abs(g - middle) <= 1 for g in valid) / len(guesses):.3f}",
                     f"{sum(abs(g - middle) for g in valid) / max(1, len(valid)):.2f}", common_guesses])
    lines += [common.table([f"first guess ({results['first_guess_games']} games a seed, T 0.8)",
                            f"share within 1 of {middle:g}", f"mean distance from {middle:g}", "most common"], rows),
              ""]

    iterations = {s: [m for r in runs[s] for m in r["metrics"][1:]] for s in SAMPLINGS}
    rows = []
    for phase in PHASES:
        cells = []
        for s in SAMPLINGS:
            total = sum(m[f"time/{p}"] for m in iterations[s] for p in PHASES)
            spent = sum(m[f"time/{phase}"] for m in iterations[s])
            cells.append(f"{spent / len(iterations[s]):.2f} ({spent / total:.0%})")
        rows.append([phase, *cells])
    lines += ["Time per iteration (the evaluations excluded):\n",
              common.table(["phase", *(f"{s} h: s / iteration (share)" for s in SAMPLINGS)], rows)]

    for s in SAMPLINGS:
        rows = [[by_seed[0]["iteration"], *(common.spread([m[k] for m in by_seed]) for k in
                                             ("reward/score", "loss/refuel", "val/loss", "val/sign_align"))]
                for by_seed in zip(*(r["metrics"][1:] for r in runs[s]))]
        lines += [f"\n{s} h, regression diagnostics per iteration:\n",
                  common.table(["iteration", "train reward (dialogue A)", "loss", "val/loss", "val/sign_align"], rows)]
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    """Grouped bars: the share of games solved by turn h, for the initial policy, each trained one and the
    task's references (means over the seeds)."""
    runs = results["runs"]
    initial = runs[SAMPLINGS[0]][0]["metrics"][0]
    turns = common.score_turns(initial)

    def mean_score(s: str, index: int, t: int) -> float:
        return statistics.mean(r["metrics"][index][f"eval/score_turn{t}"] for r in runs[s])

    bars = {"initial policy": [mean_score(SAMPLINGS[0], 0, t) for t in turns]}
    bars.update({f"REFUEL, {s} h": [mean_score(s, -1, t) for t in turns] for s in SAMPLINGS})
    bars.update({name: [initial[f"reference/{name}_turn{t}"] for t in turns] for name in REFERENCES})
    common.plot_by_turn(bars, turns, "share of games solved", path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_run_flags(parser, seeds=[1], num_iterations=16, token_budget=None)
    parser.add_argument("--nproc", type=int, default=1, help="ranks (torchrun) for each run")
    parser.add_argument("--first_guess_games", type=int, default=512,
                        help="opening guesses sampled per policy and seed")
    args = common.parse_args(parser)
    path = os.path.join(args.output_dir, "refuel_bench.json")
    if not args.report:
        lifecycle.quiet_third_party(verbose=False)
        common.save_results(path, measure(args))
        plot(common.load_results(path), os.path.join(args.output_dir, "refuel_bench.png"))
    print(report(common.load_results(path)))
    if not args.report:
        utils.shutdown()
