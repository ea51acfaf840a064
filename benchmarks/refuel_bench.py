"""Learning check for refuel.py on the guessing task: success rate per turn before and after training.

Runs refuel.py twice from the same warm-started tiny policy and seed, with the paper's horizon sampling
(H' ~ U{1..H}, h ~ U{1..H'}) and with uniform sampling (every dialogue played to H, h ~ U{1..H}), all other flags
refuel.py's defaults (or those given here). Prints, per turn h, the share of the 1024 evaluation games solved by
turn h for the initial policy, each trained policy, random consistent play and binary search (the optimum), the
paired win rates against the initial policy, the opening guess of each policy, the time split and the
regression diagnostics per iteration. About 13 minutes on 2 CPU cores, plus 6 for the warm start the first
time (cached).

    .venv/bin/python benchmarks/refuel_bench.py [--num_iterations 16] [--seed 1] [--nproc 1] [more refuel.py flags]
"""

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import engines  # noqa: E402
import utils  # noqa: E402
from tasks.guess_number import GuessNumber, warm_start_policy  # noqa: E402

SAMPLINGS = ("paper", "uniform")


def first_guesses(policy: str, game: GuessNumber, seed: int, games: int = 512) -> list[int | None]:
    """The opening guess of `games` games at the training temperature. Turn 1 sees the same state in every
    game, so its choice pays off only through the later turns: the midpoint is best, an end worst."""
    tokenizer = utils.load_tokenizer(policy)
    prompt = utils.chat_token_ids(tokenizer, game.new_episode(1).messages, add_generation_prompt=True)
    engine = engines.make_engine(policy, utils.init_distributed()[2], 1024, seed, False, 0.3, 2**28, "vllm")
    seeds = [utils.sample_seed(seed, "first guess", i) for i in range(games)]
    completions = engine.generate([prompt] * games, 8, 0.8, seeds)
    engine.close()
    return [game.parse(c.text) for c in completions]


def plot_scores_by_turn(metrics: dict[str, list[dict]], turns: list[int], path: str) -> None:
    """Grouped bars: the share of games solved by turn h, for the initial policy, each trained one and the
    task's references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    initial = metrics[SAMPLINGS[0]][0]
    bars = {"initial policy": [initial[f"eval/score_turn{t}"] for t in turns]}
    bars.update({f"REFUEL, {s} h": [metrics[s][-1][f"eval/score_turn{t}"] for t in turns] for s in SAMPLINGS})
    for name in ("random consistent", "binary search (optimal)"):
        bars[name] = [initial[f"reference/{name}_turn{t}"] for t in turns]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(bars)
    for i, (name, values) in enumerate(bars.items()):
        ax.bar([t + (i - (len(bars) - 1) / 2) * width for t in turns], values, width, label=name)
    ax.set_xticks(turns, [f"by turn {t}" for t in turns])
    ax.set_ylabel("share of games solved")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_iterations", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--nproc", type=int, default=1, help="ranks (torchrun) for each run")
    parser.add_argument("--plot", default=os.path.join(REPO, "docs", "refuel_bench.png"), help="where the plot goes")
    args, extra = parser.parse_known_args()
    utils.quiet_third_party(verbose=False)

    output_dir = tempfile.mkdtemp(prefix="refuel_bench_")
    metrics, walls = {}, {}
    for sampling in SAMPLINGS:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   os.path.join(REPO, "refuel.py"), "--output_dir", output_dir, "--run_name", sampling,
                   "--seed", str(args.seed), "--num_iterations", str(args.num_iterations),
                   "--eval_every", str(args.num_iterations), "--horizon_sampling", sampling, *extra]
        print(" ".join(command[3:]), flush=True)
        started = time.time()
        subprocess.run(command, check=True)
        walls[sampling] = time.time() - started
        with open(os.path.join(output_dir, sampling, "metrics.jsonl")) as f:
            metrics[sampling] = [json.loads(line) for line in f]
    with open(os.path.join(output_dir, SAMPLINGS[0], "args.json")) as f:
        run_args = json.load(f)

    initial = metrics[SAMPLINGS[0]][0]
    turns = sorted(int(k.rsplit("turn", 1)[1]) for k in initial if k.startswith("eval/score_turn"))
    print(f"\nrefuel.py flags beyond its defaults: --seed {args.seed} --num_iterations {args.num_iterations} "
          f"{' '.join(extra)}\nwall time: " + ", ".join(f"{s} {w / 60:.1f} min" for s, w in walls.items()) + "\n")
    print("| turn h | initial policy | " + " | ".join(f"REFUEL, {s} h (win rate)" for s in SAMPLINGS)
          + " | random consistent | binary search (optimal) |")
    print("|---|---|" + "---|" * len(SAMPLINGS) + "---|---|")
    for t in turns:
        trained = " | ".join(f"{metrics[s][-1][f'eval/score_turn{t}']:.3f} "
                             f"({metrics[s][-1][f'eval/winrate_vs_initial_turn{t}']:.3f})" for s in SAMPLINGS)
        print(f"| {t} | {initial[f'eval/score_turn{t}']:.3f} | {trained} | "
              f"{initial[f'reference/random consistent_turn{t}']:.3f} | "
              f"{initial[f'reference/binary search (optimal)_turn{t}']:.3f} |")

    plot_scores_by_turn(metrics, turns, args.plot)
    print(f"\nplot: {args.plot}")

    phases = [k for k in metrics[SAMPLINGS[0]][1] if k.startswith("time/")]
    print("\n| phase | " + " | ".join(f"{s} h: s / iteration (share)" for s in SAMPLINGS) + " |")
    print("|---|" + "---|" * len(SAMPLINGS))
    for k in phases:
        cells = []
        for s in SAMPLINGS:
            iterations = metrics[s][1:]
            total = sum(sum(m[p] for p in phases) for m in iterations)
            spent = sum(m[k] for m in iterations)
            cells.append(f"{spent / len(iterations):.2f} ({spent / total:.0%})")
        print(f"| {k[5:]} | " + " | ".join(cells) + " |")

    game = GuessNumber(run_args["guess_max"], len(turns))
    middle = (game.n + 1) / 2
    policies = {"initial policy": warm_start_policy(
        game, utils.resolve_model_path(utils.EMBEDDED_SMOLLM2), run_args["warm_start_steps"])}
    for s in SAMPLINGS:
        policies[f"REFUEL, {s} h"] = os.path.join(output_dir, s, "checkpoints",
                                                  f"iteration_{args.num_iterations:06d}", "hf")
    print(f"\n| first guess (512 games, T 0.8) | share within 1 of {middle:g} | mean distance from {middle:g} "
          "| most common |\n|---|---|---|---|")
    for name, path in policies.items():
        guesses = first_guesses(path, game, args.seed)
        valid = [g for g in guesses if g is not None]
        common = ", ".join(f"{g} ({n})" for g, n in collections.Counter(guesses).most_common(3))
        print(f"| {name} | {sum(abs(g - middle) <= 1 for g in valid) / len(guesses):.3f} | "
              f"{sum(abs(g - middle) for g in valid) / max(1, len(valid)):.2f} | {common} |")

    for s in SAMPLINGS:
        print(f"\n{s} h:\n\n| iteration | train reward (dialogue A) | loss | val/loss | val/sign_align |"
              "\n|---|---|---|---|---|")
        for m in metrics[s][1:]:
            print(f"| {m['iteration']} | {m['reward/score']:.3f} | {m['loss/refuel']:.3f} | {m['val/loss']:.3f} | "
                  f"{m['val/sign_align']:.3f} |")
    utils.shutdown()
