"""Benchmark of rebel.py on this machine, printed as Markdown tables.

Three measurements, taken side by side in one run, because a shared machine is noisy and only ratios
measured together compare well:
  (a) rollout throughput: the vLLM engine vs the transformers `generate` fallback, same model, prompts and seeds
      (those of the first seed);
  (b) time per REBEL iteration, split into rollout / reward / old log-probs / train / sync (rebel.py's metrics),
      over every seed's run;
  (c) a learning check: greedy reward on the held-out prompts before and after training, and the training reward
      over the first vs the last iterations (mean ± sd over the seeds).
One seed: about 6 minutes on 2 CPU cores. Writes rebel_bench.json and rebel_bench.png (the training reward and the
greedy evaluation reward against iteration) to --output_dir; the flags all benchmarks share are described in
benchmarks/common.py.

    .venv/bin/python benchmarks/rebel_bench.py [--seeds 1] [--num_iterations 16] [--token_budget T]
        [--output_dir docs] [--runs_dir DIR] [--skip_throughput] [-- more rebel.py flags]
    .venv/bin/python benchmarks/rebel_bench.py --skip_throughput --num_iterations 32 -- --lr 3e-5
    .venv/bin/python benchmarks/rebel_bench.py --report     # the tables again, from docs/rebel_bench.json
"""

import argparse
import json
import os
import statistics
import sys
import time

import common
import torch

sys.path.insert(0, common.REPO)
import dialogues  # noqa: E402
import engines  # noqa: E402
import lifecycle  # noqa: E402
import utils  # noqa: E402

PHASES = ["rollout", "reward", "old_logprobs", "train", "sync"]
SCORE = "eval/score_turn1"


def matmul_gflops() -> float:
    """A quick probe of how fast the machine is right now (fp32 1024x1024 matmuls), to show the noise."""
    a = torch.randn(1024, 1024)
    t0 = time.time()
    for _ in range(10):
        a @ a
    return 10 * 2 * 1024**3 / (time.time() - t0) / 1e9


def throughput(args: argparse.Namespace) -> dict:
    """(a) generated tokens, seconds and finished share of each timed call of both engines on the same templated
    prompts and per-request seeds."""
    rank, world_size, device = utils.init_distributed()
    path = utils.resolve_model_path(args.model)
    tokenizer = utils.load_tokenizer(path)
    chats, _ = dialogues.load_prompts(os.path.join(common.REPO, "data", "prompts.jsonl"), "prompt")
    prompts = [utils.chat_token_ids(tokenizer, d, add_generation_prompt=True) for d in chats[: args.num_prompts]]
    bf16 = device.type == "cuda"  # as rebel.py: fp32 on the CPU
    seed = args.seeds[0]

    t0 = time.time()
    vllm_engine = engines.make_engine(path, device, max_model_len=256 + args.max_new_tokens, seed=seed, bf16=bf16,
                                      gpu_memory_utilization=0.3, kv_cache_memory_bytes=None, backend="vllm")
    starts = {"vLLM": time.time() - t0}
    t0 = time.time()
    hf_engine = engines.TransformersEngine(path, device, torch.bfloat16 if bf16 else torch.float32)
    starts["transformers"] = time.time() - t0
    both = {"vLLM": vllm_engine, "transformers": hf_engine}

    def run(engine, repeat):
        seeds = [utils.sample_seed(seed, repeat, j) for j in range(len(prompts))]
        t0 = time.time()
        out = engine.generate(prompts, args.max_new_tokens, args.temperature, seeds)
        return {"tokens": sum(len(c.token_ids) for c in out), "seconds": time.time() - t0,
                "finished": sum(c.finished for c in out) / len(out)}

    for name, engine in both.items():
        common.log(f"(a) warm-up {name}")
        run(engine, -1)
    calls = {name: [] for name in both}
    probes = [matmul_gflops()]
    for repeat in range(args.repeats):
        # alternate which engine goes first, so slow drifts of the machine hit both alike
        for name in (list(both) if repeat % 2 == 0 else list(both)[::-1]):
            calls[name].append(run(both[name], repeat))
            common.log(f"(a) repeat {repeat + 1}/{args.repeats} {name}: {calls[name][-1]['tokens']} tokens in "
                       f"{calls[name][-1]['seconds']:.2f}s")
        probes.append(matmul_gflops())
    utils.shutdown(vllm_engine, hf_engine)
    import transformers
    import vllm

    return {"model": args.model, "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
            "num_prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "repeats": args.repeats, "dtype": "bf16" if bf16 else "fp32", "device": str(device),
            "torch_threads": torch.get_num_threads(), "versions": {"torch": torch.__version__, "vllm": vllm.__version__,
                                                                    "transformers": transformers.__version__},
            "engine_start_seconds": starts, "calls": calls, "matmul_gflops": probes}


