"""Memory of a weight sync and of a training step, and the colocated design against the official pipeline's.

Sync: the whole-model gather of before (`whole_model_weights`, fp32, then one reload) against the streamed sync
(`engines.sync_weights`, buckets of --bucket_mb), into a colocated vLLM engine per rank, on 2 ranks (rank 0's
numbers), for the embedded SmolLM2-135M and a random Llama of about 370M parameters built here. Training: one
forward and backward of SmolLM2-135M on a fixed batch, with and without activation checkpointing. Each case runs
in a fresh process (so one case's freed memory cannot hide the next one's peak); peak memory is the largest
resident set size above the one just before the measured call, sampled every millisecond, the smallest over
--repeats. Writes scale_bench.json and the plot scale.png to --output_dir. About 6 minutes on 2 CPU cores.

Performance anchor (`--part anchor`): the rollout half of one REFUEL iteration on the chat task (SmolLM2-135M as
policy and as LLM user, dialogues played to the horizon, then one branch per dialogue from a turn h played to the
horizon again), in two designs, each in a fresh process, same weights and sampling seeds. Resident (this project):
both engines started once per run, the trainer's weights streamed into the policy engine in process and checked.
Fresh (the official REFUEL pipeline, setting_one/generate.py): the trained policy saved to disk, then a new process
and a new vLLM engine for every turn of every role, the dialogues handed over in a file. Training, rewards and
log-probs do the same work in both and are left out. Writes scale_anchor.json and scale_anchor.png to
--output_dir; about 10 minutes on 2 CPU cores.

No training run is benchmarked here: of the flags all benchmarks share (benchmarks/common.py) this one takes
--output_dir and --report only; --model, --anchor_dialogues and --anchor_horizon shrink the measurement (tests).

    .venv/bin/python benchmarks/scale_bench.py [--part memory|anchor|all] [--bucket_mb 32] [--repeats 3]
        [--output_dir docs] [--model PATH] [--anchor_dialogues 16] [--anchor_horizon 3]
    .venv/bin/python benchmarks/scale_bench.py --report   # the tables again, from docs/scale_bench.json and
                                                          # docs/scale_anchor.json
"""

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import common

REPO = common.REPO
sys.path.insert(0, REPO)
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import psutil  # noqa: E402
import torch  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import dialogues  # noqa: E402
import engines  # noqa: E402
import utils  # noqa: E402
from tasks.chat import LLMUser  # noqa: E402

MiB = 2**20
PROBE_TEXT = "A fixed sentence whose log-probs are compared after the sync."
ANCHOR_PHASES = ("hand over weights", "play dialogues")
RANDOM_370M = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=16,
                   num_key_value_heads=16, tie_word_embeddings=False)
TRAIN_BATCH = (4, 256)  # sequences x tokens of the measured forward and backward


def whole_model_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of an FSDP2 model unsharded at once on every rank: the design before the streamed sync, and
    the official pipeline's hand-over (the whole model, then saved)."""
    return {name: (t.full_tensor() if isinstance(t, DTensor) else t).detach() for name, t in model.state_dict().items()}


def peak_above_baseline(work) -> tuple[int, float]:
    """Runs `work()`; returns the peak resident memory above the level just before it (bytes) and its seconds."""
    process, peak, done = psutil.Process(), [0], threading.Event()
    baseline = process.memory_info().rss

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    work()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return max(peak[0], process.memory_info().rss) - baseline, seconds


def random_model(folder: str) -> str:
    """A random Llama of about 370M parameters with SmolLM2's tokenizer (built once, cached)."""
    if not os.path.exists(os.path.join(folder, "config.json")):
        utils.make_tiny_model(folder, utils.embedded_smollm2_folder(), seed=0, **RANDOM_370M)
    return folder


