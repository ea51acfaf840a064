"""REBEL: REinforcement learning via regressing relative rewards (Gao et al. 2024, arXiv 2404.16767).

Online, on-policy: every update samples two responses y, y' per prompt x from the current policy pi_t and
regresses the difference of their log-ratios onto the difference of their rewards,

    theta_{t+1} = argmin_theta  sum_{(x, y, y')} ( [ln pi(y|x)/pi_t(y|x) - ln pi(y'|x)/pi_t(y'|x)]
                                                   - eta (R(x,y) - R(x,y')) )^2

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
from typing import Annotated, Literal

# torch reads its C++ log level once, on import: its warnings stay off the console unless --verbose
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "WARNING" if "--verbose" in sys.argv else "ERROR")

import numpy as np
import torch
import tyro

import checkpoints
import dialogues
import lifecycle
import tasks
import utils
from lifecycle import LoraArgs, RunArgs


@dataclasses.dataclass
class Args:
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

    # the policy, the run
    model: str = utils.EMBEDDED_SMOLLM2
    """policy: a hub id, a local folder, or the embedded SmolLM2-135M-Instruct (paper: Llama-3-8B-Instruct)"""
    run: Annotated[RunArgs, tyro.conf.arg(name="")] = dataclasses.field(
        default_factory=lambda: RunArgs(exp_name="rebel", eval_every=4, save_every=4))
    """seed, devices and engines, token budget, run folder, tracking (lifecycle.RunArgs)"""
    lora: Annotated[LoraArgs, tyro.conf.arg(name="")] = dataclasses.field(default_factory=LoraArgs)
    """full fine-tuning, or LoRA adapters on the frozen base: --lora_rank, ... (checkpoints.LoraArgs)"""


def rebel_loss(new_lp: torch.Tensor, old_lp: torch.Tensor, rewards: torch.Tensor, eta: float) -> torch.Tensor:
    """REBEL's squared regression loss of each pair: tensors [pairs, 2] in (y in column 0, y' in column 1), the
    squared residual [pairs] out; the loop weights and averages it."""
    log_ratio = new_lp - old_lp
    return ((log_ratio[:, 0] - log_ratio[:, 1]) - eta * (rewards[:, 0] - rewards[:, 1])) ** 2


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


def load_prompt_split(args: Args, tokenizer) -> tuple[list, list, list, list, dict[str, int]]:
    """The dataset's prompts that fit `--max_prompt_tokens`, as chats and as templated token ids, the first
    `--num_eval_prompts` held out: (training chats, training prompts, held-out chats, held-out prompts, skipped rows
    by cause). A recorded dialogue is answered after its last user message (a transcript's final answer is dropped)."""
    try:
        chats, skipped = dialogues.load_prompts(args.dataset, args.prompt_column, args.dataset_split)
    except ValueError as e:  # a missing file, no such column, no usable row: one line, not a traceback
        raise SystemExit(str(e))
    chats = [d[: max(i for i, m in enumerate(d) if m["role"] == "user") + 1] for d in chats]
    prompts = [utils.chat_token_ids(tokenizer, d, add_generation_prompt=True) for d in chats]
    keep = [i for i, p in enumerate(prompts) if len(p) <= args.max_prompt_tokens]
    skipped["too_long"] = len(prompts) - len(keep)
    chats, prompts = [chats[i] for i in keep], [prompts[i] for i in keep]
    if len(prompts) <= args.num_eval_prompts:
        raise SystemExit(f"{args.dataset}: {len(prompts)} usable prompts, fewer than num_eval_prompts + 1 "
                         f"(skipped: {skipped})")
    n = args.num_eval_prompts
    utils.print0(f"{len(prompts) - n} training prompts, {n} held out; skipped rows: {skipped}")
    return chats[n:], prompts[n:], chats[:n], prompts[:n], skipped


PRESETS = {
    # the official src/ultrafeedback/rebel.py run (README): Llama-3-8B-Instruct, FsfairX reward, 8 GPUs
    "rebel-ultrafeedback": dict(
        model="meta-llama/Meta-Llama-3-8B-Instruct", reward_model="sfairXC/FsfairX-LLaMA3-RM-v0.1",
        dataset="HuggingFaceH4/ultrafeedback_binarized", dataset_split="train_prefs", prompt_column="prompt",
        lr=1e-7, adam_eps=1e-8, eta=1.0, temperature=0.5, max_new_tokens=1024, max_prompt_tokens=1024,
        kl_coef=0.05, penalty_reward=-4.0, pairs_per_rank=4, minibatch_pairs=4, num_epochs=4, num_iterations=2000),
}
"""The paper's run as flag values: `--preset NAME`, then any flag to override one of them."""


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
    ] if bad]
    if problems:
        raise SystemExit("\n".join(problems))
    lifecycle.check_run_args(args.run, args.lora)
    if args.reward_model is None:
        tasks.import_function(args.reward_function)  # a reward that cannot be imported fails before the models load


