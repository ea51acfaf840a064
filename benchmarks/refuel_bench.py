"""Learning check for refuel.py on the guessing task: success rate per turn before and after training.

Runs refuel.py (the built-in task, its warm-started tiny policy) as a subprocess and prints, per turn h, the
share of evaluation games solved by turn h for the initial policy, the trained policy, random consistent play
and binary search (the optimum), plus the win rate of the trained policy against the initial one, the time
split and the regression diagnostics per iteration.

The defaults are the measured configuration quoted in docs/refuel.md: the reward is one bit at the end of a
game, so the regression targets are noisy and REFUEL needs thousands of dialogues per iteration to move (with
64 it does not, measurably). About 20-25 minutes on 2 CPU cores, plus 15 for the 1000-step warm start the first
time (cached).

    .venv/bin/python benchmarks/refuel_bench.py [--num_iterations 10] [--seed 1] [--nproc 1] [more refuel.py flags]
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
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import utils  # noqa: E402


def first_guesses(policy: str, seed: int, games: int = 512) -> list[int | None]:
    """The opening guess of `games` games at the training temperature. Turn 1 sees the same state in every
    game, so its choice pays off only through the later turns: the midpoint is best, an end worst."""
    game, tokenizer = utils.GuessNumber(), utils.load_tokenizer(policy)
    prompt = utils.chat_token_ids(tokenizer, game.new_episode(1).messages, add_generation_prompt=True)
    engine = utils.make_engine(policy, utils.init_distributed()[2], 1024, seed, False, 0.3, 2**28, "vllm")
    seeds = [utils.sample_seed(seed, "first guess", i) for i in range(games)]
    completions = engine.generate([prompt] * games, 8, 0.8, seeds)
    engine.close()
    return [game.parse(c.text) for c in completions]

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_iterations", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--nproc", type=int, default=1, help="ranks (torchrun) for the run")
    parser.add_argument("--dialogues_per_rank", type=int, default=2048)
    parser.add_argument("--minibatch_pairs", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--eta", type=float, default=5.0)
    parser.add_argument("--warm_start_steps", type=int, default=1000)
    args, extra = parser.parse_known_args()

    output_dir = tempfile.mkdtemp(prefix="refuel_bench_")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               os.path.join(REPO, "refuel.py"), "--output_dir", output_dir, "--run_name", "bench",
               "--seed", str(args.seed), "--num_iterations", str(args.num_iterations),
               "--eval_every", str(args.num_iterations), "--dialogues_per_rank", str(args.dialogues_per_rank),
               "--minibatch_pairs", str(args.minibatch_pairs), "--micro_batch_pairs", str(args.minibatch_pairs),
               "--lr", str(args.lr), "--eta", str(args.eta), "--warm_start_steps", str(args.warm_start_steps), *extra]
    started = time.time()
    subprocess.run(command, check=True)
    wall = time.time() - started
    with open(os.path.join(output_dir, "bench", "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    initial, final = metrics[0], metrics[-1]
    turns = sorted(int(k.rsplit("turn", 1)[1]) for k in initial if k.startswith("eval/score_turn"))

    print(f"\ncommand: {' '.join(command[3:])}\nwall time: {wall / 60:.1f} min\n")
    print("| turn h | initial policy | after REFUEL | win rate vs initial | random consistent "
          "| binary search (optimal) |")
    print("|---|---|---|---|---|---|")
    for t in turns:
        print(f"| {t} | {initial[f'eval/score_turn{t}']:.3f} | {final[f'eval/score_turn{t}']:.3f} | "
              f"{final[f'eval/winrate_vs_initial_turn{t}']:.3f} | "
              f"{initial[f'reference/random consistent_turn{t}']:.3f} | "
              f"{initial[f'reference/binary search (optimal)_turn{t}']:.3f} |")
    iterations = metrics[1:]
    phases = [k for k in iterations[0] if k.startswith("time/")]
    total = sum(sum(m[k] for k in phases) for m in iterations)
    print("\n| phase | mean s / iteration | share |\n|---|---|---|")
    for k in phases:
        spent = sum(m[k] for m in iterations)
        print(f"| {k[5:]} | {spent / len(iterations):.2f} | {spent / total:.0%} |")
    policies = {"initial policy": utils.guess_number_policy(
        utils.GuessNumber(), utils.resolve_model_path(utils.EMBEDDED_SMOLLM2), args.warm_start_steps),
        "after REFUEL": os.path.join(output_dir, "bench", "checkpoints", f"update_{args.num_iterations:06d}", "hf")}
    print("\n| first guess (512 games, T 0.8) | share in 12..21 | mean distance from 16.5 | most common |"
          "\n|---|---|---|---|")
    for name, path in policies.items():
        guesses = first_guesses(path, args.seed)
        valid = [g for g in guesses if g is not None]
        common = ", ".join(f"{g} ({n})" for g, n in collections.Counter(guesses).most_common(3))
        print(f"| {name} | {sum(12 <= g <= 21 for g in valid) / len(guesses):.3f} | "
              f"{sum(abs(g - 16.5) for g in valid) / max(1, len(valid)):.2f} | {common} |")
    print("\n| iteration | train reward (dialogue A) | loss | val/loss | val/sign_align |\n|---|---|---|---|---|")
    for m in iterations:
        print(f"| {m['update']} | {m['reward/score']:.3f} | {m['loss/refuel']:.3f} | {m['val/loss']:.3f} | "
              f"{m['val/sign_align']:.3f} |")
    utils.shutdown()