def training(args: argparse.Namespace) -> list[dict]:
    """(b) and (c): a rebel.py run per seed, evaluated at iteration 0 and at the last; one checkpoint, at the end."""
    runs_dir = common.runs_dir(args, "rebel_bench")
    n = args.num_iterations
    runs = []
    for seed in args.seeds:
        flags = ["--model", args.model, "--seed", str(seed), "--num_iterations", str(n), "--eval_every", str(n),
                 "--save_every", str(n), *common.budget_flags(args), *args.script_flags]
        run = common.run_script("rebel.py", flags, runs_dir, f"bench_{seed}")
        with open(os.path.join(runs_dir, f"bench_{seed}", "args.json")) as f:
            run_args = json.load(f)
        runs.append({"seed": seed, "responses_per_iteration": 2 * run_args["pairs_per_rank"],
                     "penalty_reward": run_args["penalty_reward"], **run})
    return runs


def report_throughput(a: dict) -> str:
    rate = {name: [c["tokens"] / c["seconds"] for c in calls] for name, calls in a["calls"].items()}
    rows = [[name, common.spread(rate[name], 1), common.spread([c["seconds"] for c in calls], 2),
             f"{statistics.mean(c['tokens'] for c in calls):.1f}",
             f"{statistics.mean(c['finished'] for c in calls):.3f}",
             f"{a['engine_start_seconds'][name]:.1f}"] for name, calls in a["calls"].items()]
    ratios = [v / h for v, h in zip(rate["vLLM"], rate["transformers"])]
    versions = ", ".join(f"{k} {v}" for k, v in a["versions"].items())
    return "\n".join([
        "### (a) Rollout throughput: vLLM vs transformers\n",
        f"{a['num_prompts']} prompts from data/prompts.jsonl (chat-templated, {a['prompt_tokens'][0]}-"
        f"{a['prompt_tokens'][1]} tokens), {a['max_new_tokens']} new tokens, temperature {a['temperature']}, one "
        f"generate call of all prompts per repeat, {a['repeats']} repeats after one warm-up call each, the same "
        f"per-request seeds for both engines. Model `{a['model']}`, {a['dtype']}, device `{a['device']}`, "
        f"{a['torch_threads']} torch threads; {versions}.\n",
        common.table(["engine", "generated tokens/s (mean ± sd)", "s per call", "tokens per call", "finished",
                      "engine start s"], rows),
        "",
        f"**vLLM / transformers tokens/s: {statistics.median(ratios):.2f}x** (median of the per-repeat ratios; "
        f"per repeat: {', '.join(f'{r:.2f}' for r in ratios)}). Machine probe between repeats: fp32 matmul at "
        f"{min(a['matmul_gflops']):.0f}-{max(a['matmul_gflops']):.0f} GFLOPS.",
        "",
    ])