def run_case(case: str, model_path: str, bucket_mb: float, repeats: int) -> dict:
    """One measurement in this process: `sync_full`, `sync_stream`, `train` or `train_checkpointed`."""
    rank, _, device = utils.init_distributed()
    torch.manual_seed(0)
    checkpointing = case == "train_checkpointed"
    model = utils.shard_model(utils.load_causal_lm(model_path, torch.float32, device), False, checkpointing)
    parameters = sum(p.full_tensor().numel() for p in model.parameters())
    runs = []
    if case.startswith("sync"):
        engine = engines.make_engine(model_path, device, max_model_len=512, seed=0, bf16=False,
                                     gpu_memory_utilization=0.3, kv_cache_memory_bytes=256 * MiB, backend="vllm")
        tokenizer = utils.load_tokenizer(model_path)
        probe = tokenizer(PROBE_TEXT).input_ids
        for _ in range(repeats + 1):  # the first sync warms vLLM's reload path up and is not counted
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1e-3 * torch.randn_like(p))
            if case == "sync_full":
                runs.append(peak_above_baseline(lambda: engine.load_weights(whole_model_weights(model))))
                engines.check_logprob_parity(engine, model, probe, device, 1e-3)
            else:
                runs.append(peak_above_baseline(lambda: engines.sync_weights(engine, model, probe, device, 1e-3,
                                                                               bucket_mb)))
        runs = runs[1:]
    else:
        model.train()
        batch = torch.randint(0, 1000, TRAIN_BATCH, generator=torch.Generator().manual_seed(0))
        for _ in range(repeats):
            runs.append(peak_above_baseline(lambda: model(input_ids=batch, labels=batch).loss.backward()))
            model.zero_grad(set_to_none=True)
    return {"case": case, "rank": rank, "parameters": parameters, "peak_bytes": min(r[0] for r in runs),
            "seconds": min(r[1] for r in runs)}


