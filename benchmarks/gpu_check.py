"""A check for a machine with one GPU (torch and transformers only; vLLM is not needed): does the training path run
over NCCL, and how does the memory plan compare with what the device allocates?

Training: one FSDP2 bf16 training step (a one-rank process group: gloo for CPU tensors, NCCL for CUDA ones) of
`utils.token_logprobs` on a micro-batch laid out as the scripts lay theirs out (`utils.batch_for_logprobs`: rows of
prompt + response, logits over the response columns), for a tiny policy (`utils.make_tiny_model` with the
embedded SmolLM2's tokenizer) and a random Llama of about 1B parameters built here from a config, each with and
without activation checkpointing. Each case plans its memory first (`memory_plan.plan_memory` with the case's
micro-batch shape; the training terms: weights, gradients, AdamW state, gathered layers, activations), then runs a
warm-up step (which allocates AdamW's state) and a measured step, and records `torch.cuda.max_memory_allocated`
over the measured step next to the plan.

Script: a short `refuel.py` run (the guessing game unless `--refuel_task` names another) with the tiny policy and
`--rollout_backend transformers`, in a process of its own; its exit status, seconds, checkpoints and the tail of
its output are recorded.

Everything goes into one JSON file, `<output_dir>/gpu_check.json`. Without CUDA the same code runs on the CPU over
gloo and records null for the device-memory figures (the tests smoke-test it that way at toy sizes).

    python benchmarks/gpu_check.py --output_dir runs/gpu_check
"""

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import memory_plan  # noqa: E402
import utils  # noqa: E402

TRAINING_TERMS = ("weights", "gradients", "optimizer", "gathered_layers", "activations")
"""the plan's terms a training step allocates (the engine, its KV cache, syncs and exports are not in this check)"""


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


def device_peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def device_allocated(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


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
    input_ids, attention_mask, response_mask = micro_batch(config.vocab_size, args.rows, args.prompt_tokens,
                                                           args.response_tokens, config.pad_token_id, device)

    def step() -> tuple[float, float]:
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

    step()  # the warm-up step allocates AdamW's moments: the measured step holds them, as every later step does
    before = device_allocated(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loss, seconds = step()
    peak = device_peak(device)
    planned = sum(getattr(plan, term) for term in TRAINING_TERMS)
    return {
        "model": name, "parameters": plan.parameters, "gradient_checkpointing": checkpointing,
        "planned": {term: getattr(plan, term) for term in TRAINING_TERMS}, "planned_training_bytes": planned,
        "measured_before_step_bytes": before, "measured_peak_bytes": peak,
        "measured_peak_over_planned": None if peak is None else peak / planned,
        "loss": loss, "step_seconds": seconds,
    }


def environment_for_child() -> dict[str, str]:
    """This environment without the rank variables `utils.init_distributed` set here: the child makes its own
    one-process group instead of joining this one's."""
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in os.environ.items() if k not in launcher}


def refuel_run(policy: str, args) -> dict:
    """A short refuel.py run on `--refuel_task` with `policy`, on the transformers backend: status and time."""
    output_dir = os.path.join(args.output_dir, "refuel")
    shutil.rmtree(output_dir, ignore_errors=True)
    command = [sys.executable, os.path.join(REPO, "refuel.py"), "--output_dir", output_dir, "--run_name", "check",
               "--task", args.refuel_task, "--model", policy, "--rollout_backend", "transformers",
               "--num_iterations", str(args.refuel_iterations),
               "--pairs_per_rank", str(args.refuel_pairs), "--minibatch_pairs", str(args.refuel_pairs // 2),
               "--micro_batch_pairs", str(args.refuel_pairs // 2), "--eval_every", "1", "--save_every", "1",
               "--horizon_sampling", "uniform"]
    started = time.time()
    try:
        out = subprocess.run(command, env=environment_for_child(), capture_output=True, text=True,
                             timeout=args.refuel_timeout)
        returncode, output = out.returncode, out.stdout + out.stderr
    except subprocess.TimeoutExpired as e:
        returncode, output = None, f"timed out after {args.refuel_timeout} s\n{e.stdout or ''}{e.stderr or ''}"
    checkpoints = os.path.join(output_dir, "check", "checkpoints")
    return {"command": command[1:], "returncode": returncode, "seconds": time.time() - started,
            "checkpoints": sorted(os.listdir(checkpoints)) if os.path.isdir(checkpoints) else [],
            "output_tail": output[-4000:]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default=os.path.join("runs", "gpu_check"))
    parser.add_argument("--rows", type=int, default=8, help="sequences per micro-batch")
    parser.add_argument("--prompt_tokens", type=int, default=896)
    parser.add_argument("--response_tokens", type=int, default=128, help="columns with logits")
    parser.add_argument("--sync_bucket_mb", type=float, default=512)
    parser.add_argument("--large_hidden_size", type=int, default=2048)
    parser.add_argument("--large_layers", type=int, default=16)
    parser.add_argument("--large_intermediate_size", type=int, default=5632)
    parser.add_argument("--large_heads", type=int, default=32)
    parser.add_argument("--refuel_task", default="guess_number",
                        help="refuel.py's --task (the guessing game evaluates 1024 games before and after)")
    parser.add_argument("--refuel_iterations", type=int, default=2)
    parser.add_argument("--refuel_pairs", type=int, default=8, help="pairs per iteration (even: two micro-batches)")
    parser.add_argument("--refuel_timeout", type=float, default=300)
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)

    rank, world_size, device = utils.init_distributed()
    tokenizer = utils.load_tokenizer(utils.embedded_smollm2_folder())
    tiny = utils.make_tiny_model(os.path.join(args.output_dir, "tiny_policy"), utils.embedded_smollm2_folder())
    from transformers import AutoConfig

    models = {
        "tiny": AutoConfig.from_pretrained(tiny),
        "random-1b": llama_config(tokenizer, args.large_hidden_size, args.large_layers, args.large_intermediate_size,
                                  args.large_heads),
    }
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "backend": dist.get_backend(), "torch": torch.__version__,
        "micro_batch": {"rows": args.rows, "prompt_tokens": args.prompt_tokens,
                        "response_tokens": args.response_tokens},
        "cases": [],
    }
    started = time.time()
    for name, config in models.items():
        for checkpointing in (False, True):
            result["cases"].append(training_case(name, config, checkpointing, args, world_size, device))
            gc.collect()  # the case's model and optimizer go before the next case allocates
            if device.type == "cuda":
                torch.cuda.empty_cache()
            case = result["cases"][-1]
            measured = "n/a" if case["measured_peak_bytes"] is None else f"{case['measured_peak_bytes'] / 2**30:.2f}"
            print(f"{name:<10} checkpointing {checkpointing!s:<5} planned {case['planned_training_bytes'] / 2**30:.2f} "
                  f"GiB, measured {measured} GiB, step {case['step_seconds']:.2f} s", flush=True)
    dist.destroy_process_group()  # the refuel run makes its own group and device context
    result["refuel"] = refuel_run(tiny, args)
    print(f"refuel.py: exit status {result['refuel']['returncode']}, {result['refuel']['seconds']:.0f} s", flush=True)
    result["seconds"] = time.time() - started
    path = os.path.join(args.output_dir, "gpu_check.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
