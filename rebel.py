"""REBEL: REinforcement learning via regressing relative rewards (Gao et al. 2024, arXiv 2404.16767).

Online, on-policy: every update samples two responses y, y' per prompt x from the current policy pi_t and
regresses the difference of their log-ratios onto the difference of their rewards,

    theta_{t+1} = argmin_theta  sum_{(x, y, y')} ( [ln pi(y|x)/pi_t(y|x) - ln pi(y'|x)/pi_t(y'|x)] - eta (R(x,y) - R(x,y')) )^2

which approximates the natural-policy-gradient step pi_{t+1} ∝ pi_t exp(eta R) without a value network:
the partition function cancels in the difference.  R is the reward-model score minus kl_coef times the
sequence KL to the frozen reference, with a fixed penalty for a response that never ends (official code).

Run:
    python rebel.py                                   # one process, embedded SmolLM2 + brevity reward, CPU
    torchrun --nproc_per_node 2 rebel.py              # FSDP2 over 2 ranks, one colocated vLLM engine per rank
    torchrun --nproc_per_node 8 rebel.py --preset rebel-ultrafeedback   # the paper's UltraFeedback run (PRESETS)
"""

import dataclasses
import os
import sys
import time
from typing import Literal

# torch reads its C++ log level once, when first imported: without --verbose, keep its warnings (vLLM's "NUMA
# binding" line at every engine start) off the console
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "WARNING" if "--verbose" in sys.argv else "ERROR")

import numpy as np
import torch

import checkpoints
import dialogues
import engines
import memory_plan
import tasks
import utils


