"""The check to run first on a GPU machine: do training, the rollout engine, the weight sync and a script's run
and resume work here, and how do the memory plan and the engine's sleep compare with what the device does?

    bash setup.sh --gpu                                  # the CUDA stack (requirements.txt) and the embedded model
    .venv/bin/python benchmarks/gpu_check.py --output_dir runs/gpu_check

Stages, in order (`--stages` picks among those after the preflight); each records its "status" ("ok", "failed"
with the error, or "skipped" with the reason) and its "seconds". A failed stage does not stop the later ones; a
failed preflight skips them, since they need its device and models:

- preflight: a CUDA device is visible (the check stops otherwise, unless `--allow_cpu`); its name, compute
  capability and memory, the driver, bf16 support, the architectures torch has kernels for, the torch / CUDA /
  NCCL / vLLM / transformers versions; the process group (NCCL with gloo beside it); the embedded SmolLM2 and a
  tiny policy built from its tokenizer.
- training: one FSDP2 bf16 training step of `utils.token_logprobs` on a micro-batch laid out as the scripts lay
  theirs out, for the tiny policy and a random Llama of about 1B parameters, each with and without activation
  checkpointing. Each case plans its memory (`memory_plan.plan_memory`: weights, gradients, AdamW state, gathered
  layers and root, activations), takes a warm-up step (which allocates AdamW's state) and a measured step, and
  records `torch.cuda.max_memory_allocated` over the measured step next to the plan.
- engine (vLLM only: "skipped" where it is not installed): the embedded SmolLM2 in a vLLM engine in bf16 (a CPU
  whose vLLM refuses bf16 falls back to fp32, recorded) with sleep mode on CUDA, next to an FSDP2 trainer of the
  same weights. It records the engine's start time and a greedy answer, the trainer/engine log-prob gap of the
  sync probe (`engines.logprob_gap`) and the bitwise read-back (`engines.check_weights_match`); then one AdamW step
  of the trainer, after which the read-back must find the engine stale; then the bytes sleep frees
  (`torch.cuda.mem_get_info`), `engines.sync_weights` (which wakes the engine and returns its own checks' figures),
  after which the read-back must pass, and a greedy answer after the wake-up.
- refuel: `refuel.py` for 2 iterations with its default rollout backend (vLLM where installed), in a process of
  its own, checkpointing each; then its last checkpoint is removed, as if the run had died before writing it, and
  `--resume` must run iteration 2 again from iteration 1's checkpoint.
- refuel_transformers: the same with `--rollout_backend transformers`, the path of machines without vLLM.

Everything goes into `<output_dir>/gpu_check.json`, rewritten after every stage (a crash keeps what ran, and the
stage running then says "running"). The exit status is 1 when a stage failed. With `--allow_cpu` the same code
runs on the CPU over gloo and records null for the device-memory figures (the tests run it that way at toy sizes).
"""

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import engines  # noqa: E402
import memory_plan  # noqa: E402
import lifecycle  # noqa: E402
import utils  # noqa: E402

STAGES = ("preflight", "training", "engine", "refuel", "refuel_transformers")
"""the stages in the order they run; preflight runs always, the others as `--stages` selects"""

TRAINING_TERMS = ("weights", "gradients", "optimizer", "gathered_root", "gathered_layers", "activations")
"""the plan's terms a training step of a policy alone allocates (`MemoryPlan.training` without a reference, critic,
reward model or user; the engine, its KV cache, syncs and exports are not in this check)"""

PROBE_QUESTION = "What is the capital of France?"
"""the opening of the engine stage's probe and of its greedy answers"""


class Skipped(Exception):
    """Raised by a stage that does not apply on this machine; the message is the reason."""


class CheckFailed(Exception):
    """Raised by a stage that ran but found what it checks wrong; the message lists what."""


# ----------------------------------------------------------------------------------------------------------
# the report and the stage runner


def write_report(report: dict, path: str) -> None:
    """Writes the report whole or not at all: a crash during the write keeps the previous version."""
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(path + ".tmp", path)


