"""Learning check for refuel.py on the guessing task: success rate per turn before and after training.

Runs refuel.py (embedded task and warm-started tiny policy) as a subprocess and prints, per turn h, the share
of evaluation games solved by turn h for the initial policy, the trained policy, random consistent play and
binary search (the optimum), plus the win rate of the trained policy against the initial one and the time split.

    .venv/bin/python benchmarks/refuel_bench.py [--num_iterations 12] [--seed 1] [--nproc 1] [extra refuel.py flags]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_iterations", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--nproc", type=int, default=1, help="ranks (torchrun) for the run")
    args, extra = parser.parse_known_args()

    output_dir = tempfile.mkdtemp(prefix="refuel_bench_")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               os.path.join(REPO, "refuel.py"), "--output_dir", output_dir, "--run_name", "bench",
               "--seed", str(args.seed), "--num_iterations", str(args.num_iterations),
               "--eval_every", str(args.num_iterations), *extra]
    started = time.time()
    subprocess.run(command, check=True)
    wall = time.time() - started
    with open(os.path.join(output_dir, "bench", "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    initial, final = metrics[0], metrics[-1]
    turns = sorted(int(k.rsplit("turn", 1)[1]) for k in initial if k.startswith("eval/score_turn"))

    print(f"\ncommand: {' '.join(command[3:])}\nwall time: {wall / 60:.1f} min\n")
    print("| turn h | initial policy | after REFUEL | win rate vs initial | random consistent | binary search (optimal) |")
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
    print("\n| iteration | train reward (dialogue A) | loss | val/loss | val/sign_align |\n|---|---|---|---|---|")
    for m in iterations:
        print(f"| {m['update']} | {m['reward/score']:.3f} | {m['loss/refuel']:.3f} | {m['val/loss']:.3f} | "
              f"{m['val/sign_align']:.3f} |")