def report_training(runs: list[dict], window: int) -> str:
    iterations = [m for r in runs for m in r["metrics"][1:]]
    per_phase = {p: [m[f"time/{p}"] for m in iterations] for p in PHASES}
    totals = [sum(m[f"time/{p}"] for p in PHASES) for m in iterations]
    later = [m["iteration"] > 1 for m in iterations]  # iteration 1 includes first-call costs

    def row(name, values):
        tail = [v for v, keep in zip(values, later) if keep]
        return [name, f"{statistics.mean(values):.4g}", f"{statistics.median(values):.4g}",
                f"{statistics.mean(tail):.4g}" if tail else "",
                f"{100 * statistics.mean(values) / statistics.mean(totals):.1f}%"]

    rates = [m["policy/response_tokens"] * r["responses_per_iteration"] / m["time/rollout"]
             for r in runs for m in r["metrics"][1:]]
    walls = statistics.mean(r["seconds"] for r in runs)
    timed = statistics.mean(sum(m[f"time/{p}"] for m in r["metrics"][1:] for p in PHASES) for r in runs)
    phases = "\n".join([
        f"### (b) Time per iteration ({len(iterations)} iterations of {len(runs)} run(s), one process each; "
        "rebel.py defaults except the flags shown)\n",
        "Runs: " + ", ".join(f"`{r['command']}`" for r in runs) + "\n",
        common.table(["phase", "mean s", "median s", "mean s, iterations 2+", "share of iteration"],
                     [row(p, v) for p, v in per_phase.items()] + [row("**iteration**", totals)]),
        "",
        f"Rollouts inside training: {runs[0]['responses_per_iteration']} responses per iteration, "
        f"{statistics.mean(rates):.4g} generated tokens/s on average. Wall time of a run {walls:.0f}s, of which "
        f"{timed:.0f}s in the timed phases; the rest is start-up (model loading, engine start), the two greedy "
        "evaluations and the checkpoint.",
        "",
    ])

    n = min(len(r["metrics"]) for r in runs) - 1
    k = max(1, min(window, n // 2))
    evaluated = [[m for m in r["metrics"] if SCORE in m] for r in runs]
    rows = [[f"{SCORE} (greedy reward, held-out prompts)", common.spread([e[0][SCORE] for e in evaluated], 4),
             common.spread([e[-1][SCORE] for e in evaluated], 4),
             common.spread([e[-1][SCORE] - e[0][SCORE] for e in evaluated], 4)]]
    for key in ["reward/score", "reward/total", "policy/response_tokens", "policy/finished", "reward/kl"]:
        first = [statistics.mean(m[key] for m in r["metrics"][1 : k + 1]) for r in runs]
        last = [statistics.mean(m[key] for m in r["metrics"][n - k + 1 : n + 1]) for r in runs]
        rows.append([f"{key} (training samples)", common.spread(first, 4), common.spread(last, 4),
                     common.spread([b - a for a, b in zip(first, last)], 4)])
    trace = [[by_seed[0]["iteration"], *(common.spread([m[key] for m in by_seed], 4) for key in
                                         ("reward/score", "policy/response_tokens", "policy/finished", "loss/rebel",
                                          "reward/kl")),
              common.spread([m[SCORE] for m in by_seed], 4) if all(SCORE in m for m in by_seed) else ""]
             for by_seed in zip(*(r["metrics"][1 : n + 1] for r in runs))]
    seeds = ", ".join(str(r["seed"]) for r in runs)
    learning = "\n".join([
        f"### (c) Learning check (seeds {seeds}; mean ± sd over the seeds where more than one)\n",
        f"Reward: rebel.py's `--reward_function` or `--reward_model` (default `tasks.chat:brevity_reward`: 1 for an "
        f"empty answer, 0 at 64 words; an unfinished response gets penalty_reward {runs[0]['penalty_reward']}). "
        f"\"before\" is {SCORE} at iteration 0 and the mean of iterations 1-{k} for training metrics; \"after\" is "
        f"{SCORE} at the last evaluation and the mean of iterations {n - k + 1}-{n}.\n",
        common.table(["metric", "before", "after", "change"], rows),
        "",
        "Per iteration:\n",
        common.table(["iteration", "reward/score", "response_tokens", "finished", "loss/rebel", "reward/kl", SCORE],
                     [[0, "", "", "", "", "", common.spread([e[0][SCORE] for e in evaluated], 4)]] + trace),
        "",
    ])
    return phases + "\n" + learning


def report(results: dict) -> str:
    sections = ["## rebel.py benchmark\n", common.header(results)]
    if results["throughput"] is not None:
        sections.append(report_throughput(results["throughput"]))
    if results["runs"]:
        sections.append(report_training(results["runs"], results["window"]))
    sections.append(f"Total benchmark time: {results['seconds']:.0f}s.")
    return "\n".join(sections)


def plot(runs: list[dict], path: str) -> None:
    """The training reward of every iteration and the greedy evaluation reward, per seed, against iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for i, r in enumerate(runs):
        trained = r["metrics"][1:]
        ax.plot([m["iteration"] for m in trained], [m["reward/score"] for m in trained], color=f"C{i}", alpha=0.6,
                label=f"seed {r['seed']}: training samples")
        evaluated = [m for m in r["metrics"] if SCORE in m]
        ax.plot([m["iteration"] for m in evaluated], [m[SCORE] for m in evaluated], color=f"C{i}", marker="o",
                linestyle="--", label=f"seed {r['seed']}: greedy, held-out prompts")
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_run_flags(parser, seeds=[1], num_iterations=16, token_budget=None)
    parser.add_argument("--model", default=utils.EMBEDDED_SMOLLM2, help="the policy of (a) and of the rebel.py runs")
    parser.add_argument("--skip_throughput", action="store_true", help="skip (a)")
    parser.add_argument("--skip_training", action="store_true", help="skip the rebel.py runs, (b) and (c)")
    parser.add_argument("--num_prompts", type=int, default=16, help="(a): prompts per generate call (the first ones)")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="(a): new tokens per response")
    parser.add_argument("--temperature", type=float, default=0.8, help="(a): sampling temperature")
    parser.add_argument("--repeats", type=int, default=3,
                        help="(a): timed generate calls per engine (after one warm-up call each), alternating")
    parser.add_argument("--window", type=int, default=4,
                        help='(c): iterations averaged for the "first" and "last" training reward')
    args = common.parse_args(parser)
    path = os.path.join(args.output_dir, "rebel_bench.json")
    if not args.report:
        lifecycle.quiet_third_party(verbose=False)
        started = time.time()
        a = None if args.skip_throughput else throughput(args)
        runs = [] if args.skip_training else training(args)
        common.save_results(path, {"seeds": args.seeds, "num_iterations": args.num_iterations, "window": args.window,
                                   "throughput": a, "runs": runs, "seconds": time.time() - started})
        if runs:
            plot(runs, os.path.join(args.output_dir, "rebel_bench.png"))
    print(report(common.load_results(path)), flush=True)