def run_stage(report: dict, name: str, stage, path: str) -> str:
    """Runs `stage(record)`, which fills `record` as it goes, and stores the record under `report["stages"][name]`
    with its status and seconds, writing the report before and after. Returns the status."""
    report["stages"][name] = {"status": "running"}
    write_report(report, path)
    record, started = {}, time.perf_counter()
    try:
        stage(record)
        outcome = {"status": "ok"}
    except Skipped as e:
        outcome = {"status": "skipped", "reason": str(e)}
    except (Exception, SystemExit) as e:  # the scripts' helpers stop with SystemExit on a bad setup
        outcome = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc()[-4000:]}
    report["stages"][name] = {**outcome, "seconds": time.perf_counter() - started, **record}
    release_memory()  # a failed stage's models went with its traceback: their memory goes before the next stage
    report["seconds"] = time.time() - report["started"]
    write_report(report, path)
    detail = outcome.get("reason") or outcome.get("error", "")
    print(f"{name}: {outcome['status']} ({report['stages'][name]['seconds']:.0f} s){' - ' + detail if detail else ''}",
          flush=True)
    return outcome["status"]


def skipped_stage(reason: str):
    """A stage that only records why it did not run."""
    def stage(record: dict) -> None:
        raise Skipped(reason)
    return stage


def release_memory() -> None:
    """Returns what the models and engines dropped so far held to the device, before the next one allocates."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------
# preflight


def driver_version() -> str | None:
    """The NVIDIA driver's version as `nvidia-smi` reports it; None where there is no nvidia-smi."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True)
        return (out.stdout.split() or [None])[0]
    return None


def preflight(record: dict, args, setup: dict) -> None:
    """Asserts a CUDA device (unless --allow_cpu), records the device and the versions, joins the process group and
    builds the tiny policy; puts the device, world size and tiny policy into `setup` for the later stages."""
    record["cuda_available"] = torch.cuda.is_available()
    if not record["cuda_available"] and not args.allow_cpu:
        raise SystemExit(f"no CUDA device visible to torch {torch.__version__} (built for CUDA {torch.version.cuda}; "
                         f"driver {driver_version()}): check nvidia-smi and CUDA_VISIBLE_DEVICES, or pass --allow_cpu "
                         "to run the check on the CPU")
    _, world_size, device = utils.init_distributed(device="auto")
    record["environment"] = lifecycle.environment(device, world_size, bf16=True)
    record["process_group_backend"] = dist.get_backend()
    if device.type == "cuda":
        record["driver"] = driver_version()
        record["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        record["torch_cuda_architectures"] = torch.cuda.get_arch_list()  # what this torch build has kernels for
        record["device_memory_bytes"] = torch.cuda.mem_get_info(device)[1]
        record["bf16_supported"] = torch.cuda.is_bf16_supported()
    else:
        record["cpu_capability"] = torch.backends.cpu.get_cpu_capability()  # what vLLM's CPU kernels can use
    smollm2 = utils.embedded_smollm2_folder()
    setup.update(device=device, world_size=world_size, smollm2=smollm2,
                 tiny=utils.make_tiny_model(os.path.join(args.output_dir, "tiny_policy"), smollm2))


# ----------------------------------------------------------------------------------------------------------
# training: one FSDP2 bf16 step, measured against the memory plan


def llama_config(tokenizer, hidden_size: int, num_hidden_layers: int, intermediate_size: int,
                 num_attention_heads: int):
    """An untied Llama config with the tokenizer's vocabulary and special tokens."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        intermediate_size=intermediate_size, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def micro_batch(vocab_size: int, rows: int, prompt_tokens: int, response_tokens: int, pad_id: int, device):
    """Random prompts and responses of the given lengths, laid out as the scripts' micro-batches."""
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, vocab_size, (rows, prompt_tokens), generator=generator).tolist()
    responses = torch.randint(0, vocab_size, (rows, response_tokens), generator=generator).tolist()
    return [t.to(device) for t in utils.batch_for_logprobs(prompts, responses, pad_id)]


