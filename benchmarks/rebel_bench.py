"""Benchmark of rebel.py on this machine, printed as markdown tables.

Three measurements, taken side by side in one run, because a shared machine is noisy and only ratios
measured together compare well:
  (a) rollout throughput: the vLLM engine vs the transformers `generate` fallback, same model, prompts and seeds;
  (b) time per REBEL iteration, split into rollout / reward / old log-probs / train / sync (rebel.py's metrics);
  (c) a learning check: greedy reward on the held-out prompts before and after training, and the training reward
      over the first vs the last iterations.

Run:
    python benchmarks/rebel_bench.py                                   # about 6 minutes on 2 CPU cores
    python benchmarks/rebel_bench.py --skip_throughput --num_iterations 32 --rebel_args "--lr 3e-5"
    python benchmarks/rebel_bench.py --report /tmp/rebel_bench.md     # also write the tables to a file
"""

import dataclasses
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import tyro

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import dialogues  # noqa: E402
import engines  # noqa: E402
import utils  # noqa: E402

PHASES = ["rollout", "reward", "old_logprobs", "train", "sync"]
LAUNCH_VARIABLES = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]


@dataclasses.dataclass
class Args:
    seed: int = 1
    """seed of the rollout prompts/seeds and of the rebel.py run"""
    # (a) throughput
    skip_throughput: bool = False
    """skip the vLLM vs transformers rollout measurement"""
    num_prompts: int = 16
    """prompts per generate call (the first ones of the dataset)"""
    max_new_tokens: int = 64
    """new tokens per response"""
    temperature: float = 0.8
    """sampling temperature"""
    repeats: int = 3
    """timed generate calls per engine (after one warm-up call each), alternating between the engines"""
    # (b), (c) a rebel.py run
    skip_training: bool = False
    """skip the rebel.py run (phase times and learning check)"""
    num_iterations: int = 16
    """rebel.py --num_iterations"""
    rebel_args: str = ""
    """extra rebel.py flags, one string (e.g. "--lr 3e-5 --eta 2"); the model and reward stay rebel.py's defaults"""
    window: int = 4
    """iterations averaged for the "first" and "last" training reward"""
    output_dir: str | None = None
    """where the rebel.py run is written; default a temporary folder, deleted at the end"""
    report: str | None = None
    """also write the markdown report to this file"""
    plot: str | None = os.path.join(REPO, "docs", "rebel_bench.png")
    """where the learning curve (greedy evaluation reward against iteration) is saved; docs/rebel.md shows it"""


def table(header: list[str], rows: list[list]) -> str:
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4g} ± {sd:.3g}"