if __name__ == "__main__":
    args = lifecycle.parse_args(Args, PRESETS)
    check_args(args)
    run = lifecycle.start_run(args)  # processes, device, run folder, seeds
    device, seed, rank = run.device, args.run.seed, run.rank
    # the policy, its engine's context (a prompt and its answer), the prompts (before the models: bad data fails fast)
    tokenizer = run.use_policy(args.model, max_model_len=args.max_prompt_tokens + args.max_new_tokens)
    chats, prompts, eval_chats, eval_prompts, skipped = load_prompt_split(args, tokenizer)
    longest = max(map(len, prompts)) + args.max_new_tokens  # a pair's rows: a prompt and one answer
    plan = run.check_memory(rows=2 * args.micro_batch_pairs, sequence_tokens=longest,
                            response_tokens=args.max_new_tokens, reference=args.kl_coef > 0,
                            reward_model=args.reward_model, trust_remote_code=args.trust_remote_code)

    # models: the policy (with --lora_rank: adapters on its frozen base) and the frozen reference, sharded with
    # FSDP2 as they load; with LoRA the reference is the policy with its adapters off, no second copy
    policy = checkpoints.load_sharded_causal_lm(run.policy_path, device, bf16=args.run.bf16, lora=args.lora,
                                                gradient_checkpointing=args.run.gradient_checkpointing)
    reference = checkpoints.load_reference(policy, run.policy_path, device, bf16=args.run.bf16) \
        if args.kl_coef > 0 else None
    optimizer = torch.optim.AdamW(utils.trainable(policy), lr=args.lr, betas=args.adam_betas, eps=args.adam_eps,
                                  weight_decay=args.weight_decay)
    steps_per_iteration = args.num_epochs * -(-args.pairs_per_rank // args.minibatch_pairs)
    scheduler = lifecycle.lr_scheduler(optimizer, args.lr_schedule, args.warmup_ratio,
                                       args.num_iterations * steps_per_iteration, args.run)

    # reward: a reward model, or a function written in code
    if args.reward_model is not None:
        score_dialogues = dialogues.RewardModel(args.reward_model, device, torch.bfloat16 if args.run.bf16
                                                else torch.float32, args.reward_max_length, args.trust_remote_code)
    else:
        reward_function = tasks.import_function(args.reward_function)
        score_dialogues = lambda ds: [float(reward_function(d)) for d in ds]  # noqa: E731
    engine = run.start_engine(plan, tokenizer, probe_prompt=prompts[0])  # pi_t's rollout engine, on this rank

    def evaluate() -> list[list[float]]:
        """Scores of this rank's share of the held-out prompts, answered at the training temperature with seeds
        fixed per prompt (as the multi-turn scripts' `dialogues.evaluate_by_turn`, so evaluations of two policies
        are paired); one turn, hence [[...]] and `eval/score_turn1`."""
        mine = list(range(rank, len(eval_prompts), run.world_size))
        outs = engine.generate([eval_prompts[i] for i in mine], args.max_new_tokens, args.temperature,
                               [utils.sample_seed(seed, "eval", i) for i in mine])
        scores = score_dialogues([eval_chats[i] + [{"role": "assistant", "content": o.text}]
                                  for i, o in zip(mine, outs)])
        if args.penalty_reward is not None:
            scores = [s if o.finished else args.penalty_reward for s, o in zip(scores, outs)]
        return [scores]

    run.resume_or_start({"policy": (policy, optimizer)}, {"policy": scheduler}, evaluate=evaluate,
                        first_metrics={f"skipped/rows_{cause}": n for cause, n in skipped.items()})

    for iteration in run.iterations():
        # 1. sample two responses per prompt from pi_t (this rank's slice of the iteration's prompts)
        indices = prompt_indices(len(prompts), iteration, run.world_size * args.pairs_per_rank, seed)
        indices = indices[rank * args.pairs_per_rank : (rank + 1) * args.pairs_per_rank]
        pair_prompts = [prompts[i] for i in indices for _ in range(2)]
        seeds = [utils.sample_seed(seed, iteration, rank, j) for j in range(len(pair_prompts))]
        completions = engine.generate(pair_prompts, args.max_new_tokens, args.temperature, seeds)
        if args.run.engine_sleep:  # its device memory goes to the trainer until the next weight sync wakes it
            engine.sleep()
        run.lap("rollout")
        run.spent["policy_tokens"] += sum(len(c.token_ids) for c in completions)  # no simulated user: no user tokens
        run.spent["reward_calls"] += len(completions)
        if args.run.schedule_over == "token_budget":
            scheduler.start_iteration(*run.tokens_this_iteration(), steps_per_iteration)

        # 2. score: the reward of each response; a response that never ends gets the fixed penalty
        scores = torch.tensor(score_dialogues([
            chats[i] + [{"role": "assistant", "content": c.text}]
            for i, c in zip(np.repeat(indices, 2), completions)
        ]), dtype=torch.float32)
        finished = torch.tensor([c.finished for c in completions])
        if args.penalty_reward is not None:
            scores = torch.where(finished, scores, torch.full_like(scores, args.penalty_reward))
        run.lap("reward")
        if utils.sum_over_ranks({"finite": torch.isfinite(scores).sum().item()})["finite"] == 0:
            raise SystemExit(f"iteration {iteration}: the reward is NaN for every response on every rank; "
                             "nothing to learn from (check the reward model or function)")

        # 3. log-probs under pi_t from the training forward (never from vLLM) and under the reference
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
        run.lap("old_logprobs")

        # 4. regress: num_epochs passes, one optimizer step per minibatch_pairs, micro-batches accumulate
        losses, residuals = [], []
        for epoch in range(args.num_epochs):
            # the shuffle has its own seed: vLLM draws from torch's global generator, so that one is not replayable
            shuffle = torch.Generator().manual_seed(utils.sample_seed(seed, iteration, rank, epoch))
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
        run.lap("train")

        # 5. push the new weights into this rank's engine, and check that they arrived
        sync_metrics = run.sync_weights(policy)
        run.lap("sync")

        # record metrics (averaged over ranks; counts summed); the run adds the budget and the evaluation
        metrics = utils.mean_over_ranks({
            "reward/score": scores.tolist(), "reward/kl": kl.tolist(),
            "reward/total": rewards[valid].flatten().tolist(),
            "loss/rebel": losses, "loss/residual_abs": residuals,
            "policy/response_tokens": [float(len(c.token_ids)) for c in completions],
            "policy/finished": finished.float().tolist(), "policy/grad_norm": grad_norm,
            **{f"sync/{k}": v for k, v in sync_metrics.items()}})
        metrics.update(utils.sum_over_ranks({"skipped/nan_reward_pairs": (~finite).sum().item(),
                                             "skipped/identical_pairs": identical.sum().item()}))
        metrics["policy/lr"] = scheduler.get_last_lr()[0]
        run.end_iteration(iteration, metrics, {"reward": metrics["reward/score"], "loss": metrics["loss/rebel"]},
                          {"policy": (policy, optimizer)}, {"policy": scheduler})

    run.summary()