def train_step(model, optimizer, batch, device: torch.device) -> tuple[float, float]:
    """One AdamW step on the negative log-likelihood of the batch's responses; returns (loss, seconds)."""
    input_ids, attention_mask, response_mask = batch
    started = time.perf_counter()
    logprobs = utils.token_logprobs(model, input_ids, attention_mask, response_mask, temperature=1.0)
    loss = -logprobs.sum() / response_mask.sum()
    loss.backward()
    utils.clip_grad_norm(model, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return loss.item(), time.perf_counter() - started


def training_case(name: str, config, checkpointing: bool, args, world_size: int, device: torch.device) -> dict:
    """The plan and the measured device memory of one FSDP2 bf16 training step of a random model of `config`."""
    from transformers import AutoModelForCausalLM

    plan = memory_plan.plan_memory(
        memory_plan.meta_model(config), world_size=world_size, bf16=True, gradient_checkpointing=checkpointing,
        kv_cache_bytes=0, sync_bucket_bytes=int(args.sync_bucket_mb * 2**20), rows=args.rows,
        sequence_tokens=args.prompt_tokens + args.response_tokens, response_tokens=args.response_tokens)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = utils.shard_model(model, bf16=True, gradient_checkpointing=checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = micro_batch(config.vocab_size, args.rows, args.prompt_tokens, args.response_tokens, config.pad_token_id,
                        device)
    train_step(model, optimizer, batch, device)  # allocates AdamW's moments, which every later step holds
    cuda = device.type == "cuda"
    before = torch.cuda.memory_allocated(device) if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    loss, seconds = train_step(model, optimizer, batch, device)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    planned = plan.training
    return {
        "model": name, "parameters": plan.parameters, "gradient_checkpointing": checkpointing,
        "planned": {term: getattr(plan, term) for term in TRAINING_TERMS}, "planned_training_bytes": planned,
        "measured_before_step_bytes": before, "measured_peak_bytes": peak,
        "measured_peak_over_planned": None if peak is None else peak / planned,
        "loss": loss, "step_seconds": seconds,
    }


def training(record: dict, args, setup: dict) -> None:
    """The four training cases (tiny and ~1B, with and without activation checkpointing), appended as they end."""
    from transformers import AutoConfig

    device = setup["device"]
    tokenizer = utils.load_tokenizer(setup["smollm2"])
    models = {
        "tiny": AutoConfig.from_pretrained(setup["tiny"]),
        "random-1b": llama_config(tokenizer, args.large_hidden_size, args.large_layers, args.large_intermediate_size,
                                  args.large_heads),
    }
    record["micro_batch"] = {"rows": args.rows, "prompt_tokens": args.prompt_tokens,
                             "response_tokens": args.response_tokens}
    record["cases"] = []
    for name, config in models.items():
        for checkpointing in (False, True):
            case = training_case(name, config, checkpointing, args, setup["world_size"], device)
            record["cases"].append(case)
            release_memory()  # the case's model and optimizer go before the next case allocates
            measured = "n/a" if case["measured_peak_bytes"] is None else f"{case['measured_peak_bytes'] / 2**30:.2f}"
            print(f"  {name:<10} checkpointing {checkpointing!s:<5} planned "
                  f"{case['planned_training_bytes'] / 2**30:.2f} GiB, measured {measured} GiB, "
                  f"step {case['step_seconds']:.2f} s", flush=True)


# ----------------------------------------------------------------------------------------------------------
# engine: bf16 vLLM with sleep mode, the stale-then-fresh read-back around one training step and a sync


def start_engine(path: str, device: torch.device, args, record: dict):
    """A vLLM engine of `path` in bf16, with sleep mode on CUDA. On a CPU whose vLLM build cannot run bf16 (a start
    or a first generate that fails) it falls back to fp32 and records why; on CUDA a bf16 failure is the error."""
    options = dict(max_model_len=args.engine_max_len, seed=0, gpu_memory_utilization=args.engine_memory_share,
                   kv_cache_memory_bytes=None, backend="vllm", sleep_mode=device.type == "cuda")
    started = time.perf_counter()
    try:
        engine = engines.make_engine(path, device, bf16=True, **options)
        engine.generate([[0]], max_tokens=1, temperature=0.0, seeds=[0])
    except Exception as e:
        if device.type == "cuda":
            raise
        record["bf16_refused"] = f"{type(e).__name__}: {e}"
        release_memory()
        started = time.perf_counter()
        engine = engines.make_engine(path, device, bf16=False, **options)
    record["start_seconds"] = time.perf_counter() - started
    record["dtype"] = str(engine.dtype).removeprefix("torch.")
    record["sleep_mode"] = device.type == "cuda"
    return engine


def greedy_answer(engine, prompt_ids: list[int]) -> dict:
    completion = engine.generate([prompt_ids], max_tokens=16, temperature=0.0, seeds=[0])[0]
    return {"text": completion.text, "finished": completion.finished}


def read_back(engine, model) -> dict:
    """`engines.check_weights_match` as a record: {"matches": True, "tensors": n}, or {"matches": False, "error": e}."""
    try:
        return {"matches": True, "tensors": engines.check_weights_match(engine, model)}
    except engines.WeightSyncError as e:
        return {"matches": False, "error": str(e)}


def free_device_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.mem_get_info(device)[0]


def engine_check(record: dict, args, setup: dict) -> None:
    """The engine stage (see the module docstring); fails at the end, after recording everything, when the
    read-back did not see the stale engine, did not pass after the sync, or the sync's own check failed."""
    if importlib.util.find_spec("vllm") is None:
        raise Skipped("vLLM not installed")
    device = setup["device"]
    path = setup["tiny"] if args.engine_model == "tiny" else utils.resolve_model_path(args.engine_model)
    record["model"] = args.engine_model
    tokenizer = utils.load_tokenizer(path)
    trainer = utils.shard_model(utils.load_causal_lm(path, torch.float32, device), bf16=True)
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=args.engine_step_lr)
    opening = utils.chat_token_ids(tokenizer, [{"role": "user", "content": PROBE_QUESTION}], True)
    probe_ids, answer_start = engines.probe_sequence(tokenizer, opening, args.engine_max_len)
    engine = start_engine(path, device, args, record)
    try:
        record["answer_before"] = greedy_answer(engine, opening)
        record["initial"] = {"read_back": read_back(engine, trainer),
                             "logprob_gap": engines.logprob_gap(engine, trainer, probe_ids, answer_start, device)}
        # one step at a fine-tuning learning rate on random tokens, not on the probe: the gap after it shows what
        # one ordinary step does to the probe's log-probs, next to what the read-back sees
        batch = micro_batch(len(tokenizer), rows=2, prompt_tokens=32, response_tokens=16,
                            pad_id=tokenizer.pad_token_id, device=device)
        record["train_step_loss"], _ = train_step(trainer, optimizer, batch, device)
        record["after_step"] = {"read_back": read_back(engine, trainer),
                                "logprob_gap": engines.logprob_gap(engine, trainer, probe_ids, answer_start, device)}
        record["sleep"] = engine_sleep(engine, device)
        started = time.perf_counter()
        try:
            record["sync"] = engines.sync_weights(engine, trainer, probe_ids, answer_start, device,
                                                  bucket_mb=args.sync_bucket_mb)
        except engines.WeightSyncError as e:
            record["sync"] = {"error": str(e)}
        record["sync_seconds"] = time.perf_counter() - started
        record["free_bytes_after_wake_up"] = free_device_bytes(device)
        record["after_sync"] = {"read_back": read_back(engine, trainer)}
        record["answer_after_sync"] = greedy_answer(engine, opening)
    finally:
        engine.close()
    problems = [message for bad, message in [
        (not record["initial"]["read_back"]["matches"], "the read-back differs right after the engine's start"),
        (record["after_step"]["read_back"]["matches"], "the read-back did not see the engine stale after a step"),
        ("error" in record["sync"], "the sync's own check failed"),
        (not record["after_sync"]["read_back"]["matches"], "the read-back differs after the sync"),
    ] if bad]
    if problems:
        raise CheckFailed("; ".join(problems))


def engine_sleep(engine, device: torch.device) -> dict:
    """Puts the engine to sleep and records the device memory that frees; vLLM's sleep mode exists on CUDA only."""
    if device.type != "cuda":
        return {"skipped": "vLLM's sleep mode needs CUDA"}
    before = free_device_bytes(device)
    started = time.perf_counter()
    engine.sleep()
    after = free_device_bytes(device)
    return {"freed_bytes": after - before, "free_bytes_asleep": after, "seconds": time.perf_counter() - started}


# ----------------------------------------------------------------------------------------------------------
# refuel.py: a run, then its resume, in processes of their own


def environment_for_child() -> dict[str, str]:
    """This environment without the rank variables `utils.init_distributed` set here: the child makes its own
    one-process group instead of joining this one's."""
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in os.environ.items() if k not in launcher}


