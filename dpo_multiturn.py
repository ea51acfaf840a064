"""Multi-turn DPO (and REBEL) as single-turn methods on dialogues: the baselines of the REFUEL paper
(Gao et al. 2024, arXiv 2410.04612), DPO by Rafailov et al. 2023 (arXiv 2305.18290).

A baseline treats the dialogue before turn h as a fixed prompt: at a state s_h it draws two answers y, y', ranks
them by a score, and fits the policy with the DPO loss on the preferred (w) and the other (l) answer,

    L = -log sigmoid( beta * [ (ln pi(y_w|s_h) - ln pi_ref(y_w|s_h)) - (ln pi(y_l|s_h) - ln pi_ref(y_l|s_h)) ] )

or, with `--loss rebel`, REBEL's regression of the log-ratio difference onto eta times the score difference. The
log-probs are summed over the tokens of turn h only. The paper's claim is that such methods suffer covariate shift:
their states s_h come from another policy than the one being trained. Three flags isolate each difference from
REFUEL, one at a time:

    --turns     last (LT: the dialogue's last turn) | all (MT: every turn) | sampled (MT: REFUEL's h distribution)
    --contexts  offline (a dataset's recorded dialogues) | initial (rolled once by pi_0 with the simulated user:
                the paper's MIXED data) | onpolicy (rolled again every iteration by pi_t, as REFUEL)
    --target    immediate (the score of the dialogue through turn h) | future (both answers played on to the
                horizon with pi_t and the user, and the finished dialogues scored: REFUEL's target)

REFUEL itself is `--contexts onpolicy --target future --loss rebel` with its own horizon sampling (refuel.py).
The answers are always drawn from the current policy pi_t, so the contexts and the target are the only axes.

Run:
    python dpo_multiturn.py                                   # DPO-LT on pi_0's dialogues, guessing task, CPU
    python dpo_multiturn.py --turns sampled --loss rebel      # REBEL-MT
    torchrun --nproc_per_node 2 dpo_multiturn.py --contexts onpolicy --target future
    # the paper's four baselines in REFUEL's setting one are presets (PRESETS below); the 70B user behind a server
    torchrun --nproc_per_node 8 dpo_multiturn.py --preset dpo-lt --user_url http://<host>:8000
    torchrun --nproc_per_node 8 dpo_multiturn.py --preset rebel-mt --user_url http://<host>:8000
"""

import copy
import dataclasses
import math
import os
import sys
from typing import Annotated, Literal

# torch reads its C++ log level once, on import: its warnings stay off the console unless --verbose
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "WARNING" if "--verbose" in sys.argv else "ERROR")

import numpy as np
import torch
import torch.nn.functional as F
import tyro

import checkpoints
import dialogues
import lifecycle
import utils
from lifecycle import LoraArgs, RunArgs
from tasks import TaskArgs, task_factory


