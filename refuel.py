"""REFUEL: REgressing the RElative FUturE for multi-turn RLHF (Gao et al. 2024, arXiv 2410.04612).

A dialogue is an MDP whose state s_h is the conversation up to user turn h and whose action y_h is a whole
assistant turn. Every iteration t freezes the current policy pi_t, plays dialogues with it and a simulated
user, and for each dialogue draws a turn h, answers s_h twice (y, y'), rolls both branches out to the
horizon with pi_t and the user, and regresses the *relative future*: the two branches share their past, so
the difference of their Monte-Carlo returns Q(s_h, y) - Q(s_h, y') is a difference of futures only,

    theta_{t+1} = argmin_theta  sum ( [ln pi(y|s_h)/pi_t(y|s_h) - ln pi(y'|s_h)/pi_t(y'|s_h)]
                                      - eta (Q(s_h,y) - Q(s_h,y')) )^2

with the log-probs summed over the tokens of turn h only. Training on states drawn from pi_t itself
(on-policy every iteration) removes the covariate shift of training on a fixed dataset's earlier turns.

Run:
    python refuel.py                                  # guess-the-number task, warm-started tiny policy, CPU
    torchrun --nproc_per_node 2 refuel.py             # FSDP2 over 2 ranks, colocated vLLM engines
    python refuel.py --task chat                      # dataset prompts + SmolLM2 playing the user, brevity reward
    python refuel.py --task my_task.py:make_task      # your own task (tasks/__init__.py says what it returns)
    # the paper's runs are presets (PRESETS below; any flag after them still overrides). Setting one: 8 GPUs for
    # the policy, the 70B user on its own GPUs behind a vLLM server
    python -m vllm.entrypoints.openai.api_server --model meta-llama/Llama-3.1-70B-Instruct --tensor-parallel-size 4
    torchrun --nproc_per_node 8 refuel.py --preset refuel-setting-one --user_url http://<host>:8000
    torchrun --nproc_per_node 8 refuel.py --preset refuel-setting-two-hh
    torchrun --nproc_per_node 8 refuel.py --preset refuel-setting-two-ultrainteract
"""

import copy
import dataclasses
import functools
import os
import sys
from typing import Annotated, Callable, Literal

# torch reads its C++ log level once, on import: its warnings stay off the console unless --verbose
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "WARNING" if "--verbose" in sys.argv else "ERROR")

import numpy as np
import torch
import tyro

import checkpoints
import dialogues
import lifecycle
import utils
from lifecycle import LoraArgs, RunArgs
from tasks import TaskArgs, task_factory