def matmul_gflops() -> float:
    """A quick probe of how fast the machine is right now (fp32 1024x1024 matmuls), to show the noise."""
    a = torch.randn(1024, 1024)
    t0 = time.time()
    for _ in range(10):
        a @ a
    return 10 * 2 * 1024**3 / (time.time() - t0) / 1e9


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def throughput(args: Args) -> str:
    """(a) generated tokens per second of both engines on the same templated prompts and per-request seeds."""
    rank, world_size, device = utils.init_distributed()
    path = utils.resolve_model_path(utils.EMBEDDED_SMOLLM2)
    tokenizer = utils.load_tokenizer(path)
    chats, _ = dialogues.load_prompts(os.path.join(REPO, "data", "prompts.jsonl"), "prompt")
    prompts = [utils.chat_token_ids(tokenizer, d, add_generation_prompt=True) for d in chats[: args.num_prompts]]
    bf16 = device.type == "cuda"  # as rebel.py: fp32 on the CPU

    t0 = time.time()
    vllm_engine = engines.make_engine(path, device, 256 + args.max_new_tokens, args.seed, bf16, 0.3, None,
                                        backend="vllm")
    vllm_start = time.time() - t0
    t0 = time.time()
    hf_engine = engines.TransformersEngine(path, device, torch.bfloat16 if bf16 else torch.float32)
    hf_start = time.time() - t0
    both = {"vLLM": vllm_engine, "transformers": hf_engine}

    def run(engine, repeat):
        seeds = [utils.sample_seed(args.seed, repeat, j) for j in range(len(prompts))]
        t0 = time.time()
        out = engine.generate(prompts, args.max_new_tokens, args.temperature, seeds)
        return sum(len(c.token_ids) for c in out), time.time() - t0, sum(c.finished for c in out) / len(out)

    for name, engine in both.items():
        log(f"(a) warm-up {name}")
        run(engine, -1)
    results = {name: [] for name in both}
    probes = [matmul_gflops()]
    for repeat in range(args.repeats):
        # alternate which engine goes first, so slow drifts of the machine hit both alike
        for name in (list(both) if repeat % 2 == 0 else list(both)[::-1]):
            results[name].append(run(both[name], repeat))
            tokens, seconds, _ = results[name][-1]
            log(f"(a) repeat {repeat + 1}/{args.repeats} {name}: {tokens} tokens in {seconds:.2f}s")
        probes.append(matmul_gflops())
    utils.shutdown(vllm_engine, hf_engine)

    rate = {name: [t / s for t, s, _ in r] for name, r in results.items()}
    rows = [[name, mean_sd(rate[name]), mean_sd([s for _, s, _ in r]), statistics.mean(t for t, _, _ in r),
             statistics.mean(f for _, _, f in r), f"{start:.1f}"]
            for (name, r), start in zip(results.items(), [vllm_start, hf_start])]
    ratios = [v / h for v, h in zip(rate["vLLM"], rate["transformers"])]
    import transformers
    import vllm

    return "\n".join([
        "### (a) Rollout throughput: vLLM vs transformers\n",
        f"{len(prompts)} prompts from data/prompts.jsonl (chat-templated, {min(map(len, prompts))}-"
        f"{max(map(len, prompts))} tokens), {args.max_new_tokens} new tokens, temperature {args.temperature}, "
        f"one generate call of all prompts per repeat, {args.repeats} repeats after one warm-up call each, the same "
        f"per-request seeds for both engines. Embedded SmolLM2-135M-Instruct, "
        f"{'bf16' if bf16 else 'fp32'}, device `{device}`, {os.cpu_count()} CPU cores, {torch.get_num_threads()} "
        f"torch threads; torch {torch.__version__}, vllm {vllm.__version__}, "
        f"transformers {transformers.__version__}.\n",
        table(["engine", "generated tokens/s (mean ± sd)", "s per call", "tokens per call", "finished",
               "engine start s"], rows),
        "",
        f"**vLLM / transformers tokens/s: {statistics.median(ratios):.2f}x** (median of the per-repeat ratios; "
        f"per repeat: {', '.join(f'{r:.2f}' for r in ratios)}). Machine probe between repeats: fp32 matmul at "
        f"{min(probes):.0f}-{max(probes):.0f} GFLOPS.",
        "",
    ])


