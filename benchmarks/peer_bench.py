"""Speed against what a user would pick instead: TRL 1.16 on the same work, and the machine's own limit.

Three measurements, each side in a fresh process, the sides alternating (A, B, C, then C, B, A, ...) in one run so
that the load of a shared machine hits them alike; os.getloadavg() is recorded before and after.

  (1) rebel.py against TRL's RLOOTrainer with two completions per prompt (k = 2): per iteration two samples of
      each prompt, a reward for each, a KL term against the reference, one update from the two rewards. The same
      work on both sides: the embedded SmolLM2 (or --model), data/prompts.jsonl with rebel.py's held-out split, the
      same prompts in the same order per iteration (rebel.prompt_indices), answer length, temperature, learning
      rate and its linear decay, AdamW epsilon, gradient clipping, KL coefficient (a sequence KL in the reward on
      both), epochs (one optimizer step per pass), fp32 without activation checkpointing (rebel.py's CPU
      defaults), rebel.py's reward (tasks.chat:brevity_reward, -1 for an answer that never ends). TRL runs with its
      default generation (transformers `generate`) and, where it runs, its vLLM colocate mode; a side that fails
      is recorded with TRL's own error. Per iteration: seconds and their split (generation, scoring, log-probs,
      update, weight sync), prompt and generated tokens, the mean score; per run the peak resident memory (the
      process's ru_maxrss). The headline ratios are TRL / rebel.py per repeat, over iterations 2+ (iteration 1
      carries first-call costs), as mean ± sd over the repeats. Repeat r runs every side with seed --seed + r (the
      same prompts and sampling seeds on each side, new ones each repeat), so the repeats also tell whether a side
      learns: the slope of its mean training score over the iterations, with a 95% interval over the repeats.
  (2) The multi-turn case: refuel.py on the guessing game against TRL's GRPOTrainer through its documented
      multi-turn entry point (`rollout_func`, benchmarks/peer_trl.py:grpo), at equal dialogues per iteration
      (refuel.py: pairs x 2, a dialogue and its branch; GRPO: the same openings x 2 generations), the same policy
      (--model), temperature, answer cap and learning rate. Seconds per iteration and their split.
  (3) The machine's limit for the rollout and the training step, from a memory-bandwidth probe (the best of
      repeated sums over a 512 MiB fp32 tensor: bytes read per second) and a matmul probe (the best of repeated
      fp32 2048 x 2048 matmuls), taken between the repeats: the fastest decode step at batch 1 (every weight read
      once: weight bytes / bandwidth) and at the batch a script samples (the larger of that and 2 x parameters x
      batch FLOPs / peak), hence the most tokens per second a decode could give; the achieved share is the
      measured generated tokens per second of the rollout phase against it (prefill and sampling count against the
      share, so it is a lower bound). The training step's share: tokens trained x 6 x parameters FLOPs (a forward
      and a backward over every row's prompt and answer, per epoch) against the peak, over the update phase's
      seconds.

The defaults are 4 prompts x 2 answers of 32 tokens, 4 iterations, 3 repeats, and multi-turn 8 openings x 2, 3
iterations, 2 repeats. docs/peer_bench.json was measured smaller, on the otherwise idle 2-core machine, in 8.5
minutes:

    .venv/bin/python benchmarks/peer_bench.py --pairs 2 --max_new_tokens 16 --epochs 1 --num_iterations 3 \
        --repeats 3 --penalty_reward None --multi_repeats 2 --multi_pairs 4 --multi_iterations 2

Writes peer_bench.json and peer_bench.png to --output_dir.

    .venv/bin/python benchmarks/peer_bench.py [--repeats 3] [--num_iterations 4] [--output_dir docs]
    .venv/bin/python benchmarks/peer_bench.py --report      # the tables again, from docs/peer_bench.json
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import common

sys.path.insert(0, common.REPO)

PHASES = ["generation", "scoring", "logprobs", "update", "sync"]
REBEL_TIMES = {"generation": ["time/rollout"], "scoring": ["time/reward"], "logprobs": ["time/old_logprobs"],
               "update": ["time/train"], "sync": ["time/sync"]}
"""each phase of the tables as the sum of the script's own `time/*` metrics"""
REFUEL_TIMES = {**REBEL_TIMES, "logprobs": ["time/old_logprobs", "time/val"]}
"""refuel.py's held-out pairs' diagnostics (`time/val`, one forward) count with the log-probs"""
SINGLE = ["rebel.py", "TRL RLOO", "TRL RLOO, vLLM colocate"]
MULTI = ["refuel.py", "TRL GRPO, rollout_func"]