@dataclasses.dataclass
class Args:
    # REFUEL
    horizon_sampling: Literal["paper", "uniform"] = "paper"
    """`paper`: H' ~ U{1..H}, then h ~ U{1..H'} (early turns over-sampled, official generate.py); `uniform`:
    H' = H, h ~ U{1..H}, which suits a task scored only at its end such as the guessing game (docs/refuel.md)"""
    eta: float = 5.0
    """the log-ratio difference is regressed onto eta * (Q - Q'); fit it to the reward's scale: 5 for the
    guessing task's 0/1 reward (paper: 1e3 with ArmoRM, whose differences are ~1e-2)"""
    temperature: float = 0.8
    """sampling temperature; log-probs are taken from logits / temperature too (paper: 0.8)"""
    max_new_tokens: int = 8
    """length cap of an assistant turn (paper: 1024)"""
    max_prompt_tokens: int = 1024
    """openings longer than this (templated), for training and evaluation, are skipped and counted"""
    max_context_tokens: int | None = None
    """the rollout engine's context: a dialogue whose next turn would not fit ends there (counted in
    `skipped/context_full_dialogues`); default the longest dialogue the length flags allow, max_prompt_tokens + H x
    (max_new_tokens + user_max_tokens + 64), which must fit the model's positions (setting one: 8,192, Llama-3-8B's
    and the official vLLM engines' context)"""
    kl_coef: float = 0.0
    """Q = score - kl_coef * sum over turn-h tokens of (log pi_t - log pi_ref) (setting one: 0; setting two: 0.05
    on HH, 0 on UltraInteract)"""
    penalty_reward: float | None = None
    """score when the turn-h response never ends (setting two: -10 HH, -4 UltraInteract); None: no penalty"""
    num_iterations: int = 8
    """iterations; each plays fresh dialogues with the current policy (paper: 2, with 64k dialogues each)"""
    pairs_per_rank: int = 512
    """dialogues per iteration per rank, each giving one pair (its turn-h answer and its branch's); the guessing
    task's one-bit reward needs hundreds"""
    num_epochs: int = 1
    """passes over an iteration's pairs (paper: 1 in setting one; the official setting-two runs take 4)"""
    minibatch_pairs: int = 64
    """pairs per optimizer step per rank (paper: 128 over 8 GPUs)"""
    micro_batch_pairs: int = 16
    """pairs per forward/backward; gradients accumulate over a minibatch"""
    val_fraction: float = 0.125
    """share of each iteration's pairs held out for `val/loss` and `val/sign_align` (official code: 500 pairs)"""
    lr: float = 5e-4
    """learning rate (paper: 3e-7 for Llama-3-8B)"""
    lr_schedule: Literal["cosine", "linear"] = "cosine"
    """learning-rate decay after the warmup (setting one: cosine; setting two: linear)"""
    warmup_ratio: float = 0.1
    """linear warmup over this share of the schedule's optimizer steps (setting one: 0.1; setting two: 0)"""
    schedule_scope: Literal["run", "iteration"] = "run"
    """`run`: one AdamW state and one schedule over all iterations; `iteration`: a fresh AdamW state and a fresh
    schedule every iteration, as the official setting one, which trains each iteration as a new run from the
    previous policy"""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (paper: 0.9, 0.95)"""
    adam_eps: float = 1e-8
    """AdamW epsilon (paper: 1e-8)"""
    weight_decay: float = 1e-6
    """AdamW weight decay (paper: 1e-6)"""
    max_grad_norm: float = 1.0
    """gradient clipping"""

    # the policy, the task, the run
    model: str | None = None
    """policy: hub id or folder; default the task's own policy (the guessing game's warm start), else the
    embedded SmolLM2 (paper: Llama-3-8B-Instruct)"""
    task_args: Annotated[TaskArgs, tyro.conf.arg(name="")] = dataclasses.field(default_factory=TaskArgs)
    """the task: openings, a simulated user, a reward, a horizon (tasks.TaskArgs)"""
    run: Annotated[RunArgs, tyro.conf.arg(name="")] = dataclasses.field(
        default_factory=lambda: RunArgs(exp_name="refuel"))
    """seed, devices and engines, token budget, run folder, tracking (lifecycle.RunArgs)"""
    lora: Annotated[LoraArgs, tyro.conf.arg(name="")] = dataclasses.field(default_factory=LoraArgs)
    """full fine-tuning, or LoRA adapters on the frozen base: --lora_rank, ... (checkpoints.LoraArgs)"""


def refuel_loss(new_lp: torch.Tensor, old_lp: torch.Tensor, q: torch.Tensor, eta: float) -> torch.Tensor:
    """REFUEL's regression loss (paper Eq. 5; official `refuel.py`) of each pair: the log-probs of (y, y') at turn h
    under pi_theta and pi_t and their Q, tensors [pairs, 2], in; the squared residual [pairs] out."""
    log_ratio = new_lp - old_lp
    return ((log_ratio[:, 0] - log_ratio[:, 1]) - eta * (q[:, 0] - q[:, 1])) ** 2


def branch_q(scores: torch.Tensor, turn_finished: torch.Tensor, old_lp: torch.Tensor, ref_lp: torch.Tensor | None,
             identical: torch.Tensor, kl_coef: float,
             penalty_reward: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Q(s_h, y) and Q(s_h, y') of each pair, which the log-ratio difference is regressed onto, and its weight.

    Tensors [pairs, 2]. Q is the score of the branch's finished dialogue (a single Monte-Carlo return), or
    `penalty_reward` when the turn-h response ran into the length cap without ending (official setting two), minus
    `kl_coef` times the turn-h log-ratio to the reference (official setting two's `kl` on the trained turn).
    A pair gets weight 0 when its two responses are identical (their difference carries no signal) or a Q is not
    finite (no information); its Q is then set to 0 so that no NaN reaches the loss.
    """
    if penalty_reward is not None:
        scores = torch.where(turn_finished, scores, torch.full_like(scores, penalty_reward))
    q = scores if ref_lp is None else scores - kl_coef * (old_lp - ref_lp)
    weights = (torch.isfinite(q).all(1) & ~identical).float()
    return torch.nan_to_num(q, nan=0.0, posinf=0.0, neginf=0.0), weights


