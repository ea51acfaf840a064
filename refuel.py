"""REFUEL: REgressing the RElative FUturE for multi-turn RLHF (Gao et al. 2024, arXiv 2410.04612).

A dialogue is an MDP whose state s_h is the conversation up to user turn h and whose action y_h is a whole
assistant turn. Every iteration t freezes the current policy pi_t, plays dialogues with it and a simulated
user, and for each dialogue draws a turn h, answers s_h twice (y, y'), rolls both branches out to the
horizon with pi_t and the user, and regresses the *relative future*: the two branches share their past, so
the difference of their Monte-Carlo returns Q(s_h, y) - Q(s_h, y') is a difference of futures only,

    theta_{t+1} = argmin_theta  sum ( [ln pi(y|s_h)/pi_t(y|s_h) - ln pi(y'|s_h)/pi_t(y'|s_h)] - eta (Q(s_h,y) - Q(s_h,y')) )^2

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
import time
from typing import Annotated, Callable, Literal

# torch reads its C++ log level once, when first imported: without --verbose, keep its warnings (vLLM's "NUMA
# binding" line at every engine start) off the console
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "WARNING" if "--verbose" in sys.argv else "ERROR")

import numpy as np
import torch
import tyro

import checkpoints
import dialogues
import engines
import memory_plan
import utils
from tasks import TaskArgs, load_task, task_factory

@dataclasses.dataclass
class Args:
    # experiment
    exp_name: str = "refuel"
    """name of this experiment, part of the run name"""
    seed: int = 1
    """seed of the experiment (data order, horizons, sampling)"""
    run_name: str | None = None
    """folder name under `output_dir`; default `<exp_name>__<task>__<seed>__<unix time>`. Give it to `--resume`"""
    output_dir: str = "runs"
    """where run folders (args, metrics, checkpoints, curves) are written"""
    resume: bool = False
    """continue `runs/<run_name>` from its last complete checkpoint, with the same schedule"""
    track: bool = False
    """log to Weights & Biases as well"""
    wandb_project: str = "multiturn-rlhf"
    """wandb project"""
    wandb_entity: str | None = None
    """wandb entity (team)"""
    verbose: bool = False
    """show third-party warnings (vLLM, transformers) on the console"""
    preset: str | None = None
    """start from one of the paper's configurations (`PRESETS`: refuel-setting-one, refuel-setting-two-hh,
    refuel-setting-two-ultrainteract); flags given with it override its values"""

    # the task: openings, a simulated user, a reward, a horizon (flags of tasks.TaskArgs)
    task_args: Annotated[TaskArgs, tyro.conf.arg(name="")] = dataclasses.field(default_factory=TaskArgs)

    # models and engines
    model: str | None = None
    """policy: hub id or folder; default the task's own policy (the guessing game's warm start), else the
    embedded SmolLM2 (paper: Llama-3-8B-Instruct)"""
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
    """vLLM's `gpu_memory_utilization`: the fraction of the device's memory an engine may use (on CPU: of the NUMA
    node's); default: on a GPU with `--engine_sleep`, what the memory plan's rollout phase leaves the policy's engine
    of 90% of the device (an LLM user's engine takes 0.3), else 0.3 (docs/scale.md)"""
    kv_cache_gib: float | None = None
    """vLLM KV cache per engine and rank, in GiB; default: on a GPU what `engine_memory_share` leaves after the
    weights, on a CPU 0.25"""
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
    """passes over an iteration's pairs (paper: 1)"""
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
    token_budget: int | None = None
    """stop after the iteration in which the generated tokens (policy and user, all ranks) reach this many, so that
    REFUEL and the baselines (dpo_multiturn.py) can be compared at equal generation cost"""
    schedule_over: Literal["iterations", "token_budget"] = "iterations"
    """what the LR schedule spans: the run's optimizer steps (`--num_iterations`), or `--token_budget`: each step's
    LR is the schedule at the share of the budget spent (utils.BudgetSchedule), so that methods whose iterations
    cost different numbers of tokens all decay, by one rule, to the end of the same budget"""

    # bookkeeping
    eval_every: int = 2
    """evaluate every this many iterations (and before the first and after the last)"""
    save_every: int = 2
    """checkpoint every this many iterations (and after the last)"""


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


def refuel_loss(new_lp: torch.Tensor, old_lp: torch.Tensor, rewards: torch.Tensor, eta: float) -> torch.Tensor:
    """REFUEL's regression loss (paper Eq. 5; official `refuel.py`) of each pair: tensors [pairs, 2] for (y, y') at
    turn h in, the squared residual [pairs] out; the loop weights and averages it."""
    log_ratio = new_lp - old_lp
    return ((log_ratio[:, 0] - log_ratio[:, 1]) - eta * (rewards[:, 0] - rewards[:, 1])) ** 2


def branch_rewards(scores: torch.Tensor, turn_finished: torch.Tensor, old_lp: torch.Tensor,
                   ref_lp: torch.Tensor | None, identical: torch.Tensor, kl_coef: float,
                   penalty_reward: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rewards Q(s_h, y), Q(s_h, y') that the log-ratio difference is regressed onto, and each pair's weight.

    Tensors [pairs, 2]. Q is the score of the branch's finished dialogue (a single Monte-Carlo return), or
    `penalty_reward` when the turn-h response ran into the length cap without ending (official setting two), minus
    `kl_coef` times the turn-h log-ratio to the reference (official setting two's `kl` on the trained turn).
    A pair gets weight 0 when its two responses are identical (their difference carries no signal) or a Q is not
    finite (no information); its Q is then set to 0 so that no NaN reaches the loss.
    """
    if penalty_reward is not None:
        scores = torch.where(turn_finished, scores, torch.full_like(scores, penalty_reward))
    rewards = scores if ref_lp is None else scores - kl_coef * (old_lp - ref_lp)
    weights = (torch.isfinite(rewards).all(1) & ~identical).float()
    return torch.nan_to_num(rewards, nan=0.0, posinf=0.0, neginf=0.0), weights


def sample_horizons(rng: np.random.Generator, n: int, horizon: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """H' (assistant turns to play) and the branch turn h (0-indexed) for n dialogues.

    `paper` follows the official generate.py: H' - 1 ~ U{0..H-1}, h ~ U{0..H'-1}, so turn 1 is drawn 46% of
    the time for H = 5. `uniform` plays every dialogue to H and draws h uniformly.
    """
    if mode == "paper":
        lengths = rng.integers(0, horizon, n) + 1
        return lengths, rng.integers(0, lengths)
    return np.full(n, horizon), rng.integers(0, horizon, n)


def redraw_past_the_end(rng: np.random.Generator, turns_played: int) -> int:
    """The branch turn of a dialogue that ended before turn h (a dataset user that ran out, a task that finished):
    drawn again uniformly over the turns the dialogue has, as the official setting two draws h over the dialogue's
    real turns."""
    return int(rng.integers(0, max(turns_played, 1)))


def rollout_pairs(openings: list[dialogues.Episode], engine, *, tokenizer, user, horizons: list[int],
                  branch_turns: list[int], redraw: Callable[[int], int], max_tokens: int, temperature: float,
                  seed: tuple) -> tuple[list[dialogues.Episode], list[dialogues.Episode], list[int]]:
    """REFUEL's rollout in one pass: each opening is played to its horizon (dialogue A) and, at its branch turn h
    (0-indexed), a second answer to the same state s_h is drawn in the same engine call and played on beside it
    to the same horizon (branch B, sharing A's prefix through user turn h). Both advance turn by turn together and
    share every engine and user call (a branch redrawn below is the exception: it starts once its dialogue has
    ended). Returns A, B and the branch turns.

    A dialogue that ends before turn h (its user ended it) branches at `redraw(turns it had)` instead, from its
    prefix, as soon as it ends (REFUEL's official setting two draws h over a dialogue's real turns). Turns are
    sampled with seeds fixed by `(*seed, "A" or "B", i, turn)`: the dialogues are those of playing every A first
    and then every B from `A.prefix(h)`, token for token, with an engine whose samples do not depend on the batch.
    """
    a_side, b_side, turns = openings, [None] * len(openings), list(branch_turns)
    players = [(a, horizon, (*seed, "A", i)) for i, (a, horizon) in enumerate(zip(a_side, horizons))]
    while True:
        for i, a in enumerate(a_side):
            if b_side[i] is not None:  # branched already
                continue
            ended = a.done or a.turns >= horizons[i]
            if ended and a.turns <= turns[i]:  # A ended before answering s_h: h is drawn again over its turns
                turns[i] = redraw(a.turns)
            elif a.turns != turns[i]:  # A has not reached s_h yet
                continue
            # B answers the same state s_h as A's turn h, in the same engine call, and plays on beside it
            b_side[i] = a.prefix(turns[i])
            players.append((b_side[i], horizons[i], (*seed, "B", i)))
        if not dialogues.play_turn(players, engine, tokenizer, user, max_tokens, temperature):
            return a_side, b_side, turns


def pair_rows(pairs: torch.Tensor) -> torch.Tensor:
    """Row indices of the two branches of each pair in the [2 * pairs] batch (y at 2i, y' at 2i + 1)."""
    return torch.stack([2 * pairs, 2 * pairs + 1], 1).flatten()


def fresh(episode: dialogues.Episode) -> dialogues.Episode:
    return dialogues.Episode(copy.deepcopy(episode.messages), copy.deepcopy(episode.info))


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
        (args.pairs_per_rank < 2, "--pairs_per_rank must be at least 2: one pair to train on, one for val/*"),
        (min(args.minibatch_pairs, args.micro_batch_pairs, args.num_epochs, args.num_iterations) < 1,
         "--minibatch_pairs, --micro_batch_pairs, --num_epochs and --num_iterations must be at least 1"),
        (not 0 < args.val_fraction < 1, "--val_fraction must be in (0, 1)"),
        (args.schedule_over == "token_budget" and (args.token_budget is None or args.schedule_scope == "iteration"),
         "--schedule_over token_budget needs --token_budget, and --schedule_scope run"),
        (args.resume and args.run_name is None, "--resume needs --run_name of the run to continue"),
    ] if bad]
    if problems:
        raise SystemExit("\n".join(problems))
    task_factory(args.task_args.task)  # an unknown or unimportable task fails here, not after loading models


if __name__ == "__main__":
    args = utils.parse_args(Args, PRESETS)
    check_args(args)
    utils.quiet_third_party(args.verbose)

    # TRY NOT TO MODIFY: processes, run folder, seeding
    rank, world_size, device = utils.init_distributed(args.device, args.collective_timeout_minutes)
    utils.device_defaults(args, device)
    environment = utils.environment(device, world_size, args.bf16)
    utils.print0(utils.environment_line(environment))
    task_name = args.task_args.task.replace("/", "_").replace(":", "_")
    run_name = args.run_name or utils.broadcast_object(
        f"{args.exp_name}__{task_name}__{args.seed}__{int(time.time())}")
    run_dir = utils.prepare_run_dir(args.output_dir, run_name, args, args.resume, environment)
    utils.seed_everything(args.seed + rank)

    # the task: openings, a user, a reward, a horizon H; then the policy it is played with
    kv_cache_bytes = None if args.kv_cache_gib is None else int(args.kv_cache_gib * 2**30)
    try:
        task = load_task(args.task_args, seed=args.seed, rank=rank, device=device, bf16=args.bf16,
                         model=args.model, max_prompt_tokens=args.max_prompt_tokens,
                         max_new_tokens=args.max_new_tokens, max_context_tokens=args.max_context_tokens,
                         engine_memory_share=memory_plan.user_engine_share(args.engine_memory_share),
                         kv_cache_bytes=kv_cache_bytes, rollout_backend=args.rollout_backend)
    except ValueError as e:  # bad data or task flags (a missing file, no usable row): one line, not a traceback
        raise SystemExit(str(e))
    horizon = task.horizon
    policy_path = utils.resolve_model_path(args.model or task.policy or utils.EMBEDDED_SMOLLM2)
    tokenizer = utils.load_tokenizer(policy_path)
    task.train, too_long = dialogues.openings_that_fit(task.train, tokenizer, args.max_prompt_tokens)
    task.eval, too_long_eval = dialogues.openings_that_fit(task.eval, tokenizer, args.max_prompt_tokens)
    if not task.train or not task.eval:
        raise SystemExit(f"no training or no evaluation opening fits --max_prompt_tokens {args.max_prompt_tokens}")
    references = ", ".join(f"{name} {scores[-1]:.3f}" for name, scores in task.reference_scores.items())
    utils.print0(f"task {args.task_args.task}: {len(task.train)} training and {len(task.eval)} evaluation openings "
                 f"({too_long} and {too_long_eval} over --max_prompt_tokens, skipped), horizon {horizon}"
                 + (f"; reference scores at turn {horizon}: {references}" if references else ""))

    # the memory plan of this rank, checked against the device before anything large is loaded
    try:  # the task checked its own models already; a plug-in task's policy is checked here
        max_model_len = dialogues.context_window(
            policy_path, max_prompt_tokens=args.max_prompt_tokens, horizon=horizon, max_new_tokens=args.max_new_tokens,
            user_max_tokens=args.task_args.user_max_tokens, max_context_tokens=args.max_context_tokens)
    except ValueError as e:
        raise SystemExit(str(e))
    turn_tokens = args.max_new_tokens + args.task_args.user_max_tokens + dialogues.TEMPLATE_TOKENS_PER_TURN
    # a pair's rows are its state s_h (at most the longest opening and the turns before h) and one turn's answer
    longest_opening = max(len(utils.chat_token_ids(tokenizer, e.messages, True)) for e in task.train)
    plan = memory_plan.plan_and_check(
        model_path=policy_path, device=device, world_size=world_size, bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing, kv_cache_bytes=kv_cache_bytes,
        sync_bucket_mb=args.sync_bucket_mb, rows=2 * args.micro_batch_pairs,
        sequence_tokens=min(longest_opening + horizon * turn_tokens, max_model_len),
        response_tokens=args.max_new_tokens,
        reference=args.kl_coef > 0, engine_memory_share=args.engine_memory_share, engine_sleep=args.engine_sleep,
        max_model_len=max_model_len, reward_model=args.task_args.reward_model,
        trust_remote_code=args.task_args.trust_remote_code,
        user_model=utils.resolve_model_path(args.task_args.user_model or policy_path) if task.engines else None)

    # models: the policy and (with a KL term) the frozen reference, sharded with FSDP2 as they load
    policy = checkpoints.load_sharded_causal_lm(policy_path, device, bf16=args.bf16,
                                                gradient_checkpointing=args.gradient_checkpointing)
    reference = None
    if args.kl_coef > 0:
        reference = checkpoints.load_sharded_causal_lm(policy_path, device, bf16=args.bf16)
        reference.requires_grad_(False)
    num_val = min(max(1, int(args.val_fraction * args.pairs_per_rank)), args.pairs_per_rank - 1)
    num_train = args.pairs_per_rank - num_val
    steps_per_iteration = args.num_epochs * -(-num_train // args.minibatch_pairs)

    def make_optimizer() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR | utils.BudgetSchedule]:
        # FSDP2 leaves the root's parameters unsharded after a forward without backward (an evaluation, a sync
        # check): reshard so that the optimizer holds the sharded parameters the training steps update
        policy.reshard()
        optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=args.adam_betas, eps=args.adam_eps,
                                      weight_decay=args.weight_decay)
        if args.schedule_over == "token_budget":
            return optimizer, utils.BudgetSchedule(optimizer, args.lr_schedule, args.warmup_ratio, args.token_budget)
        steps = steps_per_iteration * (1 if args.schedule_scope == "iteration" else args.num_iterations)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(
            optimizer, utils.lr_lambda(args.lr_schedule, steps, args.warmup_ratio))

    optimizer, scheduler = make_optimizer()

    # the policy's rollout engine, colocated on this rank
    engine = engines.make_engine(policy_path, device, max_model_len=max_model_len, seed=args.seed, bf16=args.bf16,
                                 gpu_memory_utilization=plan.engine_memory_share, kv_cache_memory_bytes=kv_cache_bytes,
                                 backend=args.rollout_backend, sleep_mode=args.engine_sleep)
    probe_ids, probe_answer_start = engines.probe_sequence(
        tokenizer, utils.chat_token_ids(tokenizer, task.train[0].messages, True), max_model_len)

    def evaluate() -> list[list[float]]:
        return dialogues.evaluate_by_turn(task, engine, tokenizer=tokenizer, max_tokens=args.max_new_tokens,
                                          temperature=args.temperature, seed=args.seed, rank=rank,
                                          world_size=world_size)

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
        start_iteration, spent = 1, {"policy_tokens": 0, "user_tokens": 0, "reward_calls": 0}
        engines.check_sync(engine, policy, probe_ids, probe_answer_start, device, args.sync_tolerance)
        initial_scores = evaluate()
        initial = dialogues.eval_metrics(initial_scores, initial_scores)
        logger.log({**initial, **{f"reference/{name}_turn{t}": v for name, scores in task.reference_scores.items()
                                  for t, v in enumerate(scores, start=1)},
                    **{f"skipped/rows_{cause}": n for cause, n in task.skipped.items()},
                    "skipped/too_long_openings": too_long + too_long_eval}, iteration=0)
        utils.print0("initial evaluation, score by turn: "
                     + " ".join(f"{initial[f'eval/score_turn{t}']:.3f}" for t in range(1, horizon + 1)))

    started = time.time()
    for iteration in range(start_iteration, args.num_iterations + 1):
        timings = {}
        rng = np.random.default_rng([args.seed, iteration, rank])
        if args.schedule_scope == "iteration":
            optimizer, scheduler = make_optimizer()

        # 1. roll in with pi_t and the simulated user: dialogue A is played towards its horizon H'; at turn h it is
        # answered twice, and the second answer (branch B, sharing A's prefix through user turn h) plays on beside
        # A to H': both futures of s_h in one pass, every engine call holding both sides
        t0 = time.time()
        openings = [task.train[i] for i in rng.choice(len(task.train), args.pairs_per_rank)]
        lengths, drawn_turns = sample_horizons(rng, len(openings), horizon, args.horizon_sampling)
        a_side, b_side, branch_turns = rollout_pairs(
            [fresh(e) for e in openings], engine, tokenizer=tokenizer, user=task.user, horizons=lengths.tolist(),
            branch_turns=drawn_turns.tolist(), redraw=functools.partial(redraw_past_the_end, rng),
            max_tokens=args.max_new_tokens, temperature=args.temperature, seed=(args.seed, iteration, rank))
        redrawn = int((drawn_turns != branch_turns).sum())
        if args.engine_sleep:  # its device memory goes to the trainer until the next weight sync wakes it
            engine.sleep()
        timings["rollout"] = time.time() - t0
        before = spent["policy_tokens"] + spent["user_tokens"]
        for side, first_turns in ((a_side, [0] * len(a_side)), (b_side, branch_turns)):
            policy_tokens, user_tokens = dialogues.generated_tokens(side, tokenizer, first_turns)
            spent["policy_tokens"] += policy_tokens
            spent["user_tokens"] += user_tokens
        spent["reward_calls"] += len(a_side) + len(b_side)
        if args.schedule_over == "token_budget":
            tokens = utils.sum_over_ranks({"before": before, "after": spent["policy_tokens"] + spent["user_tokens"]})
            scheduler.start_iteration(tokens["before"], tokens["after"], steps_per_iteration)

        # 2. the Monte-Carlo returns' scores: the reward of each finished dialogue
        t0 = time.time()
        scores = torch.tensor([task.reward(a_side), task.reward(b_side)], dtype=torch.float32).T  # [pairs, 2]
        turn_finished = torch.tensor([[a.finished[h], b.finished[h]] for a, b, h in zip(a_side, b_side, branch_turns)])
        timings["reward"] = time.time() - t0

        # 3. log-probs of the two turn-h responses under pi_t (training forward) and the reference, then the rewards
        t0 = time.time()
        prompts = [a.prompts[h] for a, h in zip(a_side, branch_turns) for _ in range(2)]
        responses = [r for a, b, h in zip(a_side, b_side, branch_turns) for r in (a.responses[h], b.responses[h])]
        input_ids, attention_mask, response_mask = (
            t.to(device) for t in utils.batch_for_logprobs(prompts, responses, tokenizer.pad_token_id))
        chunk = 2 * args.micro_batch_pairs
        old_lp = utils.token_logprobs_in_chunks(policy, input_ids, attention_mask, response_mask, args.temperature,
                                                chunk).sum(-1).view(-1, 2)
        ref_lp = None if reference is None else utils.token_logprobs_in_chunks(
            reference, input_ids, attention_mask, response_mask, args.temperature, chunk).sum(-1).view(-1, 2)
        identical = torch.tensor([r0 == r1 for r0, r1 in zip(responses[0::2], responses[1::2])])
        rewards, weights = branch_rewards(scores, turn_finished, old_lp, ref_lp, identical, args.kl_coef,
                                          args.penalty_reward)
        timings["old_logprobs"] = time.time() - t0
        if utils.sum_over_ranks({"finite": torch.isfinite(scores).sum().item()})["finite"] == 0:
            raise SystemExit(f"iteration {iteration}: the reward is NaN for every dialogue on every rank; "
                             "nothing to learn from (check the reward model or function)")

        # 4. regress the relative future on the training pairs, in minibatches of accumulated micro-batches
        t0 = time.time()
        losses = []
        for epoch in range(args.num_epochs):
            # the shuffle has its own seed: vLLM draws from torch's global generator, so that one is not replayable
            shuffle = torch.Generator().manual_seed(utils.sample_seed(args.seed, iteration, rank, epoch))
            order = torch.randperm(num_train, generator=shuffle)
            for mb_start in range(0, num_train, args.minibatch_pairs):
                mb = order[mb_start : mb_start + args.minibatch_pairs]
                mb_weight = weights[mb].sum().clamp(min=1)
                for micro_start in range(0, len(mb), args.micro_batch_pairs):
                    pairs = mb[micro_start : micro_start + args.micro_batch_pairs]
                    rows = pair_rows(pairs).to(device)
                    new_lp = utils.token_logprobs(policy, input_ids[rows], attention_mask[rows], response_mask[rows],
                                                  args.temperature).sum(-1).view(-1, 2)
                    per_pair = refuel_loss(new_lp, old_lp[pairs].to(device), rewards[pairs].to(device), args.eta)
                    weight = weights[pairs].to(device)
                    # the minibatch's weighted mean, a micro-batch at a time; a pair of weight 0 (identical answers,
                    # a NaN reward) adds nothing but still runs the forward, so every rank does the same collectives
                    ((weight * per_pair).sum() / mb_weight).backward()
                    losses.append(((weight * per_pair).sum() / weight.sum().clamp(min=1)).item())
                grad_norm = utils.clip_grad_norm(policy, args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        timings["train"] = time.time() - t0

        # 5. the official code's regression diagnostics on the held-out pairs: loss, and how often the sign of
        # the log-ratio difference agrees with the sign of the reward difference
        val = torch.arange(num_train, args.pairs_per_rank)
        rows = pair_rows(val).to(device)
        new_lp = utils.token_logprobs_in_chunks(policy, input_ids[rows], attention_mask[rows], response_mask[rows],
                                                args.temperature, chunk).sum(-1).view(-1, 2)
        val_loss = (weights[val] * refuel_loss(new_lp, old_lp[val], rewards[val], args.eta)).sum() \
            / weights[val].sum().clamp(min=1)
        log_ratio = new_lp - old_lp[val]
        log_ratio_diff = log_ratio[:, 0] - log_ratio[:, 1]
        informative = (weights[val] > 0) & (rewards[val, 0] != rewards[val, 1])
        aligned = (torch.sign(log_ratio_diff) == torch.sign(rewards[val, 0] - rewards[val, 1]))[informative]

        # 6. push the new weights into this rank's engine, and check that they arrived
        t0 = time.time()
        sync_metrics = engines.sync_weights(engine, policy, probe_ids, probe_answer_start, device,
                                            args.sync_tolerance, args.sync_bucket_mb)
        timings["sync"] = time.time() - t0

        # TRY NOT TO MODIFY: record metrics (averaged over ranks), evaluate, checkpoint
        metrics = utils.mean_over_ranks({
            "reward/score": scores[:, 0].tolist(), "reward/total": rewards[weights > 0].flatten().tolist(),
            "loss/refuel": losses, "val/loss": val_loss.item(),
            "val/sign_align": aligned.float().tolist(), "policy/grad_norm": grad_norm,
            "data/horizon": lengths.tolist(), "data/branch_turn": [h + 1 for h in branch_turns],
            "data/turns_played": [e.turns for e in a_side],
            "data/turn_h_finished": turn_finished.float().flatten().tolist(),
            **{f"sync/{k}": v for k, v in sync_metrics.items()}, **{f"time/{k}": v for k, v in timings.items()},
            **({} if ref_lp is None else {"reward/kl": (old_lp - ref_lp).flatten().tolist()}),
        })
        metrics.update(utils.sum_over_ranks({
            "skipped/identical_pairs": identical.sum().item(),
            "skipped/context_full_dialogues": sum(e.context_full for e in a_side + b_side),
            "skipped/nan_reward_pairs": ((weights == 0) & ~identical).sum().item(),
            "data/branch_turn_redrawn": redrawn, **{f"budget/{k}": v for k, v in spent.items()}}))
        metrics["budget/generated_tokens"] = metrics["budget/policy_tokens"] + metrics["budget/user_tokens"]
        metrics["policy/lr"] = scheduler.get_last_lr()[0]
        over_budget = args.token_budget is not None and metrics["budget/generated_tokens"] >= args.token_budget
        last = iteration == args.num_iterations or over_budget
        if iteration % args.eval_every == 0 or last:
            metrics.update(dialogues.eval_metrics(evaluate(), initial_scores))
        logger.log(metrics, iteration=iteration)
        shown = {"reward": metrics["reward/score"], "loss": metrics["loss/refuel"],
                 "sign_align": metrics["val/sign_align"]}
        if f"eval/score_turn{horizon}" in metrics:
            shown[f"eval_turn{horizon}"] = metrics[f"eval/score_turn{horizon}"]
            if rank == 0:
                utils.plot_curves(logger.read(), os.path.join(run_dir, "curves.png"))
        budget_progress = None if args.token_budget is None else (metrics["budget/generated_tokens"], args.token_budget)
        utils.print0(utils.progress_line(iteration, args.num_iterations, started, start_iteration - 1, shown, timings,
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
        final = next(m for m in reversed(logged) if f"eval/score_turn{horizon}" in m)
        rows = {name: [m[f"eval/score_turn{t}"] for t in range(1, horizon + 1)]
                for name, m in [("initial policy", logged[0]), (f"after iteration {final['iteration']}", final)]}
        rows.update(task.reference_scores)
        utils.print0(f"\nscore by turn\n{utils.score_table(rows)}\n\n"
                     f"run folder: {run_dir} (metrics.jsonl, curves.png, checkpoints/)")
    logger.close()
    utils.shutdown(engine, *task.engines)