def plot(results: list[dict], path: str) -> None:
    """Bars of peak memory per case, grouped by model, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (sync_ax, train_ax) = plt.subplots(1, 2, figsize=(10, 4))
    syncs = [r for r in results if r["case"].startswith("sync")]
    models = sorted({r["model"] for r in syncs}, key=[r["model"] for r in syncs].index)
    for offset, case, label in ((-0.2, "sync_full", "whole-model gather (before)"),
                                (0.2, "sync_stream", "streamed buckets")):
        values = [next(r["peak_bytes"] / MiB for r in syncs if r["model"] == m and r["case"] == case) for m in models]
        sync_ax.bar([i + offset for i in range(len(models))], values, width=0.4, label=label)
    sync_ax.set_xticks(range(len(models)), models)
    sync_ax.set_ylabel("peak extra memory of one sync (MiB)")
    sync_ax.set_title("weight sync into vLLM")
    sync_ax.legend(loc="upper left")
    trains = [r for r in results if r["case"].startswith("train")]
    train_ax.bar(["without checkpointing", "with checkpointing"], [r["peak_bytes"] / MiB for r in trains],
                 color=["C0", "C1"])
    train_ax.set_ylabel("peak extra memory of forward+backward (MiB)")
    train_ax.set_title(f"checkpointing, {trains[0]['model']}, {TRAIN_BATCH[0]}x{TRAIN_BATCH[1]} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_memory(results: dict) -> str:
    """Each measurement before and after: peak memory and seconds, and their ratios."""
    found = {(r["model"], r["case"]): r for r in results["results"]}
    pairs = [(m, "sync, whole-model gather -> streamed", "sync_full", "sync_stream")
             for m, case in found if case == "sync_full"]
    pairs += [(m, f"forward+backward, {TRAIN_BATCH[0]}x{TRAIN_BATCH[1]} tokens, without -> with checkpointing",
               "train", "train_checkpointed") for m, case in found if case == "train"]
    rows = []
    for model, what, before, after in pairs:
        b, a = found[model, before], found[model, after]
        rows.append([f"{model} ({b['parameters'] / 1e6:.0f}M)", what,
                     f"{b['peak_bytes'] / MiB:.0f}, {b['seconds']:.2f}",
                     f"{a['peak_bytes'] / MiB:.0f}, {a['seconds']:.2f}", f"{a['peak_bytes'] / b['peak_bytes']:.2f}",
                     f"{a['seconds'] / b['seconds']:.2f}"])
    return "\n".join([f"{results['bucket_mb']:g} MiB sync buckets, fp32 engines:\n", common.table(
        ["model", "measurement", "before: peak MiB, seconds", "after: peak MiB, seconds", "memory after/before",
         "time after/before"], rows)])


# ----------------------------------------------------------------------------------------------------------
# performance anchor: resident engines against a fresh engine per turn and role


@dataclasses.dataclass
class AnchorWork:
    """The rollout work of one REFUEL iteration, the same in both designs."""

    dialogues: int = 16
    horizon: int = 3
    max_tokens: int = 48
    temperature: float = 0.8
    max_model_len: int = 2048


def anchor_policy(model_path: str) -> torch.nn.Module:
    """The policy being trained, on this rank: the model plus a fixed perturbation standing in for an update."""
    policy = utils.shard_model(utils.load_causal_lm(model_path), bf16=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    return policy


def anchor_openings(work: AnchorWork) -> list[dialogues.Episode]:
    chats, _ = dialogues.load_prompts(os.path.join(REPO, "data", "prompts.jsonl"), "prompt")
    return [dialogues.Episode(chat) for chat in chats[: work.dialogues]]


def branches(played: list[dialogues.Episode], work: AnchorWork) -> list[dialogues.Episode]:
    """The second rollout of each pair: the dialogue through user turn h (h = i mod H), to be played on again."""
    return [e.prefix(min(i % work.horizon, e.turns - 1)) for i, e in enumerate(played)]


def save_episodes(episodes: list[dialogues.Episode], path: str) -> None:
    with open(path, "w") as f:
        json.dump([dataclasses.asdict(e) for e in episodes], f)


def load_episodes(path: str) -> list[dialogues.Episode]:
    with open(path) as f:
        return [dialogues.Episode(**e) for e in json.load(f)]


def anchor_turn(role: str, model_path: str, state: str, seed: str, work: AnchorWork) -> None:
    """One turn of one role in a new engine (the official pipeline's response_generator.py / user_generator.py):
    the dialogues are read from `state`, answered or replied to, and written back."""
    device = utils.init_distributed()[2]
    engine = engines.make_engine(model_path, device, max_model_len=work.max_model_len, seed=0, bf16=False,
                                 gpu_memory_utilization=0.3, kv_cache_memory_bytes=None, backend="vllm")
    tokenizer = utils.load_tokenizer(model_path)
    episodes = load_episodes(state)
    if role == "policy":  # the policy answers every open dialogue once; no user is asked within the turn
        dialogues.rollout_dialogues(episodes, engine, tokenizer=tokenizer, user=None,
                                    horizons=[e.turns + 1 for e in episodes], max_tokens=work.max_tokens,
                                    temperature=work.temperature, seed=(0, seed))
    else:
        user = LLMUser(engine, tokenizer, work.max_tokens, work.temperature, 1)
        asking = [e for e in episodes if e.turns < work.horizon]
        for e, reply in zip(asking, user(asking)):
            e.messages.append({"role": "user", "content": reply})
    save_episodes(episodes, state)


def anchor_case(design: str, model_path: str, work: AnchorWork) -> dict:
    """Seconds of the rollout half of one iteration in `design` ("resident" or "fresh"), by phase, and the
    dialogues played (to compare the two designs' work)."""
    device = utils.init_distributed()[2]
    policy, tokenizer = anchor_policy(model_path), utils.load_tokenizer(model_path)
    openings, seconds = anchor_openings(work), {}
    if design == "resident":
        started = time.perf_counter()
        engine = engines.make_engine(model_path, device, max_model_len=work.max_model_len, seed=0, bf16=False,
                                     gpu_memory_utilization=0.3, kv_cache_memory_bytes=None, backend="vllm")
        user = LLMUser(engines.make_engine(model_path, device, max_model_len=work.max_model_len, seed=1, bf16=False,
                                           gpu_memory_utilization=0.3, kv_cache_memory_bytes=None, backend="vllm"),
                       tokenizer, work.max_tokens, work.temperature, 1)
        seconds["start engines (once per run)"] = time.perf_counter() - started
        started = time.perf_counter()
        probe = tokenizer(PROBE_TEXT).input_ids
        engines.sync_weights(engine, policy, probe, device, 1e-3, 512)
        seconds["hand over weights"] = time.perf_counter() - started
        started = time.perf_counter()
        horizons = [work.horizon] * len(openings)
        played = dialogues.rollout_dialogues(openings, engine, tokenizer=tokenizer, user=user, horizons=horizons,
                                             max_tokens=work.max_tokens, temperature=work.temperature, seed=(0, "A"))
        branched = dialogues.rollout_dialogues(branches(played, work), engine, tokenizer=tokenizer, user=user,
                                               horizons=horizons, max_tokens=work.max_tokens,
                                               temperature=work.temperature, seed=(0, "B"))
        seconds["play dialogues"] = time.perf_counter() - started
    else:
        folder = tempfile.mkdtemp(prefix="anchor_")
        started = time.perf_counter()
        weights = whole_model_weights(policy)
        policy.save_pretrained(os.path.join(folder, "policy"), state_dict=weights)
        tokenizer.save_pretrained(os.path.join(folder, "policy"))
        seconds["hand over weights"] = time.perf_counter() - started
        state = os.path.join(folder, "dialogues.json")

        def play(episodes: list[dialogues.Episode], seed: str) -> list[dialogues.Episode]:
            save_episodes(episodes, state)
            for turn in range(1, work.horizon + 1):
                steps = [("policy", os.path.join(folder, "policy"))]
                if turn < work.horizon:
                    steps.append(("user", model_path))
                for role, path in steps:
                    subprocess.run([sys.executable, __file__, "--anchor_turn", role, "--model_path", path, "--state",
                                    state, "--seed", seed, *work_flags(work)], env=common.child_env(), check=True,
                                   capture_output=True)
            return load_episodes(state)

        started = time.perf_counter()
        played = play(openings, "A")
        branched = play(branches(played, work), "B")
        seconds["play dialogues"] = time.perf_counter() - started
        shutil.rmtree(folder)
    texts = [[m["content"] for m in e.messages] for e in played + branched]
    return {"design": design, "seconds": seconds, "dialogues": texts,
            "generated_tokens": sum(len(r) for e in played + branched for r in e.responses)}


def plot_anchor(results: dict, path: str) -> None:
    """Stacked bars: seconds of each phase per design."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    labels = {"resident": "resident engines,\nin-process sync", "fresh": "fresh engine per turn\nand role, disk reload"}
    for design in labels:
        r, bottom = results[design], 0.0
        for color, phase in zip(("C1", "C0"), ANCHOR_PHASES):
            ax.bar(labels[design], r["seconds"][phase], bottom=bottom, color=color,
                   label=phase if design == "resident" else None)
            bottom += r["seconds"][phase]
    ax.set_ylabel("seconds, rollout half\nof one REFUEL iteration")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def work_flags(work: AnchorWork) -> list[str]:
    """The flags that give a child process the same work."""
    return ["--anchor_dialogues", str(work.dialogues), "--anchor_horizon", str(work.horizon)]


def run_anchor(model_path: str, work: AnchorWork) -> dict:
    """Both designs, each in a fresh process: seconds by phase, generated tokens, and how many dialogues came out
    the same word for word."""
    results = {}
    for design in ("resident", "fresh"):
        out = subprocess.run([sys.executable, __file__, "--anchor_case", design, "--model_path", model_path,
                              *work_flags(work)], env=common.child_env(), capture_output=True, text=True, check=True)
        results[design] = next(json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"design"'))
        print(f"{design:<9} " + "  ".join(f"{k} {v:.1f} s" for k, v in results[design]["seconds"].items()), flush=True)
    same = sum(a == b for a, b in zip(results["resident"]["dialogues"], results["fresh"]["dialogues"]))
    return {"model": os.path.basename(os.path.normpath(model_path)), "work": dataclasses.asdict(work),
            "identical_dialogues": same,
            **{d: {k: v for k, v in r.items() if k != "dialogues"} for d, r in results.items()}}


def report_anchor(results: dict) -> str:
    """The phases of both designs side by side, with their ratios."""
    work, resident, fresh = AnchorWork(**results["work"]), results["resident"], results["fresh"]
    starts = 2 * (2 * work.horizon - 1)  # two plays, each a policy turn per turn and a user turn between turns
    rows = []
    for phase, label, notes in (("hand over weights", "hand over the weights",
                                 (" (streamed sync + parity check)", " (save to disk)")),
                                ("play dialogues", "play dialogues and branches", ("", f" ({starts} engine starts)"))):
        a, b = resident["seconds"][phase], fresh["seconds"][phase]
        rows.append([label, f"{a:.1f}{notes[0]}", f"{b:.1f}{notes[1]}", f"{b / a:.2f}"])
    a, b = (sum(r["seconds"][p] for p in ANCHOR_PHASES) for r in (resident, fresh))
    rows.append(["**rollout half of an iteration**", f"**{a:.1f}**", f"**{b:.1f}**", f"**{b / a:.2f}**"])
    a, b = (1000 * r["seconds"]["play dialogues"] / r["generated_tokens"] for r in (resident, fresh))
    rows.append(["play, ms per generated token", f"{a:.1f}", f"{b:.1f}", f"{b / a:.2f}"])
    rows.append(["start both engines, once per run", f"{resident['seconds']['start engines (once per run)']:.1f}",
                 "(inside every turn)", ""])
    return "\n".join([
        f"{work.dialogues} dialogues and {work.dialogues} branches, {work.horizon} turns, {work.max_tokens} tokens per "
        f"turn; {results['identical_dialogues']} of {2 * work.dialogues} dialogues identical word for word in the two "
        f"designs; generated tokens {resident['generated_tokens']:,} (resident) and {fresh['generated_tokens']:,} "
        "(fresh):\n",
        common.table(["phase", "resident engines (s)", "fresh engine per turn and role (s)", "fresh / resident"],
                     rows)])


def run_memory(model_path: str | None, bucket_mb: float, repeats: int) -> dict:
    """Every sync and training case, each in a fresh process: SmolLM2-135M and a random 370M model, or
    `model_path` alone."""
    if model_path is None:
        models = {"SmolLM2-135M": utils.embedded_smollm2_folder(),
                  "random-370M": random_model(os.path.join(utils.cache_dir(), "random_370m"))}
    else:
        models = {os.path.basename(os.path.normpath(model_path)): model_path}
    cases = [(name, case) for name in models for case in ("sync_full", "sync_stream")]
    cases += [(next(iter(models)), "train"), (next(iter(models)), "train_checkpointed")]
    env = common.child_env()
    # glibc raises its mmap threshold after large frees and then keeps freed tensors in its heap: a later sync's
    # allocations would reuse that memory without the resident set growing. A fixed threshold maps every block
    # over 64 KiB on its own and unmaps it when freed, so the resident set follows the live tensors.
    env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    results = []
    for name, case in cases:
        # syncs on 2 ranks: on one, an FSDP2 "shard" is the whole tensor and a gather copies nothing
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] \
            if case.startswith("sync") else [sys.executable]
        out = subprocess.run([*launcher, __file__, "--case", case, "--model_path", models[name], "--bucket_mb",
                              str(bucket_mb), "--repeats", str(repeats)], env=env, capture_output=True,
                             text=True, check=True)
        results.append({"model": name, **next(json.loads(line) for line in out.stdout.splitlines()
                                               if line.startswith('{"case"') and '"rank": 0' in line)})
        print(f"{name:<14} {case:<20} peak {results[-1]['peak_bytes'] / MiB:8.1f} MiB  "
              f"{results[-1]['seconds']:6.2f} s", flush=True)
    return {"bucket_mb": bucket_mb, "repeats": repeats, "results": results}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["memory", "anchor", "all"], default="all")
    parser.add_argument("--bucket_mb", type=float, default=32, help="memory: the streamed sync's bucket size")
    parser.add_argument("--repeats", type=int, default=3, help="memory: measured calls per case (the smallest counts)")
    parser.add_argument("--model", help="measure this model alone (memory: syncs and training; anchor: policy, user) "
                        "instead of SmolLM2-135M and the random 370M model")
    parser.add_argument("--anchor_dialogues", type=int, default=AnchorWork.dialogues, help="anchor: dialogues played")
    parser.add_argument("--anchor_horizon", type=int, default=AnchorWork.horizon, help="anchor: turns per dialogue")
    common.add_output_flags(parser)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--anchor_case", help=argparse.SUPPRESS)
    parser.add_argument("--anchor_turn", help=argparse.SUPPRESS)
    parser.add_argument("--model_path", help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    parser.add_argument("--seed", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = AnchorWork(dialogues=args.anchor_dialogues, horizon=args.anchor_horizon)
    # the measurements run in processes of their own; each exits as soon as its result is out, since vLLM's and
    # the process group's teardown would only cost time
    if args.case:
        print(json.dumps(run_case(args.case, args.model_path, args.bucket_mb, args.repeats)), flush=True)
        os._exit(0)
    if args.anchor_case:
        print(json.dumps(anchor_case(args.anchor_case, args.model_path, work)), flush=True)
        os._exit(0)
    if args.anchor_turn:
        anchor_turn(args.anchor_turn, args.model_path, args.state, args.seed, work)
        os._exit(0)
    parts = {"anchor": ("scale_anchor", report_anchor), "memory": ("scale_bench", report_memory)}
    for part, (name, report) in parts.items():
        if args.part not in (part, "all"):
            continue
        path = os.path.join(args.output_dir, f"{name}.json")
        if not args.report and part == "anchor":
            common.save_results(path, run_anchor(args.model or utils.embedded_smollm2_folder(), work))
            plot_anchor(common.load_results(path), os.path.join(args.output_dir, "scale_anchor.png"))
        elif not args.report:
            common.save_results(path, run_memory(args.model, args.bucket_mb, args.repeats))
            plot(common.load_results(path)["results"], os.path.join(args.output_dir, "scale.png"))
        print(f"\n{report(common.load_results(path))}\n", flush=True)