def launch(command: list[str], log_path: str) -> dict:
    """Runs `command` to its end, its output in `log_path`; its wall seconds and its own peak resident memory
    (ru_maxrss of this child, from wait4; the engine and the trainer live in that one process on both sides)."""
    started = time.time()
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, cwd=common.REPO, env=common.child_env(), stdout=log_file,
                                   stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": process.returncode, "wall_seconds": time.time() - started,
            "peak_rss_bytes": usage.ru_maxrss * 1024}


def script_side(script: str, flags: list[str], work: str, name: str, times: dict) -> dict:
    """One run of one of this project's scripts: its per-iteration phases (its own `time/*` metrics), generated
    tokens and mean score; the run's peak memory."""
    command = [sys.executable, os.path.join(common.REPO, script), *flags, "--output_dir", work, "--run_name", name]
    ran = launch(command, os.path.join(work, f"{name}.log"))
    if ran["returncode"] != 0:
        with open(os.path.join(work, f"{name}.log")) as f:
            raise SystemExit(f"{script} failed:\n{f.read()[-5000:]}")
    with open(os.path.join(work, name, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f][1:]
    iterations, spent = [], 0.0
    for m in metrics:
        phases = {p: sum(m[key] for key in keys) for p, keys in times.items()}
        record = {"iteration": m["iteration"], "seconds": sum(phases.values()), "phases": phases,
                  "generated_tokens": m["budget/policy_tokens"] - spent, "score": m["reward/score"]}
        spent = m["budget/policy_tokens"]
        if "policy/response_tokens" in m:
            record["mean_answer_tokens"] = m["policy/response_tokens"]
        iterations.append(record)
    return {"command": f"python {script} {' '.join(flags)}", "iterations": iterations, "error": None, **ran}


def trl_side(kind: str, config: dict, work: str, name: str) -> dict:
    """One TRL run in a fresh process (benchmarks/peer_trl.py); its record, or TRL's error."""
    config = {**config, "kind": kind, "work_dir": os.path.join(work, name)}
    config_path, out_path = os.path.join(work, f"{name}.config.json"), os.path.join(work, f"{name}.json")
    with open(config_path, "w") as f:
        json.dump(config, f)
    ran = launch([sys.executable, os.path.join(common.REPO, "benchmarks", "peer_trl.py"), config_path, out_path],
                 os.path.join(work, f"{name}.log"))
    if not os.path.exists(out_path):
        with open(os.path.join(work, f"{name}.log")) as f:
            raise SystemExit(f"peer_trl.py ({kind}) wrote no record:\n{f.read()[-5000:]}")
    with open(out_path) as f:
        record = json.load(f)
    return {"config": config, **record, **ran}


def probe_machine() -> dict:
    """Memory bandwidth (bytes read per second: the best of 5 sums over 512 MiB of fp32) and matmul throughput
    (FLOPs per second: the best of 5 fp32 2048 x 2048 matmuls), with torch's threads as the scripts use them."""
    import torch

    big = torch.ones(2**27)
    big.sum()
    bandwidth = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        big.sum()
        bandwidth = max(bandwidth, big.numel() * 4 / (time.perf_counter() - t0))
    a = torch.randn(2048, 2048)
    a @ a
    flops = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        a @ a
        flops = max(flops, 2 * 2048**3 / (time.perf_counter() - t0))
    return {"bandwidth_bytes_per_s": bandwidth, "matmul_flops_per_s": flops, "torch_threads": torch.get_num_threads()}


def model_facts(name: str) -> dict:
    """Parameters (a tied head counted once) and weight bytes in fp32, the engines' and the trainers' dtype on CPU."""
    import torch
    import transformers

    import utils

    path = utils.resolve_model_path(name)
    config = transformers.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    parameters = sum(p.numel() for p in model.parameters())
    return {"name": name, "parameters": parameters, "weight_bytes": 4 * parameters}


def rebel_prompt_tokens(args: argparse.Namespace, seed: int) -> list[int]:
    """Templated prompt tokens of each iteration's rebel.py batch (every prompt twice) with `seed`, from rebel.py's
    own split."""
    import rebel
    import utils

    tokenizer = utils.load_tokenizer(utils.resolve_model_path(args.model))
    _, prompts, _, _, _ = rebel.load_prompt_split(rebel.Args(model=args.model), tokenizer)
    return [2 * sum(len(prompts[i]) for i in rebel.prompt_indices(len(prompts), it, args.pairs, seed))
            for it in range(1, args.num_iterations + 1)]


def single_turn_sides(args: argparse.Namespace, work: str, repeat: int) -> dict:
    """The three sides of (1), as callables, run in the caller's order. Repeat r runs every side with seed
    --seed + r: the same prompts and sampling seeds on every side, and a new draw of them each repeat."""
    seed = args.seed + repeat
    rebel_flags = ["--model", args.model, "--seed", str(seed), "--num_iterations", str(args.num_iterations),
                   "--pairs_per_rank", str(args.pairs), "--minibatch_pairs", str(args.pairs), "--micro_batch_pairs",
                   str(args.pairs), "--max_new_tokens", str(args.max_new_tokens), "--num_epochs", str(args.epochs),
                   "--temperature", str(args.temperature), "--lr", str(args.lr), "--kl_coef", str(args.kl_coef),
                   "--eval_every", str(args.num_iterations), "--save_every", str(args.num_iterations),
                   "--penalty_reward", str(args.penalty_reward), "--device", "cpu"]
    config = {"model": args.model, "max_new_tokens": args.max_new_tokens, "pairs": args.pairs,
              "iterations": args.num_iterations, "seed": seed, "epochs": args.epochs,
              "temperature": args.temperature, "lr": args.lr, "adam_eps": 1e-5, "max_grad_norm": 1.0,
              "kl_coef": args.kl_coef, "penalty_reward": args.penalty_reward,
              "reward_function": "tasks.chat:brevity_reward",
              "max_model_len": 256 + args.max_new_tokens}
    return {
        "rebel.py": lambda: script_side("rebel.py", rebel_flags, work, f"rebel_{repeat}", REBEL_TIMES),
        "TRL RLOO": lambda: trl_side("rloo", {**config, "use_vllm": False}, work, f"rloo_{repeat}"),
        "TRL RLOO, vLLM colocate": lambda: trl_side("rloo", {**config, "use_vllm": True}, work,
                                                    f"rloo_vllm_{repeat}"),
    }


def multi_turn_sides(args: argparse.Namespace, work: str, repeat: int) -> dict:
    """The two sides of (2): refuel.py and TRL's GRPO with a rollout function, at equal dialogues, with seed --seed +
    the repeat."""
    seed = args.seed + repeat
    task = os.path.join(common.REPO, "benchmarks", "peer_trl.py") + ":small_guessing_game"
    refuel_flags = ["--model", args.model, "--task", task, "--seed", str(seed), "--num_iterations",
                    str(args.multi_iterations), "--pairs_per_rank", str(args.multi_pairs), "--minibatch_pairs",
                    str(args.multi_pairs), "--micro_batch_pairs", str(args.multi_pairs), "--lr", str(args.multi_lr),
                    "--eval_every", str(args.multi_iterations), "--save_every", str(args.multi_iterations),
                    "--device", "cpu"]
    config = {"model": args.model, "max_new_tokens": 8, "pairs": args.multi_pairs, "iterations": args.multi_iterations,
              "seed": seed, "temperature": 0.8, "lr": args.multi_lr, "max_grad_norm": 1.0, "kl_coef": 0.0}
    return {
        "refuel.py": lambda: script_side("refuel.py", refuel_flags, work, f"refuel_{repeat}", REFUEL_TIMES),
        "TRL GRPO, rollout_func": lambda: trl_side("grpo", config, work, f"grpo_{repeat}"),
    }


def alternate(make_sides, names: list[str], repeats: int, work: str, probes: list) -> dict:
    """Every side once per repeat, the order reversed every other repeat; a machine probe after each repeat. A side
    that failed once (TRL's error recorded) is not started again."""
    runs = {name: [] for name in names}
    for repeat in range(repeats):
        sides = make_sides(work, repeat)
        for name in (names if repeat % 2 == 0 else names[::-1]):
            if runs[name] and runs[name][-1].get("error"):
                continue
            common.log(f"repeat {repeat + 1}/{repeats}: {name}")
            runs[name].append(sides[name]())
            r = runs[name][-1]
            common.log(f"    {'error: ' + r['error'] if r.get('error') else summary_line(r)}")
        probes.append(probe_machine())
    return runs


def summary_line(run: dict) -> str:
    its = run["iterations"]
    return (f"{len(its)} iterations, {statistics.mean(i['seconds'] for i in its):.2f} s each, "
            f"{sum(i['generated_tokens'] for i in its):.0f} generated tokens, "
            f"peak {run['peak_rss_bytes'] / 2**30:.2f} GiB")


# ---- what the tables show, computed from the JSON alone (so --report reprints them) ----

def warm(run: dict) -> list[dict]:
    """Iterations 2+ (all of them when there is one)."""
    return run["iterations"][1:] or run["iterations"]


def per_run(run: dict) -> dict:
    """A run's means over its warm iterations."""
    its = warm(run)
    seconds = statistics.mean(i["seconds"] for i in its)
    tokens = statistics.mean(i["generated_tokens"] for i in its)
    generation = statistics.mean(i["phases"]["generation"] for i in its)
    return {"seconds": seconds, "phases": {p: statistics.mean(i["phases"][p] for i in its) for p in PHASES},
            "generated_tokens": tokens, "tokens_per_second": tokens / seconds,
            "generation_tokens_per_second": tokens / generation if generation > 0 else math.nan,
            "peak_rss_gib": run["peak_rss_bytes"] / 2**30}


def ratios(runs: dict, base: str, other: str) -> dict:
    """other / base per repeat (repeat i of each), for seconds per iteration, seconds per generated token, the
    rollout's tokens per second (base / other: how many times faster base generates) and peak memory."""
    pairs = list(zip(map(per_run, runs[base]), map(per_run, runs[other])))
    return {"seconds_per_iteration": [o["seconds"] / b["seconds"] for b, o in pairs],
            "seconds_per_generated_token": [(o["seconds"] / o["generated_tokens"])
                                            / (b["seconds"] / b["generated_tokens"]) for b, o in pairs],
            "rollout_tokens_per_second": [b["generation_tokens_per_second"] / o["generation_tokens_per_second"]
                                          for b, o in pairs],
            "peak_rss": [o["peak_rss_gib"] / b["peak_rss_gib"] for b, o in pairs]}


def score_slope(run: dict) -> float:
    """The least-squares slope of the run's mean training score over its iterations (score per iteration)."""
    return statistics.linear_regression(range(len(run["iterations"])), [i["score"] for i in run["iterations"]]).slope


def learning(runs: list[dict]) -> dict:
    """A side's learning over its repeats: each run's score slope, their mean and 95% interval (the repeats draw
    their prompts and samples with seeds of their own), and the sign the interval shows: +1 or -1 when it excludes
    0, else 0."""
    slopes = [score_slope(r) for r in runs]
    mean, half = common.interval95(slopes)
    sign = 1 if mean - half > 0 else -1 if mean + half < 0 else 0
    return {"slopes": slopes, "mean": mean, "half": None if math.isinf(half) else half, "sign": sign}


def limits(results: dict) -> dict:
    """(3): the fastest decode at batch 1 and at each script's batch, and the achieved shares, from the best probe."""
    bandwidth = max(p["bandwidth_bytes_per_s"] for p in results["probes"])
    peak = max(p["matmul_flops_per_s"] for p in results["probes"])
    model = results["model_facts"]
    params, weight_bytes = model["parameters"], model["weight_bytes"]
    out = {"bandwidth_gb_per_s": bandwidth / 1e9, "matmul_gflops": peak / 1e9,
           "decode_step_batch1_ms": 1e3 * weight_bytes / bandwidth, "rows": []}

    def row(label, runs, batch, train_tokens_per_iteration):
        if not runs or runs[0].get("error"):
            return
        step = max(weight_bytes / bandwidth, 2 * params * batch / peak)
        limit_rate = batch / step
        achieved = [per_run(r)["generation_tokens_per_second"] for r in runs]
        updates = [per_run(r)["phases"]["update"] for r in runs]
        train_share = [train_tokens_per_iteration * 6 * params / peak / u for u in updates]
        out["rows"].append({"side": label, "batch": batch, "decode_step_ms": 1e3 * step,
                            "limit_tokens_per_second": limit_rate, "achieved_tokens_per_second": achieved,
                            "rollout_share": [a / limit_rate for a in achieved],
                            "train_tokens_per_iteration": train_tokens_per_iteration, "train_share": train_share})

    s = results["single"]
    rows = 2 * s["settings"]["pairs"]
    # the rows' prompts (every prompt twice), over every iteration of every repeat
    prompt = statistics.mean(t for repeat in s["prompt_tokens_per_iteration"] for t in repeat)
    for name in SINGLE:
        runs = s["runs"].get(name, [])
        if runs and not runs[0].get("error"):
            answers = statistics.mean(per_run(r)["generated_tokens"] for r in runs)
            row(name, runs, rows, s["settings"]["epochs"] * (prompt + answers))
    m = results.get("multi")
    if m:  # the rollout's share only: the tokens each side trains on per iteration are not in its metrics
        for name in MULTI:
            runs = m["runs"].get(name, [])
            if runs and not runs[0].get("error"):
                row(name, runs, 2 * m["settings"]["pairs"], math.nan)
    return out


def fmt(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    mean = statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return (f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f} "
            f"({min(values):.{digits}f}-{max(values):.{digits}f})")


def seconds_table(runs: dict, names: list[str], tokens_label: str, rates: bool) -> str:
    """One column per side in `names`: each phase's seconds, the iteration's, the generated tokens, (with `rates`)
    the tokens per second of the rollout phase and of the whole iteration, and the peak resident memory."""
    def row(label: str, key: str, digits: int = 2) -> list[str]:
        return [label] + [fmt([per_run(r)[key] for r in runs[n]], digits) for n in names]

    body = [[p] + [fmt([per_run(r)["phases"][p] for r in runs[n]]) for n in names] for p in PHASES]
    body.append(["**iteration**"] + [f"**{fmt([per_run(r)['seconds'] for r in runs[n]])}**" for n in names])
    body.append(row(tokens_label, "generated_tokens", 1))
    if rates:
        body.append(row("generated tokens/s, rollout phase", "generation_tokens_per_second", 1))
        body.append(row("generated tokens/s, whole iteration", "tokens_per_second", 1))
    body.append(row("peak resident memory (GiB)", "peak_rss_gib"))
    return common.table(["seconds per iteration"] + names, body)


def report_single(results: dict) -> str:
    s = results["single"]
    st = s["settings"]
    runs = s["runs"]
    ok = [n for n in SINGLE if runs.get(n) and not runs[n][0].get("error")]
    lines = [f"### (1) rebel.py against TRL's RLOO (k = 2), {len(runs['rebel.py'])} repeats, alternating\n",
             f"`{results['model_facts']['name']}`, {st['pairs']} prompts x 2 answers of at most {st['max_new_tokens']} "
             f"tokens per iteration, {st['num_iterations']} iterations, {st['epochs']} epochs, temperature "
             f"{st['temperature']}, lr {st['lr']} (linear decay), KL coefficient {st['kl_coef']}, penalty for an "
             f"answer that never ends {st['penalty_reward']}, fp32, torch threads "
             f"{st['torch_threads']}. Means over iterations 2+ of each run, then mean ± sd (min-max) over the "
             "repeats.\n"]
    lines.append(seconds_table(runs, ok, "generated tokens per iteration", rates=True))
    lines.append("")
    ratio_rows = []
    for other in ok[1:]:
        r = ratios(runs, "rebel.py", other)
        ratio_rows.append([f"{other} / rebel.py", fmt(r["seconds_per_iteration"]),
                           fmt(r["seconds_per_generated_token"]), fmt(r["rollout_tokens_per_second"]),
                           fmt(r["peak_rss"])])
    lines.append(common.table(["ratio (per repeat, mean ± sd (min-max))", "seconds per iteration",
                               "seconds per generated token", "rollout tokens/s, rebel.py / TRL",
                               "peak memory"], ratio_rows))
    lines.append("")
    failed = [n for n in SINGLE if runs.get(n) and runs[n][0].get("error")]
    for n in failed:
        lines.append(f"**{n} does not run here.** TRL's own error: `{runs[n][0]['error']}`\n")
    check = s["work_check"]
    lines.append(f"Same work: prompt tokens per iteration (both sides' templates) {check['prompt_tokens']}; "
                 f"generated tokens per iteration, rebel.py / TRL over all runs and iterations: "
                 f"{check['generated_tokens_ratio']:.3f} (rebel.py {check['generated_tokens']['rebel.py']}, TRL "
                 f"{check['generated_tokens']['TRL RLOO']}).\n")
    slopes = "; ".join(f"{name} {fmt_slope(learned)}" for name, learned in check["learning"].items())
    verdict = {True: "yes", False: "no", None: "not shown (an interval holds 0)"}[check["learning_agrees"]]
    lines.append(f"Learning: the least-squares slope of the mean training score over each run's iterations, mean ± "
                 f"95% interval over the repeats (each repeat its own seed, the same on every side), and the slopes "
                 f"per repeat: {slopes}. Both sides learn in the same direction: {verdict}.\n")
    return "\n".join(lines)


def fmt_slope(learned: dict) -> str:
    half = "" if learned["half"] is None else f" ± {learned['half']:.4f}"
    return f"{learned['mean']:+.4f}{half} ({', '.join(f'{v:+.4f}' for v in learned['slopes'])})"


def report_multi(results: dict) -> str:
    m = results.get("multi")
    if not m:
        return ""
    st = m["settings"]
    runs = m["runs"]
    ok = [n for n in MULTI if runs.get(n) and not runs[n][0].get("error")]
    lines = ["### (2) The multi-turn case: refuel.py against TRL's GRPO with a rollout function, guessing game\n",
             f"`{results['model_facts']['name']}` as the policy, {2 * st['pairs']} dialogues per iteration on both "
             f"sides (refuel.py: {st['pairs']} pairs; GRPO: {st['pairs']} openings x 2), horizon 3, 8 tokens a turn, "
             f"temperature 0.8, lr {st['lr']}, {st['num_iterations']} iterations, {len(runs['refuel.py'])} repeats, "
             "alternating.\n"]
    lines.append(seconds_table(runs, ok, "generated tokens per iteration (policy)", rates=False))
    lines.append("")
    if len(ok) == 2:
        r = ratios(runs, MULTI[0], MULTI[1])
        lines.append(f"**TRL GRPO / refuel.py, seconds per iteration: {fmt(r['seconds_per_iteration'])}**; per "
                     f"generated policy token: {fmt(r['seconds_per_generated_token'])}.\n")
    for n in MULTI:
        if runs.get(n) and runs[n][0].get("error"):
            lines.append(f"**{n} does not run here.** TRL's own error: `{runs[n][0]['error']}`\n")
    return "\n".join(lines)


def report_limits(results: dict) -> str:
    lim = limits(results)
    model = results["model_facts"]
    lines = ["### (3) The machine's limit\n",
             f"Probes (the best over {len(results['probes'])} probes): memory bandwidth "
             f"{lim['bandwidth_gb_per_s']:.1f} GB/s (reads), fp32 matmul {lim['matmul_gflops']:.1f} GFLOPS. "
             f"`{model['name']}`: {model['parameters'] / 1e6:.1f}M parameters, {model['weight_bytes'] / 1e6:.0f} MB "
             f"in fp32. Fastest decode step at batch 1: {lim['decode_step_batch1_ms']:.1f} ms (every weight read "
             "once).\n"]
    body = [[r["side"], r["batch"], f"{r['decode_step_ms']:.1f}", f"{r['limit_tokens_per_second']:.0f}",
             fmt(r["achieved_tokens_per_second"], 1), fmt(r["rollout_share"], 3), fmt(r["train_share"], 3)]
            for r in lim["rows"]]
    lines.append(common.table(["side", "batch", "fastest decode step (ms)", "limit tokens/s",
                               "achieved tokens/s (rollout phase)", "rollout share of the limit",
                               "training step share of peak (6 x params x tokens)"], body))
    lines.append("")
    return "\n".join(lines)


def report(results: dict) -> str:
    load = results["loadavg"]
    sections = ["## Against the peers: TRL on the same work, and the machine's limit\n", common.header(results),
                f"Load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in load['before'])}; after: "
                f"{', '.join(f'{v:.2f}' for v in load['after'])}. Versions: "
                f"{', '.join(f'{k} {v}' for k, v in results['versions'].items())}.\n",
                report_single(results), report_multi(results), report_limits(results),
                f"Total benchmark time: {results['seconds']:.0f}s."]
    return "\n".join(s for s in sections if s)


def plot(results: dict, path: str) -> None:
    """Seconds per iteration by phase, each side (mean over repeats), single-turn and multi-turn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("single", SINGLE, "(1) REBEL vs TRL RLOO"), ("multi", MULTI, "(2) guessing game")]
    groups = [g for g in groups if results.get(g[0])]
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 3.6), squeeze=False)
    for ax, (key, names, title) in zip(axes[0], groups):
        runs = results[key]["runs"]
        ok = [n for n in names if runs.get(n) and not runs[n][0].get("error")]
        bottom = [0.0] * len(ok)
        for k, p in enumerate(PHASES):
            heights = [statistics.mean(per_run(r)["phases"][p] for r in runs[n]) for n in ok]
            ax.bar(range(len(ok)), heights, bottom=bottom, color=f"C{k}", label=p)
            bottom = [b + h for b, h in zip(bottom, heights)]
        for i, n in enumerate(ok):
            spread = [per_run(r)["seconds"] for r in runs[n]]
            if len(spread) > 1:
                ax.errorbar(i, statistics.mean(spread), yerr=statistics.stdev(spread), color="black", capsize=4)
        ax.set_xticks(range(len(ok)), [n.replace(", ", ",\n") for n in ok], fontsize=8)
        ax.set_ylabel("seconds per iteration (iterations 2+)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def work_check(runs: dict, prompt_tokens: list[list[int]]) -> dict:
    """Do both sides do the same work? Prompt tokens per iteration of each repeat (rebel.py's templating against
    what TRL's own templating gave), generated tokens per iteration, and each side's learning over the repeats."""
    trl_prompts = [[i["prompt_tokens"] for i in r["iterations"]] for r in runs["TRL RLOO"] if not r.get("error")]
    same_prompts = trl_prompts == prompt_tokens[:len(trl_prompts)]
    tokens = {name: [[i["generated_tokens"] for i in r["iterations"]] for r in runs[name] if not r.get("error")]
              for name in ("rebel.py", "TRL RLOO")}
    total = {name: sum(map(sum, v)) for name, v in tokens.items()}
    learned = {name: learning([r for r in runs[name] if not r.get("error")])
               for name in SINGLE if runs.get(name) and not runs[name][0].get("error")}
    signs = {learned[name]["sign"] for name in ("rebel.py", "TRL RLOO")}
    return {"prompt_tokens": "identical" if same_prompts else f"differ: rebel.py {prompt_tokens}, TRL {trl_prompts}",
            "prompt_tokens_identical": same_prompts, "generated_tokens": tokens,
            "generated_tokens_ratio": total["rebel.py"] / max(total["TRL RLOO"], 1), "learning": learned,
            "learning_agrees": None if 0 in signs else len(signs) == 1}


def versions() -> dict:
    import torch
    import transformers
    import trl
    import vllm

    return {"torch": torch.__version__, "vllm": vllm.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_output_flags(parser)
    parser.add_argument("--model", default="embedded:SmolLM2-135M-Instruct", help="the policy on every side")
    parser.add_argument("--repeats", type=int, default=3, help="(1): runs of each side, alternating")
    parser.add_argument("--num_iterations", type=int, default=4, help="(1): iterations of each run")
    parser.add_argument("--pairs", type=int, default=4, help="(1): prompts per iteration, each answered twice")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="(1): answer length cap")
    parser.add_argument("--epochs", type=int, default=2, help="(1): passes over each iteration's batch")
    parser.add_argument("--temperature", type=float, default=0.7, help="(1): sampling temperature (rebel.py's)")
    parser.add_argument("--lr", type=float, default=1e-5, help="(1): learning rate (rebel.py's)")
    parser.add_argument("--kl_coef", type=float, default=0.05, help="(1): KL coefficient (rebel.py's)")
    parser.add_argument("--penalty_reward", type=lambda v: None if v == "None" else float(v), default=-1.0,
                        help="(1): the score of an answer that never ends (rebel.py's -1); None keeps its score")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--multi_repeats", type=int, default=2, help="(2): runs of each side; 0 skips (2)")
    parser.add_argument("--multi_iterations", type=int, default=3, help="(2): iterations of each run")
    parser.add_argument("--multi_pairs", type=int, default=8, help="(2): refuel.py pairs = GRPO openings")
    parser.add_argument("--multi_lr", type=float, default=1e-5, help="(2): learning rate on both sides")
    parser.add_argument("--skip_colocate", action="store_true", help="(1): leave out TRL's vLLM colocate side")
    parser.add_argument("--work_dir", help="where the runs go (default: a new temporary folder)")
    args = parser.parse_args()
    path = os.path.join(args.output_dir, "peer_bench.json")
    if not args.report:
        import lifecycle
        import torch

        lifecycle.quiet_third_party(verbose=False)
        work = args.work_dir or tempfile.mkdtemp(prefix="peer_bench_")
        os.makedirs(work, exist_ok=True)
        started, before = time.time(), os.getloadavg()
        probes = [probe_machine()]
        sides = [n for n in SINGLE if not (args.skip_colocate and "colocate" in n)]
        single = alternate(lambda w, r: single_turn_sides(args, w, r), sides, args.repeats, work, probes)
        prompt_tokens = [rebel_prompt_tokens(args, args.seed + r) for r in range(args.repeats)]
        settings = {k: getattr(args, k) for k in ("pairs", "max_new_tokens", "num_iterations", "epochs",
                                                  "temperature", "lr", "kl_coef", "penalty_reward", "seed")}
        settings["torch_threads"] = torch.get_num_threads()
        results = {"single": {"settings": settings, "runs": single, "prompt_tokens_per_iteration": prompt_tokens,
                              "work_check": work_check(single, prompt_tokens)}}
        if args.multi_repeats > 0:
            multi = alternate(lambda w, r: multi_turn_sides(args, w, r), MULTI, args.multi_repeats, work, probes)
            results["multi"] = {"settings": {"pairs": args.multi_pairs, "num_iterations": args.multi_iterations,
                                             "lr": args.multi_lr}, "runs": multi}
        results.update({"probes": probes, "model_facts": model_facts(args.model), "versions": versions(),
                        "loadavg": {"before": list(before), "after": list(os.getloadavg())},
                        "seconds": time.time() - started})
        results["limits"] = limits(results)
        results["ratios"] = {other: ratios(single, "rebel.py", other) for other in SINGLE[1:]
                             if single.get(other) and not single[other][0].get("error")}
        if results.get("multi") and all(results["multi"]["runs"].get(n) and not results["multi"]["runs"][n][0].get(
                "error") for n in MULTI):
            results["ratios"][MULTI[1]] = ratios(results["multi"]["runs"], MULTI[0], MULTI[1])
        common.save_results(path, results)
        plot(results, os.path.join(args.output_dir, "peer_bench.png"))
    print(report(common.load_results(path)), flush=True)
