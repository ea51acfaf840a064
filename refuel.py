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
    # the paper's setting one (8 GPUs for the policy; the 70B user on its own GPUs behind a vLLM server):
    python -m vllm.entrypoints.openai.api_server --model meta-llama/Llama-3.1-70B-Instruct --tensor-parallel-size 4
    torchrun --nproc_per_node 8 refuel.py --task chat --model meta-llama/Meta-Llama-3-8B-Instruct \\
        --user server --user_url http://<host>:8000 --user_model meta-llama/Llama-3.1-70B-Instruct \\
        --reward_model RLHFlow/ArmoRM-Llama3-8B-v0.1 --trust_remote_code --eta 1e3 \\
        --dataset openbmb/UltraInteract_pair --prompt_column trajectory --max_new_tokens 1024 \\
        --user_max_tokens 1024 --lr 3e-7 --dialogues_per_rank 64 --minibatch_pairs 16 --num_iterations 2
"""

import copy
import dataclasses
import json
import os
import time
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import tyro

import utils


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
    """where run folders (args, metrics, checkpoints) are written"""
    resume: bool = False
    """continue `runs/<run_name>` from its last checkpoint, with the same schedule"""
    track: bool = False
    """log to Weights & Biases as well"""
    wandb_project: str = "multiturn-rlhf"
    """wandb project"""
    wandb_entity: str | None = None
    """wandb entity (team)"""

    # task
    task: str = "guess_number"
    """`guess_number` (verifiable: code user and reward), `chat` (dataset prompts, a simulated user, a reward
    model or function), or `module:function` returning a `utils.Task` (called with these Args)"""
    horizon: int | None = None
    """largest number of assistant turns H; default the task's (guessing task: 3; chat: the paper's 5)"""
    guess_max: int = 7
    """the guessing task's secret is a number from 1 to this (1..7 in 3 turns: binary search solves every game)"""
    warm_start_steps: int = 800
    """supervised steps that teach the guessing task's tiny policy to play consistently (cached per game and
    value; 800 take about 6 minutes once on 2 cores and reach random consistent play)"""

    # models
    model: str | None = None
    """policy: hub id or folder; default the task's warm-started policy, else the embedded SmolLM2
    (paper: Llama-3-8B-Instruct)"""
    bf16: bool = torch.cuda.is_available()
    """bf16 forward/backward with fp32 master weights (on by default with a GPU)"""
    rollout_backend: Literal["auto", "vllm", "transformers"] = "auto"
    """`auto`: vLLM if installed, else transformers `generate`"""
    kv_cache_gib: float = 0.25
    """vLLM KV cache per engine and rank, in GiB"""
    sync_tolerance: float | None = None
    """largest trainer/vLLM log-prob gap accepted after a weight sync; default 1e-3 in fp32, 0.5 in bf16"""

    # the chat task
    dataset: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "prompts.jsonl")
    """first user turns: a .json/.jsonl/.parquet/.csv file, a saved dataset folder, or a hub id"""
    dataset_split: str = "train"
    """split, for hub datasets"""
    prompt_column: str = "prompt"
    """column with the first user message, or a list of messages (later user turns feed `--user dataset`)"""
    num_eval_prompts: int = 16
    """openings held out for evaluation"""
    user: Literal["llm", "server", "dataset"] = "llm"
    """who writes the user turns: an LLM through its own vLLM engine, an LLM behind a vLLM OpenAI-compatible
    server, or the dataset's own later user turns (the paper's setting two)"""
    user_model: str | None = None
    """the simulated user's model (for `server`, the served model's name); default: the policy's base model,
    frozen (paper: Llama-3.1-70B-Instruct)"""
    user_url: str | None = None
    """base URL of the user server, e.g. http://127.0.0.1:8000"""
    user_max_tokens: int = 128
    """length cap of a simulated user reply (paper: 1024)"""
    user_temperature: float = 0.8
    """sampling temperature of the simulated user (paper: 0.8)"""
    reward_model: str | None = None
    """a sequence-classification reward model scoring the whole dialogue (paper: RLHFlow/ArmoRM-Llama3-8B-v0.1);
    unset: `reward_function`"""
    reward_function: str = "utils:brevity_reward"
    """`module:function` or `file.py:function` scoring a dialogue (list of messages)"""
    trust_remote_code: bool = False
    """allow the reward model's own code (needed by ArmoRM)"""
    reward_max_length: int = 4096
    """reward-model input is cut to its last this-many tokens (paper: 4096)"""

    # REFUEL
    horizon_sampling: Literal["paper", "uniform"] = "paper"
    """`paper`: H' ~ U{1..H}, then h ~ U{1..H'} (early turns over-sampled); `uniform`: H' = H, h ~ U{1..H}, which
    suits a task scored only at its end such as the guessing game (0.94 instead of 0.78 there: docs/refuel.md)"""
    eta: float = 5.0
    """the log-ratio difference is regressed onto eta * (Q - Q'); fit it to the reward's scale: 5 for the
    guessing task's 0/1 reward (paper: 1e3 with ArmoRM, whose differences are ~1e-2)"""
    temperature: float = 0.8
    """sampling temperature; log-probs are taken from logits / temperature too (paper: 0.8)"""
    max_new_tokens: int = 8
    """length cap of an assistant turn (paper: 1024)"""
    max_prompt_tokens: int = 1024
    """openings longer than this (templated) are skipped and counted"""
    kl_coef: float = 0.0
    """Q = score - kl_coef * sum over turn-h tokens of (log pi_t - log pi_ref) (setting one: 0; two: 0.05)"""
    penalty_reward: float | None = None
    """score when the turn-h response never ends (setting two: -10 HH, -4 UltraInteract); None: no penalty"""
    num_iterations: int = 8
    """iterations; each plays fresh dialogues with the current policy (paper: 2, with 64k dialogues each)"""
    dialogues_per_rank: int = 512
    """dialogues (so pairs) per iteration per rank; the guessing task's one-bit reward needs hundreds"""
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
    warmup_ratio: float = 0.1
    """cosine schedule with linear warmup over this share of all optimizer steps (paper: 0.1)"""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (paper: 0.9, 0.95)"""
    adam_eps: float = 1e-8
    """AdamW epsilon (paper: 1e-8)"""
    weight_decay: float = 1e-6
    """AdamW weight decay (paper: 1e-6)"""
    max_grad_norm: float = 1.0
    """gradient clipping"""

    # bookkeeping
    eval_every: int = 2
    """evaluate every this many iterations (and before the first and after the last)"""
    save_every: int = 2
    """checkpoint every this many iterations (and after the last)"""


def refuel_loss(new_lp: torch.Tensor, old_lp: torch.Tensor, returns: torch.Tensor, eta: float,
                weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """REFUEL's regression loss (paper Eq. 5; official `refuel.py`), tensors [pairs, 2] for (y, y') at turn h.

    Returns the weighted mean loss and the per-pair residual. Pairs of weight 0 (identical responses, NaN
    rewards) add nothing but still run the forward, so every rank does the same FSDP collectives.
    """
    log_ratio = new_lp - old_lp
    residual = (log_ratio[:, 0] - log_ratio[:, 1]) - eta * (returns[:, 0] - returns[:, 1])
    return (weights * residual**2).sum() / weights.sum().clamp(min=1), residual


def sample_horizons(rng: np.random.Generator, n: int, horizon: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """H' (assistant turns to play) and the branch turn h (0-indexed) for n dialogues.

    `paper` follows the official generate.py: H' - 1 ~ U{0..H-1}, h ~ U{0..H'-1}, so turn 1 is drawn 46% of
    the time for H = 5. `uniform` plays every dialogue to H and draws h uniformly.
    """
    if mode == "paper":
        lengths = rng.integers(0, horizon, n) + 1
        return lengths, rng.integers(0, lengths)
    return np.full(n, horizon), rng.integers(0, horizon, n)


def pair_rows(pairs: torch.Tensor) -> torch.Tensor:
    """Row indices of the two branches of each pair in the [2 * pairs] batch (y at 2i, y' at 2i + 1)."""
    return torch.stack([2 * pairs, 2 * pairs + 1], 1).flatten()


def fresh(episode: utils.Episode) -> utils.Episode:
    return utils.Episode(copy.deepcopy(episode.messages), copy.deepcopy(episode.info))


def make_task(args: Args, tokenizer_path: str) -> utils.Task:
    """The built-in tasks; a fork's own comes from `--task module:function`."""
    if args.task == "guess_number":
        return utils.guess_number_task(tokenizer_path, args.seed, args.warm_start_steps, args.guess_max, args.horizon)
    if args.task != "chat":
        return utils.import_function(args.task)(args)
    dialogues, skipped = utils.load_prompts(args.dataset, args.prompt_column, args.dataset_split)
    openings = []
    for d in dialogues:
        first_user = next(i for i, m in enumerate(d) if m["role"] == "user")
        # the dataset's later user turns, for `--user dataset`; the policy writes every assistant turn
        openings.append(utils.Episode(d[: first_user + 1], {"user_turns": [
            m["content"] for m in d[first_user + 1 :] if m["role"] == "user"]}))
    if len(openings) <= args.num_eval_prompts:
        raise SystemExit(f"{args.dataset}: {len(openings)} openings, fewer than num_eval_prompts + 1 ({skipped})")
    return utils.Task(train=openings[args.num_eval_prompts :], eval=openings[: args.num_eval_prompts],
                      user=None, reward=None, horizon=5)


if __name__ == "__main__":
    args = tyro.cli(Args)

    # TRY NOT TO MODIFY: processes, run folder, seeding
    rank, world_size, device = utils.init_distributed()
    if args.resume and args.run_name is None:
        raise SystemExit("--resume needs --run_name of the run to continue")
    if args.dialogues_per_rank < 2:
        raise SystemExit("--dialogues_per_rank must be at least 2: one pair to train on, one held out for val/*")
    task_name = args.task.replace("/", "_").replace(":", "_")
    run_name = args.run_name or utils.broadcast_object(f"{args.exp_name}__{task_name}__{args.seed}__{int(time.time())}")
    run_dir = os.path.join(args.output_dir, run_name)
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(dataclasses.asdict(args), f, indent=2)
    utils.seed_everything(args.seed + rank)
    sync_tolerance = args.sync_tolerance if args.sync_tolerance is not None else (0.5 if args.bf16 else 1e-3)
    dtype = torch.bfloat16 if args.bf16 else torch.float32

    # the task: openings, a user, a reward, a horizon
    task = make_task(args, utils.resolve_model_path(utils.EMBEDDED_SMOLLM2))
    policy_path = utils.resolve_model_path(args.model or task.policy or utils.EMBEDDED_SMOLLM2)
    tokenizer = utils.load_tokenizer(policy_path)
    horizon = args.horizon or task.horizon
    fits = [len(utils.chat_token_ids(tokenizer, e.messages, True)) <= args.max_prompt_tokens for e in task.train]
    task.train = [e for e, ok in zip(task.train, fits) if ok]
    utils.print0(f"task {args.task}: {len(task.train)} training openings ({fits.count(False)} too long, skipped), "
                 f"{len(task.eval)} for evaluation, horizon {horizon}")
    if not task.train:
        raise SystemExit(f"no opening fits --max_prompt_tokens {args.max_prompt_tokens}")

    # models: the policy and (with a KL term) the frozen reference, sharded with FSDP2
    policy = utils.shard_model(utils.load_causal_lm(policy_path, torch.float32, device), args.bf16)
    reference = None
    if args.kl_coef > 0:
        reference = utils.shard_model(utils.load_causal_lm(policy_path, torch.float32, device), args.bf16).eval()
        reference.requires_grad_(False)
    num_val = min(max(1, int(args.val_fraction * args.dialogues_per_rank)), args.dialogues_per_rank - 1)
    steps_per_iteration = args.num_epochs * -(-(args.dialogues_per_rank - num_val) // args.minibatch_pairs)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=args.adam_betas, eps=args.adam_eps,
                                  weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, utils.lr_lambda("cosine", args.num_iterations * steps_per_iteration, args.warmup_ratio))

    # rollout engines, colocated on this rank: the policy's, and the simulated user's when an LLM plays it
    max_model_len = args.max_prompt_tokens + horizon * (args.max_new_tokens + args.user_max_tokens + 64)
    engine = utils.make_engine(policy_path, device, max_model_len, args.seed, args.bf16, 0.3,
                               int(args.kv_cache_gib * 2**30), args.rollout_backend)
    user_engine = None
    if task.user is None:
        if args.user == "llm":
            user_path = utils.resolve_model_path(args.user_model or args.model or utils.EMBEDDED_SMOLLM2)
            user_engine = utils.make_engine(user_path, device, max_model_len + 512, args.seed + 1, args.bf16, 0.3,
                                            int(args.kv_cache_gib * 2**30), args.rollout_backend)
            task.user = utils.LLMUser(user_engine, utils.load_tokenizer(user_path), args.user_max_tokens,
                                      args.user_temperature, args.seed * 1000 + rank)
        elif args.user == "server":
            if args.user_url is None or args.user_model is None:
                raise SystemExit("--user server needs --user_url and --user_model")
            task.user = utils.ServerUser(args.user_url, args.user_model, args.user_max_tokens,
                                         args.user_temperature, args.seed * 1000 + rank)
        else:
            task.user = utils.DatasetUser()
    if task.reward is None:
        if args.reward_model is not None:
            reward_model = utils.RewardModel(args.reward_model, device, dtype, args.reward_max_length,
                                             args.trust_remote_code)
            task.reward = lambda episodes: reward_model([e.messages for e in episodes])
        else:
            reward_function = utils.import_function(args.reward_function)
            task.reward = lambda episodes: [float(reward_function(e.messages)) for e in episodes]
    probe_ids = (utils.chat_token_ids(tokenizer, task.train[0].messages, True)
                 + tokenizer("A fixed answer used to compare log-probs.", add_special_tokens=False).input_ids)

    def play(openings: list[utils.Episode], horizons: list[int], seed: tuple) -> list[utils.Episode]:
        return utils.rollout_dialogues(openings, engine, tokenizer, task.user, horizons, args.max_new_tokens,
                                       args.temperature, seed)

    def evaluate(iteration: int) -> list[list[float]]:
        """Per-turn scores of this rank's evaluation dialogues, played to the horizon with the same user seeds."""
        mine = task.eval[rank::world_size]
        episodes = play([fresh(e) for e in mine], [horizon] * len(mine), (args.seed, "eval", rank))
        return [task.reward([e.truncated(t) for e in episodes]) for t in range(1, horizon + 1)]

    def mean_over_ranks(values: list[float]) -> float:
        total = torch.tensor([float(np.nansum(values)), float(np.isfinite(values).sum())], dtype=torch.float64)
        dist.all_reduce(total)
        return (total[0] / total[1].clamp(min=1)).item()

    def eval_metrics(scores: list[list[float]], initial: list[list[float]]) -> dict:
        """Mean score per turn h and the win rate against the initial policy on the same openings (ties 1/2)."""
        metrics = {}
        for t, (now, before) in enumerate(zip(scores, initial), start=1):
            metrics[f"eval/score_turn{t}"] = mean_over_ranks(now)
            wins = [float(a > b) + 0.5 * float(a == b) for a, b in zip(now, before)]
            metrics[f"eval/winrate_vs_initial_turn{t}"] = mean_over_ranks(wins)
        return metrics

    logger = utils.MetricsLogger(run_dir, dataclasses.asdict(args), args.track, args.wandb_project,
                                 args.wandb_entity, run_name, args.resume)
    start_iteration = 1
    if args.resume:
        checkpoint = utils.latest_checkpoint(run_dir)
        if checkpoint is None:
            raise SystemExit(f"--resume: no checkpoint in {run_dir}")
        state = utils.load_checkpoint(checkpoint, policy, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        initial_scores = state["initial_scores"]
        start_iteration = state["update"] + 1
        logger.truncate_after(state["update"])
        utils.sync_weights(engine, policy, probe_ids, device, sync_tolerance)
        utils.print0(f"resumed from {checkpoint}")
    else:
        utils.check_logprob_parity(engine, policy, probe_ids, device, sync_tolerance)
        initial_scores = evaluate(0)
        logger.log({**eval_metrics(initial_scores, initial_scores), **{
            f"reference/{name}_turn{t}": v for name, scores in task.reference_scores.items()
            for t, v in enumerate(scores, start=1)}}, step=0)

    started = time.time()
    for iteration in range(start_iteration, args.num_iterations + 1):
        timings = {}
        rng = np.random.default_rng([args.seed, iteration, rank])

        # 1. roll in and out with pi_t: dialogue A is played to its horizon H' with the simulated user
        t0 = time.time()
        openings = [task.train[i] for i in rng.choice(len(task.train), args.dialogues_per_rank)]
        lengths, branch_turns = sample_horizons(rng, len(openings), horizon, args.horizon_sampling)
        a_side = play([fresh(e) for e in openings], lengths.tolist(), (args.seed, iteration, rank, "A"))
        # a dialogue the user ended before turn h branches at its last turn instead (counted)
        clamped = sum(int(h >= e.turns) for h, e in zip(branch_turns, a_side))
        branch_turns = [min(int(h), e.turns - 1) for h, e in zip(branch_turns, a_side)]
        # 2. branch: B shares A's prefix through user turn h, answers turn h anew, and plays on to H'
        b_side = play([e.prefix(h) for e, h in zip(a_side, branch_turns)], lengths.tolist(),
                      (args.seed, iteration, rank, "B"))
        timings["rollout"] = time.time() - t0

        # 3. the Monte-Carlo returns Q(s_h, y), Q(s_h, y'): the reward of each finished dialogue
        t0 = time.time()
        scores = torch.tensor([task.reward(a_side), task.reward(b_side)], dtype=torch.float32).T  # [pairs, 2]
        turn_finished = torch.tensor([[a.finished[h], b.finished[h]] for a, b, h in zip(a_side, b_side, branch_turns)])
        if args.penalty_reward is not None:
            scores = torch.where(turn_finished, scores, torch.full_like(scores, args.penalty_reward))
        timings["reward"] = time.time() - t0

        # 4. log-probs of the two turn-h responses under pi_t (training forward) and the reference
        t0 = time.time()
        prompts = [a.prompts[h] for a, h in zip(a_side, branch_turns) for _ in range(2)]
        responses = [r for a, b, h in zip(a_side, b_side, branch_turns) for r in (a.responses[h], b.responses[h])]
        input_ids, attention_mask, response_mask = (
            t.to(device) for t in utils.batch_for_logprobs(prompts, responses, tokenizer.pad_token_id))
        chunk = 2 * args.micro_batch_pairs
        old_lp = utils.sequence_logprobs_in_chunks(policy, input_ids, attention_mask, response_mask,
                                                   args.temperature, chunk).view(-1, 2)
        kl = torch.zeros_like(old_lp)
        if reference is not None:
            kl = old_lp - utils.sequence_logprobs_in_chunks(reference, input_ids, attention_mask, response_mask,
                                                            args.temperature, chunk).view(-1, 2)
        returns = scores - args.kl_coef * kl
        # identical turn-h responses carry no signal and NaN rewards no information: weight 0, counted
        identical = torch.tensor([r0 == r1 for r0, r1 in zip(responses[0::2], responses[1::2])])
        finite = torch.isfinite(returns).all(1)
        weights = (finite & ~identical).float()
        returns = torch.nan_to_num(returns, nan=0.0, posinf=0.0, neginf=0.0)
        timings["old_logprobs"] = time.time() - t0

        # 5. regress the relative future on the training pairs, in minibatches of accumulated micro-batches
        t0 = time.time()
        num_train = args.dialogues_per_rank - num_val
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
                    new_lp = utils.sequence_logprobs(policy, input_ids[rows], attention_mask[rows],
                                                     response_mask[rows], args.temperature).view(-1, 2)
                    loss, _ = refuel_loss(new_lp, old_lp[pairs].to(device), returns[pairs].to(device), args.eta,
                                          weights[pairs].to(device))
                    (loss * weights[pairs].sum().clamp(min=1) / mb_weight).backward()
                    losses.append(loss.item())
                grad_norm = utils.clip_grad_norm(policy, args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        timings["train"] = time.time() - t0

        # 6. the official code's regression diagnostics on the held-out pairs: loss, and how often the sign of
        # the log-ratio difference agrees with the sign of the return difference
        val = torch.arange(num_train, args.dialogues_per_rank)
        rows = pair_rows(val).to(device)
        new_lp = utils.sequence_logprobs_in_chunks(policy, input_ids[rows], attention_mask[rows], response_mask[rows],
                                                   args.temperature, chunk).view(-1, 2)
        val_loss, residual = refuel_loss(new_lp, old_lp[val], returns[val], args.eta, weights[val])
        log_ratio_diff = residual + args.eta * (returns[val, 0] - returns[val, 1])
        informative = (weights[val] > 0) & (returns[val, 0] != returns[val, 1])
        aligned = (torch.sign(log_ratio_diff) == torch.sign(returns[val, 0] - returns[val, 1]))[informative]

        # 7. push the new weights into this rank's engine, and check that they arrived
        t0 = time.time()
        sync_gap = utils.sync_weights(engine, policy, probe_ids, device, sync_tolerance)
        timings["sync"] = time.time() - t0

        # TRY NOT TO MODIFY: record metrics (averaged over ranks), evaluate, checkpoint
        sums = torch.tensor([
            scores[:, 0].nanmean().item(), kl.mean().item(), float(np.mean(losses)), val_loss.item(), grad_norm,
            float(np.mean(lengths)), float(np.mean(branch_turns)) + 1, float(np.mean([e.turns for e in a_side])),
            turn_finished.float().mean().item(), aligned.float().sum().item(), float(len(aligned)),
            float(identical.sum()), float((~finite).sum()), float(clamped),
        ], dtype=torch.float64)
        dist.all_reduce(sums)
        mean = sums / world_size
        metrics = {
            "reward/score": mean[0].item(), "reward/kl": mean[1].item(), "loss/refuel": mean[2].item(),
            "val/loss": mean[3].item(), "policy/grad_norm": mean[4].item(), "data/horizon": mean[5].item(),
            "data/branch_turn": mean[6].item(), "data/turns_played": mean[7].item(),
            "data/turn_h_finished": mean[8].item(),
            "val/sign_align": (sums[9] / sums[10]).item() if sums[10] > 0 else float("nan"),
            "skipped/identical_pairs": sums[11].item(), "skipped/nan_reward_pairs": sums[12].item(),
            "data/branch_turn_clamped": sums[13].item(), "policy/lr": scheduler.get_last_lr()[0],
            "sync/logprob_gap": sync_gap, **{f"time/{k}": v for k, v in timings.items()},
        }
        if iteration % args.eval_every == 0 or iteration == args.num_iterations:
            metrics.update(eval_metrics(evaluate(iteration), initial_scores))
        logger.log(metrics, step=iteration)
        shown = {"reward": metrics["reward/score"], "loss": metrics["loss/refuel"],
                 "sign_align": metrics["val/sign_align"]}
        if f"eval/score_turn{horizon}" in metrics:
            shown[f"eval_turn{horizon}"] = metrics[f"eval/score_turn{horizon}"]
        utils.print0(utils.progress_line(iteration, args.num_iterations, started, start_iteration - 1, shown, timings))
        if iteration % args.save_every == 0 or iteration == args.num_iterations:
            utils.save_checkpoint(run_dir, iteration, policy, optimizer, {
                "update": iteration, "scheduler": scheduler.state_dict(), "initial_scores": initial_scores}, tokenizer)

    logger.close()
    utils.shutdown(engine, user_engine)