def refuel_process(flags: list[str], args) -> dict:
    """One refuel.py process: its command, exit status (None when it timed out), seconds, the checkpoint it says it
    resumed from (None if none) and the tail of its output."""
    command = [sys.executable, os.path.join(REPO, "refuel.py"), *flags]
    started = time.perf_counter()
    try:
        out = subprocess.run(command, env=environment_for_child(), capture_output=True, text=True,
                             timeout=args.refuel_timeout)
        returncode, output = out.returncode, out.stdout + out.stderr
    except subprocess.TimeoutExpired as e:
        # what it printed before the timeout comes as bytes, whatever `text` asked for
        printed = b"".join(p if isinstance(p, bytes) else p.encode() for p in (e.stdout, e.stderr) if p)
        returncode, output = None, f"timed out after {args.refuel_timeout} s\n{printed.decode(errors='replace')}"
    resumed = [line.split("resumed from ", 1)[1].strip() for line in output.splitlines()
               if line.startswith("resumed from ")]
    return {"command": command[1:], "returncode": returncode, "seconds": time.perf_counter() - started,
            "resumed_from": os.path.basename(resumed[-1]) if resumed else None, "output_tail": output[-3000:]}


def checkpoint_name(iteration: int) -> str:
    """The folder `checkpoints.save_checkpoint` writes for an iteration."""
    return f"iteration_{iteration:06d}"


