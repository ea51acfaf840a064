"""Memory of a weight sync and of a training step, and the colocated design against the official pipeline's.

Sync: the whole-model gather of before (`whole_model_weights`, fp32, then one reload) against the streamed sync
(`engines.sync_weights`, buckets of --bucket_mb), into a colocated vLLM engine per rank, on 2 ranks (rank 0's
numbers), for the embedded SmolLM2-135M and a random Llama of about 370M parameters built here. Training: one
forward and backward of SmolLM2-135M on a fixed batch, with and without activation checkpointing. Each case runs
in a fresh process (so one case's freed memory cannot hide the next one's peak); peak memory is the largest
resident set size above the one just before the measured call, sampled every millisecond, the smallest over
--repeats. Writes scale_bench.json and the plot scale.png to --output_dir. About 6 minutes on 2 CPU cores.

Performance anchor (`--part anchor`): the rollout half of one REFUEL iteration on the chat task (SmolLM2-135M as
policy and as LLM user; each dialogue played to the horizon, and a branch from its turn h played to the horizon
too), in three designs, each in a fresh process, same weights, branch turns and sampling seeds. Fresh (the official
REFUEL pipeline, setting_one/generate.py): the trained policy saved to disk, then a new process and a new vLLM
engine for every turn of every role, the dialogues handed over in a file, every dialogue played first and then
every branch. Two passes (this project before): both engines resident for the whole run, the trainer's weights
streamed into the policy engine in process and checked, then the same two passes. One pass (refuel.py,
`refuel.rollout_pairs`): the resident engines, both answers of turn h in one call and the two branches played
side by side. Training, rewards and log-probs do the same work in all three and are left out. Reports seconds,
ratios, engine calls per iteration and their mean size, and tokens per second. Writes scale_anchor.json and
scale_anchor.png to --output_dir; about 10 minutes on 2 CPU cores.

No training run is benchmarked here: of the flags all benchmarks share (benchmarks/common.py) this one takes
--output_dir and --report only; --model, --anchor_dialogues and --anchor_horizon shrink the measurement (tests).

    .venv/bin/python benchmarks/scale_bench.py [--part memory|anchor|all] [--bucket_mb 32] [--repeats 3]
        [--output_dir docs] [--model PATH] [--anchor_dialogues 16] [--anchor_horizon 3]
    .venv/bin/python benchmarks/scale_bench.py --report   # the tables again, from docs/scale_bench.json and
                                                          # docs/scale_anchor.json
"""