@dataclasses.dataclass
class Args:
    # the baseline
    turns: Literal["last", "all", "sampled"] = "last"
    """which turn h of a dialogue trains: `last` (LT), `all` (MT: every turn), `sampled` (MT: REFUEL's h)"""
    horizon_sampling: Literal["paper", "uniform"] = "paper"
    """`--turns sampled`'s draw of h, as refuel.py's flag: `paper` (H' ~ U{1..H}, h ~ U{1..H'}; turn 1 most often)
    or `uniform` (h ~ U{1..H}), so that a comparison can give every method the same turn distribution"""
    contexts: Literal["offline", "initial", "onpolicy"] = "initial"
    """where the states s_h come from: the task's recorded dialogues, dialogues pi_0 played once with the user
    (the paper's MIXED data), or dialogues pi_t plays every iteration"""
    target: Literal["immediate", "future"] = "immediate"
    """what ranks the two answers: the score of the dialogue through turn h, or of both branches played on to H"""
    loss: Literal["dpo", "rebel"] = "dpo"
    """DPO on the preferred and the other answer, or REBEL's regression on the score difference"""
    reference: Literal["initial", "iteration"] = "initial"
    """DPO's pi_ref: the initial policy (offline DPO), or pi_t, the policy at the start of each iteration
    (iterative DPO, like REFUEL's pi_t)"""
    preference_dataset: str | None = None
    """offline DPO on a preference dataset instead of generated pairs: a file, saved folder or hub id whose
    `chosen`/`rejected` columns hold whole dialogues (HH-RLHF transcripts, UltraFeedback message lists); its
    final answers are the pair, the rest the state"""
    preference_split: str = "train"
    """split of `--preference_dataset`, for hub datasets"""
    beta: float = 0.1
    """DPO's inverse temperature (DPO paper: 0.1 for dialogue, 0.5 for summaries; the REFUEL paper does not give
    its value: sweep 0.01-1)"""
    eta: float = 5.0
    """`--loss rebel`: the log-ratio difference is regressed onto eta times the score difference (as refuel.py)"""
    num_recorded_dialogues: int = 4096
    """`--contexts initial`: dialogues pi_0 plays once with the user, shared by all ranks' draws"""
    temperature: float = 0.8
    """sampling temperature; log-probs are taken from logits / temperature too (REFUEL paper: 0.8)"""
    max_new_tokens: int = 8
    """length cap of an assistant turn (paper: 1024)"""
    max_prompt_tokens: int = 1024
    """openings longer than this (templated), for training and evaluation, are skipped and counted"""
    max_context_tokens: int | None = None
    """the rollout engine's context: a dialogue whose next turn would not fit ends there (counted in
    `skipped/context_full_dialogues`); default the longest dialogue the length flags allow, max_prompt_tokens + H x
    (max_new_tokens + user_max_tokens + 64), which must fit the model's positions (setting one: 8,192, Llama-3-8B's
    and the official vLLM engines' context)"""
    num_iterations: int = 8
    """iterations; each draws fresh states and answers"""
    pairs_per_rank: int = 512
    """states s_h per iteration per rank, each answered twice: one pair"""
    num_epochs: int = 1
    """passes over an iteration's pairs"""
    minibatch_pairs: int = 64
    """pairs per optimizer step per rank"""
    micro_batch_pairs: int = 16
    """pairs per forward/backward; gradients accumulate over a minibatch"""
    lr: float = 5e-4
    """learning rate (paper: 3e-7 for Llama-3-8B)"""
    lr_schedule: Literal["cosine", "linear"] = "cosine"
    """learning-rate decay after the warmup (paper: cosine)"""
    warmup_ratio: float = 0.1
    """linear warmup over this share of all optimizer steps (paper: 0.1)"""
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
        default_factory=lambda: RunArgs(exp_name="dpo_multiturn"))
    """seed, devices and engines, token budget, run folder, tracking (lifecycle.RunArgs)"""
    lora: Annotated[LoraArgs, tyro.conf.arg(name="")] = dataclasses.field(default_factory=LoraArgs)
    """full fine-tuning, or LoRA adapters on the frozen base: --lora_rank, ... (checkpoints.LoraArgs)"""


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO's loss per pair (DPO paper Eq. 7) from summed log-probs, and per pair what a DPO user reads (the names
    TRL logs, in this project's style): the policy's log-probs of the chosen and the other answer, their implicit
    rewards beta * (ln pi - ln pi_ref), the margin between the two (the sigmoid's argument) and whether the chosen
    one's reward is the higher (a tie is not). Without the log-probs, a loss near log 2 cannot tell a policy that
    keeps both likelihoods from one that lowers both together. logsigmoid keeps large margins finite."""
    rewards_chosen = beta * (policy_chosen - ref_chosen)
    rewards_rejected = beta * (policy_rejected - ref_rejected)
    margin = rewards_chosen - rewards_rejected
    return -F.logsigmoid(margin), {
        "dpo/logps_chosen": policy_chosen, "dpo/logps_rejected": policy_rejected,
        "dpo/rewards_chosen": rewards_chosen, "dpo/rewards_rejected": rewards_rejected,
        "dpo/accuracy": (margin > 0).float(), "loss/dpo_margin": margin}


def rebel_loss(new_lp: torch.Tensor, old_lp: torch.Tensor, rewards: torch.Tensor, eta: float) -> torch.Tensor:
    """REBEL's squared regression residual per pair, tensors [pairs, 2] (as refuel.py's refuel_loss)."""
    log_ratio = new_lp - old_lp
    return ((log_ratio[:, 0] - log_ratio[:, 1]) - eta * (rewards[:, 0] - rewards[:, 1])) ** 2


def training_states(rng: np.random.Generator, turns_played: list[int], n: int, mode: str,
                    horizon: int, sampling: str = "paper") -> list[tuple[int, int]]:
    """`n` states (dialogue index, turn h, 0-indexed) from dialogues with `turns_played` assistant turns each.

    `last`: one dialogue after another (as drawn), at its last turn. `all`: every (dialogue, turn) state, n of them
    uniformly. `sampled`: REFUEL's draw of h, `paper` (official generate.py: H' ~ U{1..H}, h ~ U{1..H'}) or
    `uniform` (h ~ U{1..H}, refuel.py's `--horizon_sampling uniform`), redrawn uniformly over a dialogue's turns when
    it has fewer than h (refuel.py's `redraw_past_the_end`; scripts do not import each other).
    """
    which = rng.integers(0, len(turns_played), n)
    turns = np.asarray(turns_played)[which]
    if mode == "last":
        return [(int(d), int(t) - 1) for d, t in zip(which, turns)]
    if mode == "all":
        every = [(d, h) for d, t in enumerate(turns_played) for h in range(t)]
        return [every[i] for i in rng.choice(len(every), n)]
    h = rng.integers(0, horizon, n) if sampling == "uniform" else rng.integers(0, rng.integers(0, horizon, n) + 1)
    h = np.where(h >= turns, rng.integers(0, np.maximum(turns, 1)), h)
    return [(int(d), int(t)) for d, t in zip(which, h)]


def preference_pairs(scores: torch.Tensor, identical: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which answer of each pair [pairs, 2] is preferred (0 or 1), and which pairs count: pairs with identical
    answers or tied (or non-finite) scores carry no preference and are dropped (weight 0)."""
    keep = ~identical & torch.isfinite(scores).all(1) & (scores[:, 0] != scores[:, 1])
    return (scores[:, 1] > scores[:, 0]).long(), keep


def preference_tokens(tokenizer, chosen: utils.Dialogue, rejected: utils.Dialogue) -> tuple[list[int], ...]:
    """(prompt, chosen answer, rejected answer) token ids of a recorded preference pair, cut as every dialogue is
    (`utils.tokenize_dialogue`): the answer is the last assistant turn's content and end-of-turn token."""
    cut = []
    for dialogue in (chosen, rejected):
        ids, masks = utils.tokenize_dialogue(tokenizer, dialogue)
        start = masks[-1].index(1)
        cut.append((ids[:start], ids[start : start + sum(masks[-1])]))
    return cut[0][0], cut[0][1], cut[1][1]


def state(episode: dialogues.Episode, h: int) -> dialogues.Episode:
    """The dialogue through user turn h, ready for its answer at turn h. A recorded dialogue has no token lists:
    the earlier turns get empty ones, so that the episode counts h turns played and records turn h's tokens."""
    cut = [i for i, m in enumerate(episode.messages) if m["role"] == "user"][h] + 1
    return dialogues.Episode(copy.deepcopy(episode.messages[:cut]), copy.deepcopy(episode.info),
                             [[] for _ in range(h)], [[] for _ in range(h)], [True] * h)


def user_turns(episode: dialogues.Episode) -> int:
    """The states s_h a dialogue offers, one per user turn: a played dialogue ends with its last answer, but a
    recorded one may end with a user turn that its dataset answers elsewhere (UltraInteract's `trajectory` and its
    `chosen`/`rejected` columns), and that last state is the one its data was recorded for."""
    return sum(m["role"] == "user" for m in episode.messages)


def recorded_that_fit(recorded: list[dialogues.Episode], tokenizer, horizon: int, max_prompt_tokens: int,
                      turn_tokens: int, max_state_tokens: int | None = None) -> tuple[list[dialogues.Episode], int]:
    """Recorded dialogues cut after their last state s_h that a run can train on: h < H, and the templated state no
    longer than a played dialogue could be there, `max_prompt_tokens + h * turn_tokens`, so that the engine's context
    holds it and all that is played from it (a recorded turn is not capped by --max_new_tokens), nor than
    `max_state_tokens` (the context less one answer). The cut stops at the first state that does not fit; a dialogue
    whose first state does not fit is left out and counted."""
    kept, too_long = [], 0
    for episode in recorded:
        ends = [i + 1 for i, m in enumerate(episode.messages) if m["role"] == "user"][:horizon]
        fit = 0
        while fit < len(ends) and (len(utils.chat_token_ids(tokenizer, episode.messages[: ends[fit]], True))
                                   <= min(max_prompt_tokens + fit * turn_tokens, max_state_tokens or math.inf)):
            fit += 1
        if fit:
            kept.append(dialogues.Episode(episode.messages[: ends[fit - 1]], episode.info))
        else:
            too_long += 1
    return kept, too_long


def offline_data(args: Args, task, tokenizer, turn_tokens: int, max_model_len: int) -> tuple[list | None, dict]:
    """The data a run without generated states trains from: a preference dataset's (prompt, chosen, rejected) token
    ids, or (`--contexts offline`) the task's recorded dialogues cut to the states that fit (`recorded_that_fit`,
    in place), with their counts for the first log line. Refuses `--contexts offline` on a task with no recorded
    dialogue."""
    if args.contexts == "offline" and not task.recorded:
        raise SystemExit(f"--contexts offline: task {args.task_args.task!r} has no recorded dialogues (the chat task "
                         "records the rows of --prompt_column that hold assistant turns, as UltraInteract's "
                         "`trajectory` or a message list does)")
    preferences, recorded_counts = None, {}
    if args.preference_dataset is not None:
        try:
            pairs, skipped_pairs = dialogues.load_preferences(args.preference_dataset, args.preference_split)
        except ValueError as e:  # a missing file, no such column, no usable pair: one line, not a traceback
            raise SystemExit(str(e))
        preferences = [preference_tokens(tokenizer, chosen, rejected) for chosen, rejected in pairs]
        utils.print0(f"{args.preference_dataset}: {len(preferences)} preference pairs; skipped rows {skipped_pairs}")
    elif args.contexts == "offline":
        task.recorded, too_long = recorded_that_fit(task.recorded, tokenizer, task.horizon, args.max_prompt_tokens,
                                                    turn_tokens, max_model_len - args.max_new_tokens)
        if not task.recorded:
            raise SystemExit(f"--contexts offline: no recorded dialogue's first state fits --max_prompt_tokens "
                             f"{args.max_prompt_tokens} ({too_long} too long)")
        recorded_counts = {"data/recorded_dialogues": len(task.recorded), "skipped/too_long_recorded": too_long}
        utils.print0(f"{len(task.recorded)} recorded dialogues, {sum(map(user_turns, task.recorded))} states "
                     f"({too_long} dialogues too long from their first state, skipped)")
    return preferences, recorded_counts


SETTING_ONE = dict(  # REFUEL's setting one (refuel.py's preset refuel-setting-one), for every baseline
    task="chat", model="meta-llama/Meta-Llama-3-8B-Instruct", user="server",
    user_model="meta-llama/Llama-3.1-70B-Instruct", reward_model="RLHFlow/ArmoRM-Llama3-8B-v0.1",
    trust_remote_code=True, dataset="openbmb/UltraInteract_pair", prompt_column="trajectory", temperature=0.8,
    max_new_tokens=1024, user_max_tokens=1024, lr=3e-7, lr_schedule="cosine", warmup_ratio=0.1, horizon=5,
    num_iterations=2, pairs_per_rank=8000, minibatch_pairs=16, micro_batch_pairs=1, max_context_tokens=8192,
    # MIXED contexts: dialogues pi_0 plays once with the user from the dataset's openings, ranked by the immediate
    # reward of the prefix through turn h; the number of recorded dialogues is not given, so one iteration's worth
    contexts="initial", target="immediate", num_recorded_dialogues=8000)
PRESETS = {
    # the REFUEL paper's baselines: DPO or REBEL, on the last turn (LT) or on every turn (MT, with
    # REFUEL's h distribution); beta is not given in the paper (DPO's own value for dialogue, 0.1), REBEL's eta is
    # REFUEL's for ArmoRM (1e3)
    "dpo-lt": dict(loss="dpo", turns="last", beta=0.1, **SETTING_ONE),
    "dpo-mt": dict(loss="dpo", turns="sampled", beta=0.1, **SETTING_ONE),
    "rebel-lt": dict(loss="rebel", turns="last", eta=1e3, **SETTING_ONE),
    "rebel-mt": dict(loss="rebel", turns="sampled", eta=1e3, **SETTING_ONE),
}
"""The paper's baselines as flag values: `--preset NAME`, then any flag to override one of them."""


def check_args(args: Args) -> None:
    """Flags that cannot work are refused before anything loads."""
    problems = [message for bad, message in [
        (args.temperature <= 0, "--temperature must be > 0: log-probs divide the logits by it"),
        (args.beta <= 0 or args.eta <= 0, "--beta and --eta must be > 0"),
        (args.lr <= 0, "--lr must be > 0"),
        (not 0 <= args.warmup_ratio <= 1, "--warmup_ratio must be in [0, 1]"),
        (args.weight_decay < 0, "--weight_decay must be >= 0"),
        (args.max_grad_norm <= 0, "--max_grad_norm must be > 0: gradients are clipped to this norm"),
        (min(args.pairs_per_rank, args.minibatch_pairs, args.micro_batch_pairs, args.num_epochs,
             args.num_iterations) < 1,
         "--pairs_per_rank, --minibatch_pairs, --micro_batch_pairs, --num_epochs, --num_iterations must be >= 1"),
        (args.preference_dataset is not None and args.loss != "dpo",
         "--preference_dataset has preferences, not scores: it trains --loss dpo only"),
    ] if bad]
    if problems:
        raise SystemExit("\n".join(problems))
    lifecycle.check_run_args(args.run, args.lora)
    task_factory(args.task_args.task)


if __name__ == "__main__":
    args = lifecycle.parse_args(Args, PRESETS)
    check_args(args)
    run = lifecycle.start_run(args)  # processes, device, run folder, seeds
    device, seed, rank = run.device, args.run.seed, run.rank
    task, tokenizer = run.load_task(f"{args.loss.upper()}, turns {args.turns}, contexts {args.contexts}, "
                                    f"target {args.target}")  # openings, a user, a reward, a horizon H
    horizon = task.horizon
    preferences, recorded_counts = offline_data(args, task, tokenizer, run.turn_tokens, run.max_model_len)

    # a pair's rows are a state s_h and one turn's answer; a recorded context's turns are not capped by
    # --max_new_tokens, so only the engine's context bounds its states; a preference dataset's pairs are measured
    sequence_tokens = run.max_model_len if args.contexts == "offline" else run.dialogue_tokens
    response_tokens = args.max_new_tokens
    if preferences is not None:
        response_tokens = max(len(answer) for _, *answers in preferences for answer in answers)
        sequence_tokens = max(len(prompt) for prompt, _, _ in preferences) + response_tokens
    uses_ref_policy = args.loss == "dpo" and args.reference == "initial"
    plan = run.check_memory(rows=2 * args.micro_batch_pairs, sequence_tokens=sequence_tokens,
                            response_tokens=response_tokens, reference=uses_ref_policy)

    # models: the policy (with --lora_rank: adapters on its frozen base) and (DPO against pi_0) the frozen reference
    # policy, sharded with FSDP2 as they load; with LoRA it is the policy with its adapters off, no second copy
    policy = checkpoints.load_sharded_causal_lm(run.policy_path, device, bf16=args.run.bf16, lora=args.lora,
                                                gradient_checkpointing=args.run.gradient_checkpointing)
    ref_policy = checkpoints.load_reference(policy, run.policy_path, device, bf16=args.run.bf16) \
        if uses_ref_policy else None
    steps_per_iteration = args.num_epochs * -(-args.pairs_per_rank // args.minibatch_pairs)
    optimizer = torch.optim.AdamW(utils.trainable(policy), lr=args.lr, betas=args.adam_betas, eps=args.adam_eps,
                                  weight_decay=args.weight_decay)
    scheduler = lifecycle.lr_scheduler(optimizer, args.lr_schedule, args.warmup_ratio,
                                       args.num_iterations * steps_per_iteration, args.run)
    engine = run.start_engine(plan, tokenizer)  # pi_t's rollout engine, colocated on this rank

    def play(openings: list[dialogues.Episode], horizons: list[int], seed_parts: tuple,
             keys: list[tuple] | None = None) -> list[dialogues.Episode]:
        return dialogues.rollout_dialogues(openings, engine, tokenizer=tokenizer, user=task.user, horizons=horizons,
                                           max_tokens=args.max_new_tokens, temperature=args.temperature,
                                           seed=seed_parts, keys=keys)

    saved = run.resume_or_start({"policy": (policy, optimizer)}, {"policy": scheduler}, first_metrics=recorded_counts)
    recorded = task.recorded if saved is None else saved["recorded"] or task.recorded
    if saved is None and args.contexts == "initial" and preferences is None:
        # the paper's MIXED data: pi_0 plays its dialogues once with the user; kept in the checkpoints, so a
        # resumed run trains on the same ones
        rng = np.random.default_rng([seed, 0, rank])
        openings = [task.train[i] for i in rng.choice(len(task.train), args.num_recorded_dialogues)]
        recorded = play([copy.deepcopy(e) for e in openings], [horizon] * len(openings), (seed, "initial", rank))
        run.count_generated(recorded, [0] * len(recorded))

    for iteration in run.iterations():
        rng = np.random.default_rng([seed, iteration, rank])
        if preferences is not None:
            # 1-3. offline preference data: the dataset's own chosen (column 0) and rejected answers, nothing
            # generated
            picks = rng.choice(len(preferences), args.pairs_per_rank)
            states = [preferences[i][0] for i in picks]
            answers = [[preferences[i][1], preferences[i][2]] for i in picks]
            turns, scores, context_full = [0] * len(picks), torch.tensor([[1.0, 0.0]] * len(picks)), 0
            run.lap("rollout")
        else:
            # 1. the states s_h: turns of recorded dialogues, or of dialogues pi_t plays now with the user
            contexts = recorded
            if args.contexts == "onpolicy":
                openings = [task.train[i] for i in rng.choice(len(task.train), args.pairs_per_rank)]
                contexts = play([copy.deepcopy(e) for e in openings], [horizon] * len(openings),
                                (seed, iteration, rank))
                run.count_generated(contexts, [0] * len(contexts))
            # a dialogue that ran out of context ends with a state it could not answer: not a state to train on
            chosen_states = training_states(rng, [d.turns if d.context_full else user_turns(d) for d in contexts],
                                            args.pairs_per_rank, args.turns, horizon, args.horizon_sampling)
            turns = [h for _, h in chosen_states]
            at_state = [state(contexts[d], h) for d, h in chosen_states]
            # 2. two answers y, y' to each state from pi_t, drawn in the same engine call; with the future target
            # both are played on to the horizon side by side
            until = [h + 1 for h in turns] if args.target == "immediate" else [horizon] * len(turns)
            both = play([copy.deepcopy(s) for s in at_state + at_state], until + until, (seed, iteration, rank),
                        keys=[(side, i) for side in "AB" for i in range(len(at_state))])
            with_y, with_y_prime = both[: len(at_state)], both[len(at_state) :]
            if args.run.engine_sleep:  # its device memory goes to the trainer until the next weight sync wakes it
                engine.sleep()
            run.count_generated(with_y, turns)
            run.count_generated(with_y_prime, turns)
            run.lap("rollout")
            # 3. the scores that rank them: the dialogue through turn h, or the finished branch
            scores = torch.tensor([task.reward(with_y), task.reward(with_y_prime)], dtype=torch.float32).T
            run.spent["reward_calls"] += 2 * len(at_state)
            states = [d.prompts[h] for d, h in zip(with_y, turns)]
            answers = [[d.responses[h], d_.responses[h]] for d, d_, h in zip(with_y, with_y_prime, turns)]
            context_full = sum(d.context_full for d in both + (contexts if args.contexts == "onpolicy" else []))
        run.lap("reward")
        identical = torch.tensor([y == y_prime for y, y_prime in answers])
        preferred, keep = preference_pairs(scores, identical)
        if args.run.schedule_over == "token_budget":
            scheduler.start_iteration(*run.tokens_this_iteration(), steps_per_iteration)

        # 4. log-probs of y and y' at s_h under pi_t (training forward) and the reference policy
        input_ids, attention_mask, response_mask = (t.to(device) for t in utils.batch_for_logprobs(
            [s for s in states for _ in range(2)], [a for pair in answers for a in pair], tokenizer.pad_token_id))
        chunk = 2 * args.micro_batch_pairs
        old_lp = utils.token_logprobs_in_chunks(policy, input_ids, attention_mask, response_mask, args.temperature,
                                                chunk).sum(-1).view(-1, 2)
        ref_lp = old_lp if ref_policy is None else utils.token_logprobs_in_chunks(
            ref_policy, input_ids, attention_mask, response_mask, args.temperature, chunk).sum(-1).view(-1, 2)
        # DPO needs a preference; REBEL regresses any score difference, a tie included (as refuel.py)
        weights = (keep if args.loss == "dpo" else ~identical & torch.isfinite(scores).all(1)).float()
        rewards = torch.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0)
        run.lap("old_logprobs")

        # 5. fit the policy to the preferences, in minibatches of accumulated micro-batches
        # the DPO diagnostics are read at each training forward, so they average over the iteration's steps as TRL's
        # do over a logging interval; every rank runs a micro-batch, so each has every name for the all-reduce
        losses, diagnostics = [], {}
        for epoch in range(args.num_epochs):
            shuffle = torch.Generator().manual_seed(utils.sample_seed(seed, iteration, rank, epoch))
            order = torch.randperm(len(answers), generator=shuffle)
            for mb_start in range(0, len(answers), args.minibatch_pairs):
                mb = order[mb_start : mb_start + args.minibatch_pairs]
                mb_weight = weights[mb].sum().clamp(min=1)
                for micro_start in range(0, len(mb), args.micro_batch_pairs):
                    pairs = mb[micro_start : micro_start + args.micro_batch_pairs]
                    rows = torch.stack([2 * pairs, 2 * pairs + 1], 1).flatten().to(device)
                    new_lp = utils.token_logprobs(policy, input_ids[rows], attention_mask[rows], response_mask[rows],
                                                  args.temperature).sum(-1).view(-1, 2)
                    weight = weights[pairs].to(device)
                    if args.loss == "dpo":
                        # column 0 of the gathered pairs is the preferred answer
                        pick = torch.stack([preferred[pairs], 1 - preferred[pairs]], 1).to(device)
                        per_pair, per_pair_diagnostics = dpo_loss(
                            *new_lp.gather(1, pick).unbind(1), *ref_lp[pairs].to(device).gather(1, pick).unbind(1),
                            args.beta)
                        for name, values in per_pair_diagnostics.items():
                            diagnostics.setdefault(name, []).extend(values.detach()[weight > 0].tolist())
                    else:
                        per_pair = rebel_loss(new_lp, old_lp[pairs].to(device), rewards[pairs].to(device), args.eta)
                    # pairs of weight 0 still run the forward, so that every rank makes the same FSDP2 collectives
                    ((weight * per_pair).sum() / mb_weight).backward()
                    losses += per_pair.detach()[weight > 0].tolist()
                grad_norm = utils.clip_grad_norm(policy, args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        run.lap("train")

        # 6. push the new weights into this rank's engine, and check that they arrived
        sync_metrics = run.sync_weights(policy)
        run.lap("sync")

        # record metrics (averaged over ranks; counts summed); the run adds the budget and the evaluation
        metrics = utils.mean_over_ranks({
            "reward/score": scores.flatten().tolist(), f"loss/{args.loss}": losses, "policy/grad_norm": grad_norm,
            "data/branch_turn": [h + 1 for h in turns], "data/pairs_kept": keep.float().tolist(),
            **{f"sync/{k}": v for k, v in sync_metrics.items()}, **diagnostics})
        metrics.update(utils.sum_over_ranks({
            "skipped/identical_pairs": identical.sum().item(), "skipped/context_full_dialogues": context_full,
            "skipped/tied_pairs": (~keep & ~identical).sum().item()}))
        metrics["policy/lr"] = scheduler.get_last_lr()[0]
        run.end_iteration(iteration, metrics, {"reward": metrics["reward/score"], "loss": metrics[f"loss/{args.loss}"],
                                               "kept": metrics["data/pairs_kept"]}, {"policy": (policy, optimizer)},
                          {"policy": scheduler}, {"recorded": recorded if args.contexts == "initial" else None})

    run.summary()