@dataclasses.dataclass
class Args:
    # experiment
    exp_name: str = "rebel"
    """name of this experiment, part of the run name"""
    seed: int = 1
    """seed of the experiment (data order, sampling, dropout)"""
    run_name: str | None = None
    """folder name under `output_dir`; default `<exp_name>__<seed>__<unix time>`. Give it to `--resume`"""
    output_dir: str = "runs"
    """where run folders (args, metrics, checkpoints) are written"""
    resume: bool = False
    """continue `runs/<run_name>` from its last checkpoint, with the same schedule"""
    track: bool = False
    """log to Weights & Biases as well"""
    wandb_project: str = "multiturn-rlhf"
    """wandb project"""
    wandb_entity: str | None = None
    """wandb entity (team)"""
    verbose: bool = False
    """show third-party warnings (vLLM, transformers) on the console"""
    preset: str | None = None
    """start from the paper's configuration (`PRESETS`: rebel-ultrafeedback); flags given with it override it"""

    # models
    model: str = utils.EMBEDDED_SMOLLM2
    """policy: a hub id, a local folder, or the embedded SmolLM2-135M-Instruct (paper: Llama-3-8B-Instruct)"""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """`auto`: CUDA when a GPU is visible, else the CPU; under torchrun with a CUDA build of torch that sees no GPU,
    `auto` stops instead of training on the CPU (pass `cpu` to mean it)"""
    collective_timeout_minutes: float = 180
    """how long a collective waits for the slowest rank; ranks leave a long rollout far apart (torch's default,
    30 minutes, is shorter than a setting-one rollout's spread)"""
    bf16: bool | None = None
    """bf16 forward/backward with fp32 master weights; default: on with a GPU"""
    rollout_backend: Literal["auto", "vllm", "transformers"] = "auto"
    """`auto`: vLLM if installed, else transformers `generate`"""
    engine_memory_share: float | None = None
    """vLLM's `gpu_memory_utilization`: the fraction of the device's memory the engine may use (on CPU: of the NUMA
    node's); default: on a GPU with `--engine_sleep`, what the memory plan's rollout phase leaves the engine of 90%
    of the device, else 0.3 (docs/scale.md)"""
    kv_cache_gib: float | None = None
    """vLLM KV cache per rank, in GiB; default: on a GPU what `engine_memory_share` leaves after the weights,
    on a CPU 0.25"""
    sync_tolerance: float | None = None
    """largest mean |trainer - engine| log-prob gap (nats per token of the probe's fixed answer) accepted after a
    weight sync; default (None): by the engine's dtype, 1e-3 in fp32, 0.15 in bf16 (`engines.SYNC_TOLERANCE`)"""
    sync_bucket_mb: float = 512
    """largest bucket a weight sync gathers at once, in MiB of the engine's dtype"""
    gradient_checkpointing: bool | None = None
    """recompute each decoder layer's activations in the backward instead of keeping them; default: on with a GPU"""
    engine_sleep: bool | None = None
    """free the rollout engine's device memory while the trainer runs (vLLM sleep mode; the transformers backend
    moves its copy to the CPU) and wake it for the next weight sync; default: on with a GPU"""

    # data
    dataset: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "prompts.jsonl")
    """prompts: a .json/.jsonl/.parquet/.csv file, a saved dataset folder, or a hub id"""
    dataset_split: str = "train"
    """split, for hub datasets"""
    prompt_column: str = "prompt"
    """column with the first user message (a string) or a list of chat messages ending with a user turn"""
    max_prompt_tokens: int = 256
    """prompts longer than this (templated) are skipped and counted (paper: 1024 for chat)"""
    num_eval_prompts: int = 16
    """prompts held out from training for evaluation (answered at the training temperature, fixed seeds)"""

    # reward
    reward_model: str | None = None
    """a sequence-classification reward model (e.g. sfairXC/FsfairX-LLaMA3-RM-v0.1); unset: `reward_function`"""
    reward_function: str = "tasks.chat:brevity_reward"
    """`module:function` or `file.py:function` scoring a dialogue (list of messages) with a float"""
    trust_remote_code: bool = False
    """allow the reward model's own code (needed by ArmoRM)"""
    reward_max_length: int = 2048
    """reward-model input is cut to its last this-many tokens"""
    kl_coef: float = 0.05
    """R = score - kl_coef * sum over response tokens of (log pi_t - log pi_ref) (paper: 0.05)"""
    penalty_reward: float | None = -1.0
    """score given to a response that hits `max_new_tokens` without ending (paper: -1 TL;DR, -4 chat);
    None keeps its score"""

    # REBEL
    eta: float = 1.0
    """regression scale: the log-ratio difference is regressed onto eta * reward difference (paper: 1.0)"""
    temperature: float = 0.7
    """sampling temperature; log-probs are taken from logits / temperature too (paper: 0.7 TL;DR, 0.5 chat)"""
    max_new_tokens: int = 32
    """response length cap (paper: 53 TL;DR, 1024 chat)"""
    num_iterations: int = 8
    """iterations; each samples a fresh batch from the current policy and trains on it"""
    pairs_per_rank: int = 4
    """prompts per iteration per rank, each answered twice: one pair (paper chat: 4 per GPU with grad
    accumulation)"""
    num_epochs: int = 2
    """passes over each batch (paper: 4; 2 keeps the CPU default run to a few minutes)"""
    minibatch_pairs: int = 4
    """pairs per optimizer step per rank (paper: all of an iteration's pairs, one step per pass)"""
    micro_batch_pairs: int = 4
    """pairs per forward/backward; gradients accumulate over a minibatch"""
    lr: float = 1e-5
    """learning rate (paper: 3e-6 TL;DR, 1e-7 chat)"""
    lr_schedule: Literal["linear", "cosine"] = "linear"
    """linear decay to 0 (paper's online REBEL) or cosine"""
    warmup_ratio: float = 0.0
    """fraction of optimizer steps with linear warmup"""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas (official REBEL code: torch's default 0.9, 0.999; the REFUEL runs use 0.9, 0.95)"""
    adam_eps: float = 1e-5
    """AdamW epsilon (paper: 1e-5 TL;DR, 1e-8 chat)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    token_budget: int | None = None
    """stop after the iteration in which the generated tokens (all ranks) reach this many, so that methods can be
    compared at equal generation cost"""
    schedule_over: Literal["iterations", "token_budget"] = "iterations"
    """what the LR schedule spans: the run's optimizer steps (`--num_iterations`), or `--token_budget`: each step's
    LR is the schedule at the share of the budget spent (utils.BudgetSchedule), so that methods whose iterations
    cost different numbers of tokens all decay, by one rule, to the end of the same budget"""

    # bookkeeping
    eval_every: int = 4
    """evaluate on the held-out prompts every this many iterations (and before the first and after the last)"""
    save_every: int = 4
    """checkpoint every this many iterations (and at the last)"""


PRESETS = {
    # the official src/ultrafeedback/rebel.py run (README): Llama-3-8B-Instruct, FsfairX reward, 8 GPUs
    "rebel-ultrafeedback": dict(
        model="meta-llama/Meta-Llama-3-8B-Instruct", reward_model="sfairXC/FsfairX-LLaMA3-RM-v0.1",
        dataset="HuggingFaceH4/ultrafeedback_binarized", dataset_split="train_prefs", prompt_column="prompt",
        lr=1e-7, adam_eps=1e-8, eta=1.0, temperature=0.5, max_new_tokens=1024, max_prompt_tokens=1024,
        kl_coef=0.05, penalty_reward=-4.0, pairs_per_rank=4, minibatch_pairs=4, num_epochs=4, num_iterations=2000),
}
"""The paper's run as flag values: `--preset NAME`, then any flag to override one of them."""


def rebel_loss(new_lp: torch.Tensor, old_lp: torch.Tensor, rewards: torch.Tensor, eta: float) -> torch.Tensor:
    """REBEL's squared regression loss of each pair: tensors [pairs, 2] in (y in column 0, y' in column 1), the
    squared residual [pairs] out; the loop weights and averages it."""
    log_ratio = new_lp - old_lp
    return ((log_ratio[:, 0] - log_ratio[:, 1]) - eta * (rewards[:, 0] - rewards[:, 1])) ** 2


def check_args(args: Args) -> None:
    """Flags that cannot work are refused before anything loads."""
    problems = [message for bad, message in [
        (args.temperature <= 0, "--temperature must be > 0: log-probs divide the logits by it"),
        (args.eta <= 0, "--eta must be > 0: it scales the rewards the log-ratios regress onto"),
        (args.kl_coef < 0, "--kl_coef must be >= 0: a negative penalty would reward drifting from the reference"),
        (args.lr <= 0, "--lr must be > 0"),
        (not 0 <= args.warmup_ratio <= 1, "--warmup_ratio must be in [0, 1]"),
        (args.weight_decay < 0, "--weight_decay must be >= 0"),
        (args.max_grad_norm <= 0, "--max_grad_norm must be > 0: gradients are clipped to this norm"),
        (min(args.pairs_per_rank, args.minibatch_pairs, args.micro_batch_pairs, args.num_epochs,
             args.num_iterations) < 1,
         "--pairs_per_rank, --minibatch_pairs, --micro_batch_pairs, --num_epochs and --num_iterations must be at "
         "least 1"),
        (args.schedule_over == "token_budget" and args.token_budget is None,
         "--schedule_over token_budget needs --token_budget"),
        (args.resume and args.run_name is None, "--resume needs --run_name of the run to continue"),
    ] if bad]
    if problems:
        raise SystemExit("\n".join(problems))
    if args.reward_model is None:
        tasks.import_function(args.reward_function)  # a reward that cannot be imported fails before the models load


def prompt_indices(num_prompts: int, iteration: int, per_iteration: int, seed: int) -> np.ndarray:
    """The prompts of one iteration across all ranks: consecutive slices of per-epoch permutations.

    A pure function of the update number, so the data order survives a resume without saved state.
    """
    start = (iteration - 1) * per_iteration
    out = []
    for position in range(start, start + per_iteration):
        epoch, offset = divmod(position, num_prompts)
        out.append(np.random.default_rng([seed, epoch]).permutation(num_prompts)[offset])
    return np.array(out)


if __name__ == "__main__":
    args = utils.parse_args(Args, PRESETS)
    check_args(args)
    utils.quiet_third_party(args.verbose)

    # TRY NOT TO MODIFY: processes, run folder, seeding
    rank, world_size, device = utils.init_distributed(args.device, args.collective_timeout_minutes)
    utils.device_defaults(args, device)
    environment = utils.environment(device, world_size, args.bf16)
    utils.print0(utils.environment_line(environment))
    run_name = args.run_name or utils.broadcast_object(f"{args.exp_name}__{args.seed}__{int(time.time())}")
    run_dir = utils.prepare_run_dir(args.output_dir, run_name, args, args.resume, environment)
    utils.seed_everything(args.seed + rank)
    dtype = torch.bfloat16 if args.bf16 else torch.float32

    policy_path = utils.resolve_model_path(args.model)
    max_model_len = args.max_prompt_tokens + args.max_new_tokens  # the rollout engine's context: prompt and answer
    positions = dialogues.model_positions(policy_path)
    if positions is not None and max_model_len > positions:
        raise SystemExit(f"--max_prompt_tokens {args.max_prompt_tokens:,} + --max_new_tokens {args.max_new_tokens:,} "
                         f"= {max_model_len:,} tokens is longer than the {positions:,} positions of {policy_path} "
                         "(max_position_embeddings): lower them")
    tokenizer = utils.load_tokenizer(policy_path)
    # data (before the models, so that bad data fails fast): prompts that fit, minus a held-out evaluation set
    try:
        chats, skipped = dialogues.load_prompts(args.dataset, args.prompt_column, args.dataset_split)
    except ValueError as e:  # a missing file, no such column, no usable row: one line, not a traceback
        raise SystemExit(str(e))
    # a recorded dialogue is answered after its last user message (a transcript's final answer is dropped)
    chats = [d[: max(i for i, m in enumerate(d) if m["role"] == "user") + 1] for d in chats]
    prompts = [utils.chat_token_ids(tokenizer, d, add_generation_prompt=True) for d in chats]
    keep = [i for i, p in enumerate(prompts) if len(p) <= args.max_prompt_tokens]
    skipped["too_long"] = len(prompts) - len(keep)
    chats, prompts = [chats[i] for i in keep], [prompts[i] for i in keep]
    if len(prompts) <= args.num_eval_prompts:
        raise SystemExit(f"{args.dataset}: {len(prompts)} usable prompts, fewer than num_eval_prompts + 1 "
                         f"(skipped: {skipped})")
    eval_dialogues, eval_prompts = chats[: args.num_eval_prompts], prompts[: args.num_eval_prompts]
    chats, prompts = chats[args.num_eval_prompts :], prompts[args.num_eval_prompts :]
    utils.print0(f"{len(prompts)} training prompts, {len(eval_prompts)} held out; skipped rows: {skipped}")

    # the memory plan of this rank, checked against the device before anything large is loaded
    kv_cache_bytes = None if args.kv_cache_gib is None else int(args.kv_cache_gib * 2**30)
    plan = memory_plan.plan_and_check(
        model_path=policy_path, device=device, world_size=world_size, bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing, kv_cache_bytes=kv_cache_bytes,
        sync_bucket_mb=args.sync_bucket_mb, rows=2 * args.micro_batch_pairs,
        sequence_tokens=max(map(len, prompts)) + args.max_new_tokens, response_tokens=args.max_new_tokens,
        reference=args.kl_coef > 0, engine_memory_share=args.engine_memory_share, engine_sleep=args.engine_sleep,
        max_model_len=max_model_len, reward_model=args.reward_model, trust_remote_code=args.trust_remote_code)

    # models: the policy and the frozen reference, both sharded with FSDP2 as they load
    policy = checkpoints.load_sharded_causal_lm(policy_path, device, bf16=args.bf16,
                                                gradient_checkpointing=args.gradient_checkpointing)
    reference = None
    if args.kl_coef > 0:
        reference = checkpoints.load_sharded_causal_lm(policy_path, device, bf16=args.bf16)
        reference.requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=args.adam_betas, eps=args.adam_eps,
                                  weight_decay=args.weight_decay)
    steps_per_iteration = args.num_epochs * -(-args.pairs_per_rank // args.minibatch_pairs)
    if args.schedule_over == "token_budget":
        scheduler = utils.BudgetSchedule(optimizer, args.lr_schedule, args.warmup_ratio, args.token_budget)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, utils.lr_lambda(
            args.lr_schedule, args.num_iterations * steps_per_iteration, args.warmup_ratio))

    # reward: a reward model, or a function written in code
    if args.reward_model is not None:
        score_dialogues = dialogues.RewardModel(args.reward_model, device, dtype, args.reward_max_length,
                                                args.trust_remote_code)
    else:
        reward_function = tasks.import_function(args.reward_function)
        score_dialogues = lambda ds: [float(reward_function(d)) for d in ds]  # noqa: E731

    # rollout engine, colocated on this rank; a fixed probe sequence checks every weight sync
    engine = engines.make_engine(policy_path, device, max_model_len=max_model_len,
                                 seed=args.seed, bf16=args.bf16, gpu_memory_utilization=plan.engine_memory_share,
                                 kv_cache_memory_bytes=kv_cache_bytes, backend=args.rollout_backend,
                                 sleep_mode=args.engine_sleep)
    probe_ids, probe_answer_start = engines.probe_sequence(tokenizer, prompts[0], max_model_len)

    def evaluate() -> list[list[float]]:
        """Scores of this rank's share of the held-out prompts, answered at the training temperature with seeds
        fixed per prompt (as the multi-turn scripts' `dialogues.evaluate_by_turn`, so evaluations of two policies
        are paired); one turn, hence [[...]] and `eval/score_turn1`."""
        mine = list(range(rank, len(eval_prompts), world_size))
        seeds = [utils.sample_seed(args.seed, "eval", i) for i in mine]
        outs = engine.generate([eval_prompts[i] for i in mine], args.max_new_tokens, args.temperature, seeds)
        scores = score_dialogues([eval_dialogues[i] + [{"role": "assistant", "content": o.text}]
                                  for i, o in zip(mine, outs)])
        if args.penalty_reward is not None:
            scores = [s if o.finished else args.penalty_reward for s, o in zip(scores, outs)]
        return [scores]

    logger = utils.MetricsLogger(run_dir, config=utils.flat_args(args), track=args.track, project=args.wandb_project,
                                 entity=args.wandb_entity, run_name=run_name, resume=args.resume)
    checkpoint = checkpoints.latest_checkpoint(run_dir) if args.resume else None
    if checkpoint is not None:
        state = checkpoints.load_checkpoint(checkpoint, {"policy": (policy, optimizer)})
        scheduler.load_state_dict(state["scheduler"])
        initial_scores, spent = state["initial_scores"], state["spent"]
        start_iteration = state["iteration"] + 1
        logger.truncate_after(state["iteration"])
        engines.sync_weights(engine, policy, probe_ids, probe_answer_start, device, args.sync_tolerance,
                             args.sync_bucket_mb)
        utils.print0(f"resumed from {checkpoint}")
    else:
        if args.resume:
            utils.print0(f"--resume: no complete checkpoint in {run_dir}, starting from the beginning")
            logger.truncate_after(-1)
        start_iteration, spent = 1, {"policy_tokens": 0, "reward_calls": 0}
        engines.check_sync(engine, policy, probe_ids, probe_answer_start, device, args.sync_tolerance)
        initial_scores = evaluate()
        initial = dialogues.eval_metrics(initial_scores, initial_scores)
        logger.log({**initial, **{f"skipped/rows_{cause}": n for cause, n in skipped.items()}}, iteration=0)
        utils.print0(f"initial evaluation: reward {initial['eval/score_turn1']:.3f} on {len(eval_prompts)} "
                     "held-out prompts")

    started = time.time()
    for iteration in range(start_iteration, args.num_iterations + 1):
        timings = {}

        # 1. sample two responses per prompt from pi_t (this rank's slice of the iteration's prompts)
        t0 = time.time()
        indices = prompt_indices(len(prompts), iteration, world_size * args.pairs_per_rank, args.seed)
        indices = indices[rank * args.pairs_per_rank : (rank + 1) * args.pairs_per_rank]
        pair_prompts = [prompts[i] for i in indices for _ in range(2)]
        seeds = [utils.sample_seed(args.seed, iteration, rank, j) for j in range(len(pair_prompts))]
        completions = engine.generate(pair_prompts, args.max_new_tokens, args.temperature, seeds)
        if args.engine_sleep:  # its device memory goes to the trainer until the next weight sync wakes it
            engine.sleep()
        timings["rollout"] = time.time() - t0
        before = spent["policy_tokens"]
        spent["policy_tokens"] += sum(len(c.token_ids) for c in completions)
        spent["reward_calls"] += len(completions)
        if args.schedule_over == "token_budget":
            tokens = utils.sum_over_ranks({"before": before, "after": spent["policy_tokens"]})
            scheduler.start_iteration(tokens["before"], tokens["after"], steps_per_iteration)

        # 2. score: the reward of each response; a response that never ends gets the fixed penalty
        t0 = time.time()
        scores = torch.tensor(score_dialogues([
            chats[i] + [{"role": "assistant", "content": c.text}]
            for i, c in zip(np.repeat(indices, 2), completions)
        ]), dtype=torch.float32)
        finished = torch.tensor([c.finished for c in completions])
        if args.penalty_reward is not None:
            scores = torch.where(finished, scores, torch.full_like(scores, args.penalty_reward))
        timings["reward"] = time.time() - t0
        if utils.sum_over_ranks({"finite": torch.isfinite(scores).sum().item()})["finite"] == 0:
            raise SystemExit(f"iteration {iteration}: the reward is NaN for every response on every rank; "
                             "nothing to learn from (check the reward model or function)")

        # 3. log-probs under pi_t from the training forward (never from vLLM) and under the reference
        t0 = time.time()
        input_ids, attention_mask, response_mask = (
            t.to(device) for t in utils.batch_for_logprobs(pair_prompts, [c.token_ids for c in completions],
                                                           tokenizer.pad_token_id))
        chunk = 2 * args.micro_batch_pairs
        old_lp = utils.token_logprobs_in_chunks(policy, input_ids, attention_mask, response_mask,
                                                args.temperature, chunk).sum(-1)
        kl = torch.zeros_like(old_lp)
        if reference is not None:
            kl = old_lp - utils.token_logprobs_in_chunks(reference, input_ids, attention_mask, response_mask,
                                                         args.temperature, chunk).sum(-1)
        rewards = (scores - args.kl_coef * kl).view(-1, 2)
        # a NaN reward (a broken reward function or model) drops its pair from the loss, and so does a pair of
        # identical responses (no signal; it would only dilute the mean); both are counted in the logs
        finite = torch.isfinite(rewards).all(1)
        identical = torch.tensor([a.token_ids == b.token_ids for a, b in zip(completions[0::2], completions[1::2])])
        valid = finite & ~identical
        rewards = torch.nan_to_num(rewards, nan=0.0, posinf=0.0, neginf=0.0)
        old_lp = old_lp.view(-1, 2)
        timings["old_logprobs"] = time.time() - t0

        # 4. regress: num_epochs passes, one optimizer step per minibatch_pairs, micro-batches accumulate
        t0 = time.time()
        losses, residuals = [], []
        for epoch in range(args.num_epochs):
            # the shuffle has its own seed: vLLM draws from torch's global generator, so that one is not replayable
            shuffle = torch.Generator().manual_seed(utils.sample_seed(args.seed, iteration, rank, epoch))
            order = torch.randperm(args.pairs_per_rank, generator=shuffle)
            for mb_start in range(0, args.pairs_per_rank, args.minibatch_pairs):
                mb = order[mb_start : mb_start + args.minibatch_pairs]
                mb_weight = valid[mb].float().sum().clamp(min=1)
                for micro_start in range(0, len(mb), args.micro_batch_pairs):
                    pairs = mb[micro_start : micro_start + args.micro_batch_pairs]
                    rows = torch.stack([2 * pairs, 2 * pairs + 1], 1).flatten().to(device)
                    new_lp = utils.token_logprobs(policy, input_ids[rows], attention_mask[rows],
                                                  response_mask[rows], args.temperature).sum(-1).view(-1, 2)
                    per_pair = rebel_loss(new_lp, old_lp[pairs].to(device), rewards[pairs].to(device), args.eta)
                    weight = valid[pairs].float().to(device)
                    # the minibatch's weighted mean, a micro-batch at a time; a pair of weight 0 (a NaN reward,
                    # identical responses) adds nothing but still runs the forward, so every rank does the same
                    # collectives
                    ((weight * per_pair).sum() / mb_weight).backward()
                    losses.append(((weight * per_pair).sum() / weight.sum().clamp(min=1)).item())
                    residuals += per_pair.detach()[weight > 0].sqrt().tolist()
                grad_norm = utils.clip_grad_norm(policy, args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        timings["train"] = time.time() - t0

        # 5. push the new weights into this rank's engine, and check that they arrived
        t0 = time.time()
        sync_metrics = engines.sync_weights(engine, policy, probe_ids, probe_answer_start, device,
                                            args.sync_tolerance, args.sync_bucket_mb)
        timings["sync"] = time.time() - t0

        # TRY NOT TO MODIFY: record metrics (averaged over ranks), evaluate, checkpoint
        metrics = utils.mean_over_ranks({
            "reward/score": scores.tolist(), "reward/kl": kl.tolist(),
            "reward/total": rewards[valid].flatten().tolist(),
            "loss/rebel": losses, "loss/residual_abs": residuals,
            "policy/response_tokens": [float(len(c.token_ids)) for c in completions],
            "policy/finished": finished.float().tolist(), "policy/grad_norm": grad_norm,
            **{f"sync/{k}": v for k, v in sync_metrics.items()}, **{f"time/{k}": v for k, v in timings.items()},
        })
        metrics.update(utils.sum_over_ranks({"skipped/nan_reward_pairs": (~finite).sum().item(),
                                             "skipped/identical_pairs": identical.sum().item()}))
        metrics.update(utils.sum_over_ranks({f"budget/{k}": v for k, v in spent.items()}))
        metrics["budget/generated_tokens"] = metrics["budget/policy_tokens"]  # no simulated user in single-turn RLHF
        metrics["policy/lr"] = scheduler.get_last_lr()[0]
        over_budget = args.token_budget is not None and metrics["budget/generated_tokens"] >= args.token_budget
        last = iteration == args.num_iterations or over_budget
        if iteration % args.eval_every == 0 or last:
            metrics.update(dialogues.eval_metrics(evaluate(), initial_scores))
        logger.log(metrics, iteration=iteration)
        if "eval/score_turn1" in metrics and rank == 0:
            utils.plot_curves(logger.read(), os.path.join(run_dir, "curves.png"))
        budget_progress = None if args.token_budget is None else (metrics["budget/generated_tokens"], args.token_budget)
        utils.print0(utils.progress_line(iteration, args.num_iterations, started, start_iteration - 1,
                                         {"reward": metrics["reward/score"], "loss": metrics["loss/rebel"]}, timings,
                                         budget_progress))
        if iteration % args.save_every == 0 or last:
            checkpoints.save_checkpoint(run_dir, iteration, {"policy": (policy, optimizer)}, {
                "iteration": iteration, "scheduler": scheduler.state_dict(), "initial_scores": initial_scores,
                "spent": spent}, tokenizer, bucket_bytes=int(args.sync_bucket_mb * 2**20))
        if over_budget:
            utils.print0(f"token budget reached: {metrics['budget/generated_tokens']:.0f} >= {args.token_budget}")
            break

    # TRY NOT TO MODIFY: the summary
    if rank == 0:
        logged = logger.read()
        final = next(m for m in reversed(logged) if "eval/score_turn1" in m)
        rows = {name: [m["eval/score_turn1"]]
                for name, m in [("initial policy", logged[0]), (f"after iteration {final['iteration']}", final)]}
        utils.print0(f"\nevaluation reward on {len(eval_prompts)} held-out prompts\n{utils.score_table(rows)}\n"
                     f"win rate against the initial policy: {final['eval/winrate_vs_initial_turn1']:.3f}\n\n"
                     f"run folder: {run_dir} (metrics.jsonl, curves.png, checkpoints/)")
    logger.close()
    utils.shutdown(engine)