import argparse
import dataclasses
import functools
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
import refuel  # noqa: E402
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
                engines.check_logprob_parity(engine, model, probe, 1, device, 1e-3)  # every token after the first
            else:
                runs.append(peak_above_baseline(lambda: engines.sync_weights(engine, model, probe, 1, device, 1e-3,
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
# performance anchor: resident engines, in two passes or one, against a fresh engine per turn and role


@dataclasses.dataclass
class AnchorWork:
    """The rollout work of one REFUEL iteration, the same in every design."""

    dialogues: int = 16
    """dialogues played, each with one branch"""
    horizon: int = 3
    """assistant turns per dialogue"""
    max_tokens: int = 48
    """length cap of a policy turn and of a user reply"""
    temperature: float = 0.8
    """sampling temperature of both roles"""
    max_model_len: int = 2048
    """context of both engines"""


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
                                    horizons=[min(e.turns + 1, work.horizon) for e in episodes],
                                    max_tokens=work.max_tokens, temperature=work.temperature, seed=(0, seed))
    else:
        user = LLMUser(engine, tokenizer, work.max_tokens, work.temperature, 1)
        asking = [e for e in episodes if e.turns < work.horizon]
        for e, reply in zip(asking, user(asking)):
            e.messages.append({"role": "user", "content": reply})
    save_episodes(episodes, state)


class CountedEngine:
    """An engine that records how many requests each of its `generate` calls holds."""

    def __init__(self, engine):
        self.engine, self.batches = engine, []
        self.max_model_len = engine.max_model_len  # the dialogue loop keeps prompts within the wrapped engine's

    def generate(self, prompts, *args):
        self.batches.append(len(prompts))
        return self.engine.generate(prompts, *args)


ANCHOR_DESIGNS = {
    "fresh": "fresh engine per turn and role, disk reload (official pipeline)",
    "two passes": "resident engines, every dialogue then every branch",
    "one pass": "resident engines, both branches side by side (refuel.py)",
}


def anchor_case(design: str, model_path: str, work: AnchorWork) -> dict:
    """Seconds of the rollout half of one iteration in `design` (ANCHOR_DESIGNS), by phase; the requests in each
    engine call, by role; and the dialogues played (to compare the designs' work)."""
    device = utils.init_distributed()[2]
    policy, tokenizer = anchor_policy(model_path), utils.load_tokenizer(model_path)
    openings, seconds, calls = anchor_openings(work), {}, {"policy": [], "user": []}
    horizons = [work.horizon] * len(openings)
    if design != "fresh":
        started = time.perf_counter()
        engine = CountedEngine(engines.make_engine(
            model_path, device, max_model_len=work.max_model_len, seed=0, bf16=False, gpu_memory_utilization=0.3,
            kv_cache_memory_bytes=None, backend="vllm"))
        user_engine = CountedEngine(engines.make_engine(
            model_path, device, max_model_len=work.max_model_len, seed=1, bf16=False, gpu_memory_utilization=0.3,
            kv_cache_memory_bytes=None, backend="vllm"))
        user = LLMUser(user_engine, tokenizer, work.max_tokens, work.temperature, 1)
        seconds["start engines (once per run)"] = time.perf_counter() - started
        started = time.perf_counter()
        engines.sync_weights(engine.engine, policy, tokenizer(PROBE_TEXT).input_ids, 1, device, 1e-3, 512)
        seconds["hand over weights"] = time.perf_counter() - started
        started = time.perf_counter()
        play = functools.partial(dialogues.rollout_dialogues, engine=engine, tokenizer=tokenizer, user=user,
                                 horizons=horizons, max_tokens=work.max_tokens, temperature=work.temperature)
        if design == "two passes":
            played = play(openings, seed=(0, "A"))
            branched = play(branches(played, work), seed=(0, "B"))
        else:  # the same branch turns and seeds, both sides in every call
            played, branched, _ = refuel.rollout_pairs(
                openings, engine, tokenizer=tokenizer, user=user, horizons=horizons,
                branch_turns=[i % work.horizon for i in range(len(openings))], redraw=lambda turns: turns - 1,
                max_tokens=work.max_tokens, temperature=work.temperature, seed=(0,))
        seconds["play dialogues"] = time.perf_counter() - started
        calls = {"policy": engine.batches, "user": user_engine.batches}
    else:
        folder = tempfile.mkdtemp(prefix="anchor_")
        started = time.perf_counter()
        weights = whole_model_weights(policy)
        policy.save_pretrained(os.path.join(folder, "policy"), state_dict=weights)
        tokenizer.save_pretrained(os.path.join(folder, "policy"))
        seconds["hand over weights"] = time.perf_counter() - started
        state = os.path.join(folder, "dialogues.json")

        def play_fresh(episodes: list[dialogues.Episode], seed: str) -> list[dialogues.Episode]:
            save_episodes(episodes, state)
            for _ in range(work.horizon):
                for role, path in (("policy", os.path.join(folder, "policy")), ("user", model_path)):
                    # the dialogues short of the horizon (a branch starts at its turn h): one engine, one call
                    waiting = sum(e.turns < work.horizon for e in load_episodes(state))
                    if waiting:
                        subprocess.run([sys.executable, __file__, "--anchor_turn", role, "--model_path", path,
                                        "--state", state, "--seed", seed, *work_flags(work)], env=common.child_env(),
                                       check=True, capture_output=True)
                        calls[role].append(waiting)
            return load_episodes(state)

        started = time.perf_counter()
        played = play_fresh(openings, "A")
        branched = play_fresh(branches(played, work), "B")
        seconds["play dialogues"] = time.perf_counter() - started
        shutil.rmtree(folder)
    texts = [[m["content"] for m in e.messages] for e in played + branched]
    return {"design": design, "seconds": seconds, "dialogues": texts, "calls": calls,
            "generated_tokens": sum(len(r) for e in played + branched for r in e.responses)}


def plot_anchor(results: dict, path: str) -> None:
    """Stacked bars: seconds of each phase per design."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    labels = {"fresh": "fresh engine per turn\nand role, disk reload", "two passes": "resident engines,\ntwo passes",
              "one pass": "resident engines,\none pass"}
    for design, label in labels.items():
        r, bottom = results[design], 0.0
        for color, phase in zip(("C1", "C0"), ANCHOR_PHASES):
            ax.bar(label, r["seconds"][phase], bottom=bottom, color=color, label=phase if design == "fresh" else None)
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
    """The three designs, each in a fresh process: seconds by phase, engine calls, generated tokens, and how many
    dialogues came out the same word for word as the official pipeline's design."""
    results = {}
    for design in ANCHOR_DESIGNS:
        out = subprocess.run([sys.executable, __file__, "--anchor_case", design, "--model_path", model_path,
                              *work_flags(work)], env=common.child_env(), capture_output=True, text=True, check=True)
        results[design] = next(json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"design"'))
        print(f"{design:<10} " + "  ".join(f"{k} {v:.1f} s" for k, v in results[design]["seconds"].items()), flush=True)
    same = {d: sum(a == b for a, b in zip(r["dialogues"], results["fresh"]["dialogues"])) for d, r in results.items()}
    return {"model": os.path.basename(os.path.normpath(model_path)), "work": dataclasses.asdict(work),
            "identical_to_fresh": same,
            **{d: {k: v for k, v in r.items() if k != "dialogues"} for d, r in results.items()}}


def report_anchor(results: dict) -> str:
    """The designs side by side: seconds by phase, ratios to the official pipeline's design, engine calls per
    iteration and how full they are, and throughput."""
    work = AnchorWork(**results["work"])
    designs = list(ANCHOR_DESIGNS)
    rollout = {d: sum(results[d]["seconds"][p] for p in ANCHOR_PHASES) for d in designs}
    play = {d: results[d]["seconds"]["play dialogues"] for d in designs}
    in_play = 2 * work.dialogues  # dialogues and branches: what one call could hold at most
    rows = [[label] + [f"{results[d]['seconds'][phase]:.1f}" for d in designs] for phase, label in
            (("hand over weights", "hand over the weights"), ("play dialogues", "play dialogues and branches"))]
    rows.append(["**rollout half of an iteration (s)**"] + [f"**{rollout[d]:.1f}**" for d in designs])
    rows.append(["**fresh / this design**"] + [f"**{rollout['fresh'] / rollout[d]:.2f}**" for d in designs])
    rows.append(["generated tokens"] + [f"{results[d]['generated_tokens']:,}" for d in designs])
    rows.append(["generated tokens per second (play)"]
                + [f"{results[d]['generated_tokens'] / play[d]:.1f}" for d in designs])
    per_token = {d: play[d] / results[d]["generated_tokens"] for d in designs}
    rows.append(["fresh / this design, per generated token (play)"]
                + [f"{per_token['fresh'] / per_token[d]:.2f}" for d in designs])
    for role in ("policy", "user"):
        rows.append([f"{role} engine calls"] + [str(len(results[d]["calls"][role])) for d in designs])
        rows.append([f"{role} requests per call, mean (of {in_play} in play)"]
                    + [f"{sum(results[d]['calls'][role]) / max(1, len(results[d]['calls'][role])):.1f}"
                       for d in designs])
    starts = len(results["fresh"]["calls"]["policy"]) + len(results["fresh"]["calls"]["user"])
    rows.append(["engine starts"] + [str(starts), "2, once per run", "2, once per run"])
    rows.append(["dialogues identical to fresh's, word for word"]
                + [f"{results['identical_to_fresh'][d]} of {in_play}" for d in designs])
    return "\n".join([
        f"{work.dialogues} dialogues and {work.dialogues} branches, {work.horizon} turns, {work.max_tokens} tokens per "
        f"turn, branch turn h = i mod {work.horizon}, the same sampling seeds in every design:\n",
        common.table(["", *ANCHOR_DESIGNS.values()], rows)])


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
                                               if line.startswith('{"case"'))})
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
        result = run_case(args.case, args.model_path, args.bucket_mb, args.repeats)
        if result["rank"] == 0:  # one writer: two ranks' lines on one pipe can run into each other
            print(json.dumps(result), flush=True)
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