def run_state(run_dir: str) -> dict:
    """The run folder's checkpoints and the iterations its metrics log holds."""
    folder = os.path.join(run_dir, "checkpoints")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    iterations = []
    if os.path.exists(metrics):
        with open(metrics) as f:
            iterations = [json.loads(line)["iteration"] for line in f if line.strip()]
    return {"checkpoints": sorted(os.listdir(folder)) if os.path.isdir(folder) else [], "iterations_logged": iterations}


def refuel_check(record: dict, args, setup: dict, backend: str | None) -> None:
    """refuel.py for 2 iterations on `backend` (None: its default), then its last checkpoint removed and `--resume`,
    which must continue from iteration 1's checkpoint and write iteration 2's again. (A resume must keep
    `--num_iterations`, which its learning-rate schedule spans, so a 1-iteration run cannot be extended to 2.)"""
    name = "refuel" if backend is None else f"refuel_{backend}"
    output_dir = os.path.join(args.output_dir, name)
    shutil.rmtree(output_dir, ignore_errors=True)
    run_dir = os.path.join(output_dir, "check")
    flags = ["--output_dir", output_dir, "--run_name", "check", "--task", args.refuel_task, "--model", setup["tiny"],
             "--num_iterations", "2", "--pairs_per_rank", str(args.refuel_pairs),
             "--minibatch_pairs", str(args.refuel_pairs // 2), "--micro_batch_pairs", str(args.refuel_pairs // 2),
             "--eval_every", "1", "--save_every", "1", "--horizon_sampling", "uniform"]
    if backend is not None:
        flags += ["--rollout_backend", backend]
    record["backend"] = backend or ("vllm" if importlib.util.find_spec("vllm") else "transformers")
    both = [checkpoint_name(1), checkpoint_name(2)]
    record["run"] = {**refuel_process(flags, args), **run_state(run_dir)}
    if record["run"]["returncode"] != 0 or record["run"]["checkpoints"] != both:
        raise CheckFailed(f"refuel.py exited with status {record['run']['returncode']}, checkpoints "
                          f"{record['run']['checkpoints']}")
    last = os.path.join(run_dir, "checkpoints", checkpoint_name(2))
    shutil.rmtree(last)
    record["removed_checkpoint"] = os.path.basename(last)
    record["resume"] = {**refuel_process(flags + ["--resume"], args), **run_state(run_dir)}
    problems = [message for bad, message in [
        (record["resume"]["returncode"] != 0, f"--resume exited with status {record['resume']['returncode']}"),
        (record["resume"]["resumed_from"] != checkpoint_name(1),
         f"--resume started from {record['resume']['resumed_from']}, not iteration 1's checkpoint"),
        (record["resume"]["checkpoints"] != both,
         f"checkpoints after the resume: {record['resume']['checkpoints']}"),
        (record["resume"]["iterations_logged"] != [0, 1, 2],
         f"iterations logged after the resume: {record['resume']['iterations_logged']}"),
    ] if bad]
    if problems:
        raise CheckFailed("; ".join(problems))


# ----------------------------------------------------------------------------------------------------------


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default=os.path.join("runs", "gpu_check"))
    parser.add_argument("--allow_cpu", action="store_true",
                        help="run on the CPU when no CUDA device is visible (the tests' toy runs) instead of stopping")
    parser.add_argument("--stages", default=",".join(STAGES[1:]),
                        help=f"comma-separated stages to run after the preflight, of {', '.join(STAGES[1:])}")
    parser.add_argument("--rows", type=int, default=8, help="training: sequences per micro-batch")
    parser.add_argument("--prompt_tokens", type=int, default=896)
    parser.add_argument("--response_tokens", type=int, default=128, help="columns with logits")
    parser.add_argument("--sync_bucket_mb", type=float, default=512)
    parser.add_argument("--large_hidden_size", type=int, default=2048)
    parser.add_argument("--large_layers", type=int, default=16)
    parser.add_argument("--large_intermediate_size", type=int, default=5632)
    parser.add_argument("--large_heads", type=int, default=32)
    parser.add_argument("--engine_model", default=utils.EMBEDDED_SMOLLM2,
                        help="engine: a model name or folder; `tiny` is the tiny policy the preflight builds")
    parser.add_argument("--engine_max_len", type=int, default=512, help="engine: its context in tokens")
    parser.add_argument("--engine_memory_share", type=float, default=0.3,
                        help="engine: vLLM's gpu_memory_utilization, the share of the device it may take")
    parser.add_argument("--engine_step_lr", type=float, default=1e-5,
                        help="engine: the learning rate of the trainer's one AdamW step between the read-backs")
    parser.add_argument("--refuel_task", default="guess_number",
                        help="refuel.py's --task (the guessing game evaluates 1024 games at every iteration)")
    parser.add_argument("--refuel_pairs", type=int, default=8, help="pairs per iteration (even: two micro-batches)")
    parser.add_argument("--refuel_timeout", type=float, default=300, help="seconds per refuel.py process")
    args = parser.parse_args()
    unknown = set(args.stages.split(",")) - set(STAGES[1:])
    if unknown:
        parser.error(f"--stages: unknown {', '.join(sorted(unknown))}; choose from {', '.join(STAGES[1:])}")
    return args


if __name__ == "__main__":
    args = parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine stage's engine lives in this process
    lifecycle.quiet_third_party(verbose=False)
    path = os.path.join(args.output_dir, "gpu_check.json")
    report = {"command": sys.argv, "started": time.time(), "stages": {}}
    setup = {}
    stages = {
        "training": lambda record: training(record, args, setup),
        "engine": lambda record: engine_check(record, args, setup),
        "refuel": lambda record: refuel_check(record, args, setup, backend=None),
        "refuel_transformers": lambda record: refuel_check(record, args, setup, backend="transformers"),
    }
    selected = args.stages.split(",")
    ready = run_stage(report, "preflight", lambda record: preflight(record, args, setup), path) == "ok"
    for name, stage in stages.items():
        if name.startswith("refuel") and dist.is_initialized():
            utils.shutdown()  # each refuel.py process makes its own group; this one's NCCL buffers go first
        if not ready:
            stage = skipped_stage("the preflight failed")
        elif name not in selected:
            stage = skipped_stage("not in --stages")
        run_stage(report, name, stage, path)
    print(f"wrote {path}")
    sys.exit(1 if any(r["status"] == "failed" for r in report["stages"].values()) else 0)