def training(args: Args) -> str:
    """(b) phase times and (c) learning check, read from a rebel.py run's metrics.jsonl."""
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="rebel_bench_")
    run_dir = os.path.join(output_dir, "bench")
    if os.path.exists(run_dir):
        raise SystemExit(f"{run_dir} exists; give another --output_dir")
    n = args.num_iterations
    # eval at iteration 0 (always) and at the last; one checkpoint, at the last iteration
    flags = ["--output_dir", output_dir, "--run_name", "bench", "--seed", str(args.seed), "--num_iterations", str(n),
             "--eval_every", str(n), "--save_every", str(n), *shlex.split(args.rebel_args)]
    command = [sys.executable, os.path.join(REPO, "rebel.py"), *flags]
    shown = "python rebel.py " + " ".join(shlex.quote(f) for f in flags)
    # a fresh process group for the child: drop the variables init_distributed() set in this process
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    log(f"(b, c) {shown}")
    t0 = time.time()
    with open(os.path.join(output_dir, "rebel.log"), "w") as log_file:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
        for line in process.stdout:
            log_file.write(line)
            if line.startswith("iteration "):
                log("    " + line.rstrip())
        process.wait()
    wall = time.time() - t0
    if process.returncode != 0:
        with open(os.path.join(output_dir, "rebel.log")) as f:
            sys.stderr.write(f.read()[-5000:])
        raise SystemExit(f"rebel.py failed with exit code {process.returncode}; log in {output_dir}/rebel.log")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = {r["iteration"]: r for r in map(json.loads, f)}
    with open(os.path.join(run_dir, "args.json")) as f:
        run_args = json.load(f)
    if args.plot:
        utils.plot_curves(list(records.values()), args.plot)
    if args.output_dir is None:
        shutil.rmtree(output_dir)
    iterations = [records[u] for u in range(1, n + 1)]

    # (b) time per phase
    per_phase = {p: [r[f"time/{p}"] for r in iterations] for p in PHASES}
    totals = [sum(r[f"time/{p}"] for p in PHASES) for r in iterations]
    total = statistics.mean(totals)
    rows = [[p, statistics.mean(v), statistics.median(v), statistics.mean(v[1:]) if n > 1 else float("nan"),
             f"{100 * statistics.mean(v) / total:.1f}%"] for p, v in per_phase.items()]
    rows.append(["**iteration**", total, statistics.median(totals),
                 statistics.mean(totals[1:]) if n > 1 else float("nan"), "100%"])
    sequences = 2 * run_args["prompts_per_rank"]
    gen_rate = [r["policy/response_tokens"] * sequences / r["time/rollout"] for r in iterations]
    phases = "\n".join([
        f"### (b) Time per iteration ({n} iterations, one process; rebel.py defaults except the flags shown)\n",
        f"Command: `{shown}`\n",
        table(["phase", "mean s", "median s", "mean s, iterations 2+", "share of iteration"], rows),
        "",
        f"Rollouts inside training: {sequences} responses per iteration, "
        f"{statistics.mean(gen_rate):.4g} generated tokens/s on average. Wall time of the whole run "
        f"{wall:.0f}s, of which {sum(totals):.0f}s in the timed phases; the rest is start-up (model loading, "
        f"engine start), the two greedy evaluations and the checkpoint.",
        "",
    ])

    # (c) learning check
    k = max(1, min(args.window, n // 2))
    first, last = iterations[:k], iterations[-k:]
    avg = lambda rs, key: statistics.mean(r[key] for r in rs)  # noqa: E731
    score = "eval/score_turn1"
    rows = [[f"{score} (greedy reward, 16 held-out prompts)", records[0][score], records[n][score],
             records[n][score] - records[0][score]]]
    for key in ["reward/score", "reward/total", "policy/response_tokens", "policy/finished", "reward/kl"]:
        rows.append([f"{key} (training samples)", avg(first, key), avg(last, key), avg(last, key) - avg(first, key)])
    trace = [[u, records[u]["reward/score"], records[u]["policy/response_tokens"], records[u]["policy/finished"],
              records[u]["loss/rebel"], records[u]["reward/kl"], records[u].get(score, "")]
             for u in range(1, n + 1)]
    learning = "\n".join([
        f"### (c) Learning check (seed {args.seed})\n",
        f"Reward: `tasks.chat:brevity_reward` (1 for an empty answer, 0 at 64 words; an unfinished response gets "
        f"penalty_reward {run_args['penalty_reward']}). \"before\" is {score} at iteration 0 and the mean of "
        f"iterations 1-{k} for training metrics; \"after\" is {score} at iteration {n} and the mean of iterations "
        f"{n - k + 1}-{n}.\n",
        table(["metric", "before", "after", "change"], rows),
        "",
        "Per iteration:\n",
        table(["iteration", "reward/score", "response_tokens", "finished", "loss/rebel", "reward/kl", score],
              [[0, "", "", "", "", "", records[0][score]]] + trace),
        "",
    ])
    return phases + "\n" + learning


if __name__ == "__main__":
    args = tyro.cli(Args)
    utils.quiet_third_party(verbose=False)
    started = time.time()
    sections = [f"## rebel.py benchmark ({time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, "
                f"{os.cpu_count()} CPU cores)\n",
                f"Command: `python benchmarks/rebel_bench.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}`\n"]
    if not args.skip_throughput:
        sections.append(throughput(args))
    if not args.skip_training:
        sections.append(training(args))
    sections.append(f"Total benchmark time: {time.time() - started:.0f}s.")
    report = "\n".join(sections)
    if args.report:
        with open(args.report, "w") as f:
            f.write(report + "\n")
    print("\n" + report, flush=True)