def sample_horizons(rng: np.random.Generator, n: int, horizon: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """H' (the assistant turns a dialogue is played to) and the branch turn h (0-indexed) for n dialogues.

    `paper` follows the official generate.py: H' - 1 ~ U{0..H-1}, h ~ U{0..H'-1}, so turn 1 is drawn 46% of
    the time for H = 5. `uniform` plays every dialogue to H and draws h uniformly.
    """
    if mode == "paper":
        h_prime = rng.integers(0, horizon, n) + 1
        return h_prime, rng.integers(0, h_prime)
    return np.full(n, horizon), rng.integers(0, horizon, n)


def redraw_past_the_end(rng: np.random.Generator, turns_played: int) -> int:
    """The branch turn of a dialogue that ended before turn h (a dataset user that ran out, a task that finished):
    drawn again uniformly over the turns the dialogue has, as the official setting two draws h over the dialogue's
    real turns."""
    return int(rng.integers(0, max(turns_played, 1)))


def rollout_pairs(openings: list[dialogues.Episode], engine, *, tokenizer, user, horizons: list[int],
                  branch_turns: list[int], redraw: Callable[[int], int], max_tokens: int, temperature: float,
                  seed: tuple) -> tuple[list[dialogues.Episode], list[dialogues.Episode], list[int]]:
    """REFUEL's rollout in one pass: each opening is played to its horizon H' (the dialogue that answers s_h with
    y) and, at its branch turn h (0-indexed), a second answer y' to the same state s_h is drawn in the same engine
    call and played on beside it to the same H' (the branch, sharing the dialogue's prefix through user turn h).
    Both advance turn by turn together and share every engine and user call (a branch redrawn below is the
    exception: it starts once its dialogue has ended). Returns the dialogues with y, those with y', and the turns h.

    A dialogue that ends before turn h (its user ended it) branches at `redraw(turns it had)` instead, from its
    prefix, as soon as it ends (REFUEL's official setting two draws h over a dialogue's real turns). Turns are
    sampled with seeds fixed by `(*seed, "A" for y or "B" for y', i, turn)`: the dialogues are those of playing
    every y dialogue first and then every branch from its prefix, token for token, with an engine whose samples do
    not depend on the batch.
    """
    with_y, with_y_prime, turns = openings, [None] * len(openings), list(branch_turns)
    players = [(d, horizon, (*seed, "A", i)) for i, (d, horizon) in enumerate(zip(with_y, horizons))]
    while True:
        for i, d in enumerate(with_y):
            if with_y_prime[i] is not None:  # branched already
                continue
            ended = d.done or d.turns >= horizons[i]
            if ended and d.turns <= turns[i]:  # it ended before answering s_h: h is drawn again over its turns
                turns[i] = redraw(d.turns)
            elif d.turns != turns[i]:  # it has not reached s_h yet
                continue
            # y' answers the same state s_h as y, in the same engine call, and plays on beside it
            with_y_prime[i] = d.prefix(turns[i])
            players.append((with_y_prime[i], horizons[i], (*seed, "B", i)))
        if not dialogues.play_turn(players, engine, tokenizer, user, max_tokens, temperature):
            return with_y, with_y_prime, turns


def pair_rows(pairs: torch.Tensor) -> torch.Tensor:
    """Row indices of each pair's two answers in the [2 * pairs] batch: y at 2i, y' at 2i + 1."""
    return torch.stack([2 * pairs, 2 * pairs + 1], 1).flatten()


LLAMA3_8B = "meta-llama/Meta-Llama-3-8B-Instruct"
SETTING_TWO = dict(  # official setting_two/*/refuel.py and its README: the dataset's own user turns, online
    model=LLAMA3_8B, user="dataset", reward_model="sfairXC/FsfairX-LLaMA3-RM-v0.1", eta=1.0, temperature=1.0,
    lr=3e-7, lr_schedule="linear", warmup_ratio=0.0, horizon_sampling="uniform", horizon=5, num_epochs=4,
    pairs_per_rank=4, minibatch_pairs=4, micro_batch_pairs=1, num_iterations=31_250, max_prompt_tokens=1024)
PRESETS = {
    # official setting_one (README, generate.py, refuel.py): 64k on-policy dialogues per iteration with the 70B
    # user, ArmoRM on the dialogue at H', 128 pairs per optimizer step on 8 GPUs, each iteration a fresh run
    "refuel-setting-one": dict(
        task="chat", model=LLAMA3_8B, user="server", user_model="meta-llama/Llama-3.1-70B-Instruct",
        reward_model="RLHFlow/ArmoRM-Llama3-8B-v0.1", trust_remote_code=True, dataset="openbmb/UltraInteract_pair",
        prompt_column="trajectory", eta=1e3, temperature=0.8, max_new_tokens=1024, user_max_tokens=1024,
        lr=3e-7, lr_schedule="cosine", warmup_ratio=0.1, schedule_scope="iteration", horizon_sampling="paper",
        horizon=5, num_iterations=2, pairs_per_rank=8000, minibatch_pairs=16, micro_batch_pairs=1,
        val_fraction=500 / 64_000, max_context_tokens=8192),
    "refuel-setting-two-hh": dict(
        task="chat", dataset="trl-internal-testing/hh-rlhf-trl-style", prompt_column="chosen", kl_coef=0.05,
        penalty_reward=-10.0, max_new_tokens=512, **SETTING_TWO),
    "refuel-setting-two-ultrainteract": dict(
        task="chat", dataset="openbmb/UltraInteract_pair", prompt_column="trajectory", kl_coef=0.0,
        penalty_reward=-4.0, max_new_tokens=1024, **SETTING_TWO),
}
"""The paper's runs as flag values: `--preset NAME`, then any flag to override one of them."""


def check_args(args: Args) -> None:
    """Flags that cannot work are refused before anything loads."""
    problems = [message for bad, message in [
        (args.temperature <= 0, "--temperature must be > 0: log-probs divide the logits by it"),
        (args.eta <= 0, "--eta must be > 0: it scales the Q differences the log-ratios regress onto"),
        (args.kl_coef < 0, "--kl_coef must be >= 0: a negative penalty would reward drifting from the reference"),
        (args.lr <= 0, "--lr must be > 0"),
        (not 0 <= args.warmup_ratio <= 1, "--warmup_ratio must be in [0, 1]"),
        (args.weight_decay < 0, "--weight_decay must be >= 0"),
        (args.max_grad_norm <= 0, "--max_grad_norm must be > 0: gradients are clipped to this norm"),
        (args.pairs_per_rank < 2, "--pairs_per_rank must be at least 2: one pair to train on, one for val/*"),
        (min(args.minibatch_pairs, args.micro_batch_pairs, args.num_epochs, args.num_iterations) < 1,
         "--minibatch_pairs, --micro_batch_pairs, --num_epochs and --num_iterations must be at least 1"),
        (not 0 < args.val_fraction < 1, "--val_fraction must be in (0, 1)"),
        (args.run.schedule_over == "token_budget" and args.schedule_scope == "iteration",
         "--schedule_over token_budget needs --schedule_scope run"),
    ] if bad]
    if problems:
        raise SystemExit("\n".join(problems))
    lifecycle.check_run_args(args.run, args.lora)
    task_factory(args.task_args.task)  # an unknown or unimportable task fails here, not after loading models


if __name__ == "__main__":
    args = lifecycle.parse_args(Args, PRESETS)
    check_args(args)
    run = lifecycle.start_run(args)  # processes, device, run folder, seeds
    device, seed, rank = run.device, args.run.seed, run.rank
    task, tokenizer = run.load_task()  # the openings, a user, a reward, a horizon H; the policy's tokenizer
    horizon = task.horizon
    # a pair's rows are its state s_h (at most the longest dialogue before turn h) and one turn's answer
    plan = run.check_memory(rows=2 * args.micro_batch_pairs, sequence_tokens=run.dialogue_tokens,
                            response_tokens=args.max_new_tokens, reference=args.kl_coef > 0)

    # models: the policy (with --lora_rank: adapters on its frozen base) and (with a KL term) the frozen reference,
    # sharded with FSDP2 as they load; with LoRA the reference is the policy with its adapters off, no second copy
    policy = checkpoints.load_sharded_causal_lm(run.policy_path, device, bf16=args.run.bf16, lora=args.lora,
                                                gradient_checkpointing=args.run.gradient_checkpointing)
    reference = checkpoints.load_reference(policy, run.policy_path, device, bf16=args.run.bf16) \
        if args.kl_coef > 0 else None
    num_val = min(max(1, int(args.val_fraction * args.pairs_per_rank)), args.pairs_per_rank - 1)
    num_train = args.pairs_per_rank - num_val
    steps_per_iteration = args.num_epochs * -(-num_train // args.minibatch_pairs)

    def make_optimizer() -> torch.optim.Optimizer:
        # FSDP2 leaves the root's parameters unsharded after a forward without backward (an evaluation, a sync
        # check): reshard so that the optimizer holds the sharded parameters the training steps update
        policy.reshard()
        return torch.optim.AdamW(utils.trainable(policy), lr=args.lr, betas=args.adam_betas, eps=args.adam_eps,
                                 weight_decay=args.weight_decay)

    schedule_steps = steps_per_iteration * (1 if args.schedule_scope == "iteration" else args.num_iterations)
    optimizer = make_optimizer()
    scheduler = lifecycle.lr_scheduler(optimizer, args.lr_schedule, args.warmup_ratio, schedule_steps, args.run)
    engine = run.start_engine(plan, tokenizer)  # pi_t's rollout engine, colocated on this rank
    run.resume_or_start({"policy": (policy, optimizer)}, {"policy": scheduler})

    for iteration in run.iterations():
        rng = np.random.default_rng([seed, iteration, rank])
        if args.schedule_scope == "iteration":  # a new optimizer and schedule each iteration
            optimizer = make_optimizer()
            scheduler = lifecycle.lr_scheduler(optimizer, args.lr_schedule, args.warmup_ratio, schedule_steps, args.run)

        # 1. roll in with pi_t and the simulated user: each dialogue is played towards its horizon H'; at turn h
        # the state s_h is answered twice, y and y', and the branch with y' (sharing the prefix through user turn h)
        # plays on beside it to H': both futures of s_h in one pass, every engine call holding both
        openings = [task.train[i] for i in rng.choice(len(task.train), args.pairs_per_rank)]
        h_prime, drawn_turns = sample_horizons(rng, len(openings), horizon, args.horizon_sampling)
        with_y, with_y_prime, branch_turns = rollout_pairs(
            [copy.deepcopy(e) for e in openings], engine, tokenizer=tokenizer, user=task.user,
            horizons=h_prime.tolist(), branch_turns=drawn_turns.tolist(),
            redraw=functools.partial(redraw_past_the_end, rng), max_tokens=args.max_new_tokens,
            temperature=args.temperature, seed=(seed, iteration, rank))
        if args.run.engine_sleep:  # its device memory goes to the trainer until the next weight sync wakes it
            engine.sleep()
        run.lap("rollout")
        # the budget charges the pairs trained on; the held-out ones (phase 5) are free, like every evaluation
        run.count_generated(with_y[:num_train], [0] * num_train)
        run.count_generated(with_y_prime[:num_train], branch_turns[:num_train])  # the branches from turn h on
        run.spent["reward_calls"] += 2 * num_train
        if args.run.schedule_over == "token_budget":
            scheduler.start_iteration(*run.tokens_this_iteration(), steps_per_iteration)

        # 2. the Monte-Carlo returns' scores: the reward of each finished dialogue
        scores = torch.tensor([task.reward(with_y), task.reward(with_y_prime)], dtype=torch.float32).T  # [pairs, 2]
        turn_finished = torch.tensor([[d.finished[h], d_.finished[h]]
                                      for d, d_, h in zip(with_y, with_y_prime, branch_turns)])
        run.lap("reward")
        if utils.sum_over_ranks({"finite": torch.isfinite(scores).sum().item()})["finite"] == 0:
            raise SystemExit(f"iteration {iteration}: the reward is NaN for every dialogue on every rank; "
                             "nothing to learn from (check the reward model or function)")

        # 3. log-probs of y and y' at s_h under pi_t (training forward) and the reference, then their Q
        states = [d.prompts[h] for d, h in zip(with_y, branch_turns) for _ in range(2)]
        answers = [a for d, d_, h in zip(with_y, with_y_prime, branch_turns) for a in (d.responses[h], d_.responses[h])]
        input_ids, attention_mask, response_mask = (
            t.to(device) for t in utils.batch_for_logprobs(states, answers, tokenizer.pad_token_id))
        chunk = 2 * args.micro_batch_pairs
        old_lp = utils.token_logprobs_in_chunks(policy, input_ids, attention_mask, response_mask, args.temperature,
                                                chunk).sum(-1).view(-1, 2)
        ref_lp = None if reference is None else utils.token_logprobs_in_chunks(
            reference, input_ids, attention_mask, response_mask, args.temperature, chunk).sum(-1).view(-1, 2)
        identical = torch.tensor([y == y_prime for y, y_prime in zip(answers[0::2], answers[1::2])])
        q, weights = branch_q(scores, turn_finished, old_lp, ref_lp, identical, args.kl_coef, args.penalty_reward)
        run.lap("old_logprobs")

        # 4. regress the relative future on the training pairs, in minibatches of accumulated micro-batches
        losses = []
        for epoch in range(args.num_epochs):
            # the shuffle has its own seed: vLLM draws from torch's global generator, so that one is not replayable
            shuffle = torch.Generator().manual_seed(utils.sample_seed(seed, iteration, rank, epoch))
            order = torch.randperm(num_train, generator=shuffle)
            for mb_start in range(0, num_train, args.minibatch_pairs):
                mb = order[mb_start : mb_start + args.minibatch_pairs]
                mb_weight = weights[mb].sum().clamp(min=1)
                for micro_start in range(0, len(mb), args.micro_batch_pairs):
                    pairs = mb[micro_start : micro_start + args.micro_batch_pairs]
                    rows = pair_rows(pairs).to(device)
                    new_lp = utils.token_logprobs(policy, input_ids[rows], attention_mask[rows], response_mask[rows],
                                                  args.temperature).sum(-1).view(-1, 2)
                    per_pair = refuel_loss(new_lp, old_lp[pairs].to(device), q[pairs].to(device), args.eta)
                    weight = weights[pairs].to(device)
                    # the minibatch's weighted mean, a micro-batch at a time; a pair of weight 0 (identical answers,
                    # a NaN reward) adds nothing but still runs the forward, so every rank does the same collectives
                    ((weight * per_pair).sum() / mb_weight).backward()
                    losses.append(((weight * per_pair).sum() / weight.sum().clamp(min=1)).item())
                grad_norm = utils.clip_grad_norm(policy, args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        run.lap("train")

        # 5. the official code's regression diagnostics on the held-out pairs: loss, and how often the sign of
        # the log-ratio difference agrees with the sign of the Q difference
        val = torch.arange(num_train, args.pairs_per_rank)
        rows = pair_rows(val).to(device)
        new_lp = utils.token_logprobs_in_chunks(policy, input_ids[rows], attention_mask[rows], response_mask[rows],
                                                args.temperature, chunk).sum(-1).view(-1, 2)
        val_loss = (weights[val] * refuel_loss(new_lp, old_lp[val], q[val], args.eta)).sum() \
            / weights[val].sum().clamp(min=1)
        log_ratio = new_lp - old_lp[val]
        informative = (weights[val] > 0) & (q[val, 0] != q[val, 1])
        aligned = (torch.sign(log_ratio[:, 0] - log_ratio[:, 1]) == torch.sign(q[val, 0] - q[val, 1]))[informative]
        run.lap("val")

        # 6. push the new weights into this rank's engine, and check that they arrived
        sync_metrics = run.sync_weights(policy)
        run.lap("sync")

        # record metrics (averaged over ranks; counts summed); the run adds the budget and the evaluation
        metrics = utils.mean_over_ranks({
            "reward/score": scores[:, 0].tolist(), "reward/total": q[weights > 0].flatten().tolist(),
            "loss/refuel": losses, "val/loss": val_loss.item(), "val/sign_align": aligned.float().tolist(),
            "policy/grad_norm": grad_norm, "data/horizon": h_prime.tolist(),
            "data/branch_turn": [h + 1 for h in branch_turns], "data/turns_played": [d.turns for d in with_y],
            "data/turn_h_finished": turn_finished.float().flatten().tolist(),
            **{f"sync/{k}": v for k, v in sync_metrics.items()},
            **({} if ref_lp is None else {"reward/kl": (old_lp - ref_lp).flatten().tolist()})})
        metrics.update(utils.sum_over_ranks({
            "skipped/identical_pairs": identical.sum().item(),
            "skipped/context_full_dialogues": sum(d.context_full for d in with_y + with_y_prime),
            "skipped/nan_reward_pairs": ((weights == 0) & ~identical).sum().item(),
            "data/branch_turn_redrawn": int((drawn_turns != branch_turns).sum())}))
        metrics["policy/lr"] = scheduler.get_last_lr()[0]
        run.end_iteration(iteration, metrics, {"reward": metrics["reward/score"], "loss": metrics["loss/refuel"],
                                               "sign_align": metrics["val/sign_align"]},
                          {"policy": (policy, optimizer)}, {"policy": scheduler})

    run.summary()
