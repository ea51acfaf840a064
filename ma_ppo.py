"""MA-PPO: PPO with macro actions (MA-RLHF, Chai et al. 2024, arXiv 2410.02743), single- and multi-turn.

The policy still samples one token at a time; macro actions only regroup credit assignment afterwards. Each
response is cut into macro actions w_1..w_K (runs of consecutive tokens, never across a turn), and PPO's advantage
estimation runs over macro steps instead of tokens:

    r_t = -kl_coef * (ln pi(a_t|s_t) - ln pi_ref(a_t|s_t))      (+ the clipped score on the dialogue's last token)
    R_k = sum_{t in w_k} sigma_t r_t    V_k = sum_{t in w_k} sigma_t V(s_t)      (sigma: equal | unit | position)
    delta_k = R_k + gamma V_{k+1} - V_k       A_k = delta_k + gamma lambda A_{k+1}       G_k = A_k + V_k

sigma sums to 1 over a macro (equal: 1/|w|, the official default), and weighs the rewards as the values, as the
official code does; `--reward_aggregation sum` takes the paper's R_k = sum_{t in w_k} r_t instead. The last token,
which carries the score, is a macro of its own, so the score is never averaged away. A_k and G_k are broadcast to
the tokens of w_k; the actor takes PPO's clipped loss with each token's own ratio and its macro's advantage, the
critic a clipped regression of each token's value onto its macro's return, each loss the mean of each sample's token
mean. The critic starts from the task's reward model when it has one (its score head as the value head), else from
the policy with a value head at zero. With one token per macro (`--ngram 1`) this is token-level PPO exactly. In a
dialogue with the simulated user the assistant's tokens of every turn are actions and the user's are not; the reward
comes at the end of the dialogue.

Run:
    python ma_ppo.py                                  # guessing task, warm-started tiny policy, CPU (n = 5)
    python ma_ppo.py --ngram 1                        # token-level PPO, for comparison
    python ma_ppo.py --task digits --max_new_tokens 48    # one turn, 48 digits scored as a whole
    python ma_ppo.py --task chat --horizon 1          # single turn: dataset prompts, brevity reward
    python ma_ppo.py --task chat --horizon 1 --reward_model <rm> --critic_warmup_steps 4   # critic from the RM
    torchrun --nproc_per_node 2 ma_ppo.py --termination perplexity
    torchrun --nproc_per_node 8 ma_ppo.py --preset ma-ppo-tldr   # the official TL;DR run (Gemma-2B)
"""

import copy
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
import utils
from lifecycle import LoraArgs, RunArgs
from tasks import TaskArgs, task_factory

CLAUSE_ENDS = (".", ",", ";", ":", "!", "?", "\n")
"""`--termination punctuation` ends a macro action after a token whose text ends with one of these"""


@dataclasses.dataclass
class Args:
    # macro actions
    termination: str = "ngram"
    """how responses are cut into macro actions, a rule of `TERMINATION_RULES`: `ngram` (every `ngram` tokens),
    `randomized` (random lengths), `perplexity` (where a token's NLL under the reference rises above its macro's
    mean) or `punctuation` (after clause-ending punctuation, a light stand-in for the paper's parser)"""
    ngram: int = 5
    """tokens per macro action for `ngram` (paper: 5; 1 is token-level PPO)"""
    random_lengths: tuple[int, ...] = (1, 2, 3, 5, 10)
    """`randomized`: macro lengths, each used `random_repeats` times in a shuffled order, then one macro for the
    rest (official `randomized_ngram_selection`: 1, 2, 3, 5, 10; the paper's appendix: 2, 3, 5, 10)"""
    random_repeats: int = 3
    """`randomized`: how often each length is used (official `--repeat_times`, no default; the paper's appendix: 3)"""
    isolate_last_token: bool = True
    """the dialogue's last token (it carries the score) is a macro of its own, as the official code"""
    value_weights: Literal["equal", "unit", "position"] = "equal"
    """sigma for the macro value: the mean of its tokens' values (official run's `--value_function equal`), the
    last token's, or weights 1/(i+1) normalised (first tokens weigh most)"""
    reward_aggregation: Literal["mean", "sum"] = "mean"
    """macro reward: its tokens' rewards weighted by the same sigma as the value, a weighted mean (official code:
    `modeling_macro_action` on the rewards too; the plain mean with `equal`), or their sum (the paper's R)"""

    # PPO
    critic_init: Literal["reward_model", "policy"] | None = None
    """the critic's start: the task's `--reward_model`, its score head the value head (official: the RM checkpoint),
    or the policy with a value head at zero; default `reward_model` when the task has one, else `policy`"""
    loss_averaging: Literal["sample", "token"] = "sample"
    """both losses: the mean over a minibatch's samples of each sample's token mean (official run: one sample per
    device, gradients accumulated and averaged over 32 steps and 8 devices), or one mean over all its tokens"""
    critic_warmup_steps: int = 0
    """the first this-many optimizer steps train the critic alone: the actor takes no step (its learning-rate
    schedule starts after them; over a `--schedule_over token_budget`, at the share of the budget reached), so the
    advantages come from a critic that has fitted the returns first"""
    kl_coef: float = 0.05
    """per-token KL penalty to the reference (paper: 0.05)"""
    reward_clip: float = 2.5
    """the score is clipped to [-reward_clip, reward_clip] (paper: 2.5)"""
    gamma: float = 1.0
    """discount per macro step (paper: 1)"""
    lam: float = 0.95
    """GAE lambda per macro step (paper: 0.95)"""
    clip_eps: float = 0.2
    """policy ratio clip (paper: 0.2)"""
    value_clip: float = 0.2
    """value clip around the rollout's values (paper: 0.2)"""
    temperature: float = 0.8
    """sampling temperature; log-probs, ratios and KL are taken from logits / temperature too (paper: 0.8)"""
    max_new_tokens: int = 8
    """length cap of an assistant turn (paper: 512)"""
    max_prompt_tokens: int = 1024
    """openings longer than this (templated), for training and evaluation, are skipped and counted"""
    max_context_tokens: int | None = None
    """the rollout engine's context, where a dialogue ends (`skipped/context_full_dialogues`); default the longest
    dialogue the length flags allow, max_prompt_tokens + H x (max_new_tokens + user_max_tokens + 64)"""
    num_iterations: int = 8
    """iterations; each plays fresh dialogues with the current policy"""
    dialogues_per_rank: int = 256
    """dialogues per iteration per rank (paper: 256 responses per rollout batch in all)"""
    num_epochs: int = 1
    """passes over an iteration's dialogues (paper: 1)"""
    minibatch_dialogues: int = 64
    """dialogues per optimizer step per rank"""
    micro_batch_dialogues: int = 16
    """dialogues per forward/backward; gradients accumulate over a minibatch"""
    lr: float = 1e-4
    """actor learning rate (paper: 1.5e-5 for Gemma)"""
    critic_lr: float = 1e-4
    """critic learning rate (paper: 1.5e-5)"""
    lr_schedule: Literal["linear", "cosine"] = "linear"
    """learning-rate decay of both models after the warmup (official run: linear)"""
    warmup_ratio: float = 0.05
    """linear warmup over this share of the steps (official run: 0.05)"""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (paper: 0.9, 0.95)"""
    weight_decay: float = 0.0
    """AdamW weight decay (paper: 0.1 on non-bias, non-norm weights)"""
    max_grad_norm: float = 1.0
    """gradient clipping of each model (paper: 1.0)"""

    # the policy, the task, the run
    model: str | None = None
    """actor: hub id or folder; default the task's own policy, else the embedded SmolLM2 (paper: Gemma SFT)"""
    task_args: Annotated[TaskArgs, tyro.conf.arg(name="")] = dataclasses.field(default_factory=TaskArgs)
    """the task: openings, a simulated user, a reward, a horizon (tasks.TaskArgs)"""
    run: Annotated[RunArgs, tyro.conf.arg(name="")] = dataclasses.field(
        default_factory=lambda: RunArgs(exp_name="ma_ppo"))
    """seed, devices and engines, token budget, run folder, tracking (lifecycle.RunArgs)"""
    lora: Annotated[LoraArgs, tyro.conf.arg(name="")] = dataclasses.field(default_factory=LoraArgs)
    """full fine-tuning, or LoRA adapters on the frozen base: --lora_rank, ... (checkpoints.LoraArgs)"""


@dataclasses.dataclass
class OpenMacro:
    """What a termination rule sees at an action token: the macro open before it, and the token's own inputs."""

    length: int
    """action tokens in the open macro"""
    nll_sum: float
    """their summed NLL under the reference (`perplexity`)"""
    planned: int | None
    """the open macro's drawn length (`randomized`; None once the shuffled list is spent)"""
    token_nll: float | None
    """this token's NLL under the reference (`perplexity`)"""
    previous_text: str | None
    """the decoded text of the action token before this one (`punctuation`; None at the first)"""
    ngram: int
    """`--ngram`, the length of an `ngram` macro"""


def ngram_ends(macro: OpenMacro) -> bool:
    """`ngram`: every macro holds n tokens (the paper's main rule; n = 1 is token-level PPO)."""
    return macro.length == macro.ngram


def randomized_ends(macro: OpenMacro) -> bool:
    """`randomized`: each macro takes the next length of a shuffled list; once it is spent, one macro for the rest
    (official `randomized_ngram_selection`)."""
    return macro.planned is not None and macro.length == macro.planned


def perplexity_ends(macro: OpenMacro) -> bool:
    """`perplexity`: a new macro where a token is less likely under the reference than the macro so far, on
    average (the paper's perplexity-based termination)."""
    return macro.length > 0 and macro.token_nll > macro.nll_sum / macro.length


def punctuation_ends(macro: OpenMacro) -> bool:
    """`punctuation`: a new macro after a token whose text ends a clause (a stand-in for the paper's parser)."""
    return macro.previous_text is not None and macro.previous_text.endswith(CLAUSE_ENDS)


TERMINATION_RULES = {"ngram": ngram_ends, "randomized": randomized_ends, "perplexity": perplexity_ends,
                     "punctuation": punctuation_ends}
"""`--termination` names a rule here: whether the open macro ends before the current token. A new rule is a
function of an `OpenMacro` and a line in this table."""


def macro_segments(turn_ids: torch.Tensor, rule: str, ngram: int = 5, nll: torch.Tensor | None = None,
                   texts: list[str] | None = None, random_lengths: tuple[int, ...] = (1, 2, 3, 5, 10),
                   random_repeats: int = 3, generator: torch.Generator | None = None,
                   isolate_last_token: bool = True) -> torch.Tensor:
    """Macro index of each action token of one sample, consecutive from 0; -1 where `turn_ids` is -1 (not an action).

    `turn_ids` [T] numbers the assistant turn of each action token; a macro never spans two turns, and the last
    action token is a macro of its own with `isolate_last_token`. Within a turn, `TERMINATION_RULES[rule]` decides
    at each token whether the open macro ends there; `nll` (per token, under the reference) and `texts` (decoded
    per token) are the inputs of the rules that read them. No segment is ever empty: boundaries are positions of
    action tokens.
    """
    ends = TERMINATION_RULES[rule]
    positions = (turn_ids >= 0).nonzero().flatten().tolist()
    lengths = [n for n in random_lengths for _ in range(random_repeats)]
    lengths = [lengths[i] for i in torch.randperm(len(lengths), generator=generator)] if rule == "randomized" else []
    starts, open_length, budget, nll_sum = set(), 0, None, 0.0
    for k, p in enumerate(positions):
        new_turn = k == 0 or turn_ids[p] != turn_ids[positions[k - 1]]
        macro = OpenMacro(open_length, nll_sum, budget, None if nll is None else float(nll[p]),
                          None if texts is None or k == 0 else texts[positions[k - 1]], ngram)
        if new_turn or ends(macro):
            starts.add(p)
            open_length, nll_sum = 0, 0.0
            budget = lengths.pop(0) if lengths else None
        open_length += 1
        nll_sum += float(nll[p]) if nll is not None else 0.0
    if isolate_last_token and positions:
        starts.add(positions[-1])
    segment_ids = torch.full_like(turn_ids, -1)
    macro = -1
    for p in positions:
        macro += p in starts
        segment_ids[p] = macro
    return segment_ids


def macro_weights(segment_ids: torch.Tensor, kind: str) -> torch.Tensor:
    """sigma_t of every action token [rows, T] within its macro: `equal` 1/|w|, `unit` 1 on the macro's last
    token, `position` 1/(i+1) normalised over the macro (i: the token's place in it); `sum` 1 everywhere."""
    weights = torch.zeros(segment_ids.shape, dtype=torch.float64)
    for row in range(segment_ids.shape[0]):
        for macro in range(int(segment_ids[row].max()) + 1):
            where = (segment_ids[row] == macro).nonzero().flatten()
            size = len(where)
            if kind == "equal":
                w = torch.full((size,), 1.0 / size, dtype=torch.float64)
            elif kind == "unit":
                w = torch.zeros(size, dtype=torch.float64)
                w[-1] = 1.0
            elif kind == "position":
                w = 1.0 / torch.arange(1, size + 1, dtype=torch.float64)
                w = w / w.sum()
            else:
                w = torch.ones(size, dtype=torch.float64)
            weights[row, where] = w
    return weights


def per_macro(values: torch.Tensor, weights: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """[rows, K_max]: sum over each macro's tokens of weight * value (0 for the macros a row does not have)."""
    out = torch.zeros(segment_ids.shape[0], max(int(segment_ids.max()) + 1, 1), dtype=torch.float64)
    return out.scatter_add(1, segment_ids.clamp(min=0), values.double() * weights * (segment_ids >= 0))


def macro_gae(rewards: torch.Tensor, values: torch.Tensor, num_macros: torch.Tensor, gamma: float,
              lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over macro steps (the official trlx-style recursion, per row): delta_k = R_k + gamma V_{k+1} - V_k with
    V = 0 after a row's last macro, A_k = delta_k + gamma lam A_{k+1}; returns (advantages, returns = A + V)."""
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    for k in reversed(range(rewards.shape[1])):
        alive = (k < num_macros).to(rewards.dtype)
        next_value = values[:, k + 1] * (k + 1 < num_macros) if k + 1 < rewards.shape[1] else 0.0
        delta = rewards[:, k] + gamma * next_value - values[:, k]
        next_advantage = (delta + gamma * lam * next_advantage) * alive
        advantages[:, k] = next_advantage
    return advantages, advantages + values


def to_tokens(per_macro_values: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """[rows, T]: each action token gets its macro's value; 0 elsewhere."""
    return per_macro_values.gather(1, segment_ids.clamp(min=0)) * (segment_ids >= 0)


def macro_advantages(token_rewards: torch.Tensor, values: torch.Tensor, segment_ids: torch.Tensor,
                     value_weights: str, reward_aggregation: str, gamma: float,
                     lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token rewards and values [rows, T] to macro rewards and values, macro GAE, and back to the tokens: each
    action token's advantage and return, and each row's number of macros. The values are weighted by sigma
    (`value_weights`); the rewards by the same sigma (`mean`: official `modeling_macro_action`, applied to both)
    or summed (`sum`)."""
    num_macros = segment_ids.max(1).values + 1
    reward_weights = macro_weights(segment_ids, value_weights if reward_aggregation == "mean" else "sum")
    macro_rewards = per_macro(token_rewards, reward_weights, segment_ids)
    macro_values = per_macro(values, macro_weights(segment_ids, value_weights), segment_ids)
    advantages, returns = macro_gae(macro_rewards, macro_values, num_macros, gamma, lam)
    return to_tokens(advantages, segment_ids), to_tokens(returns, segment_ids), num_macros


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped loss of each token, with its own ratio (official `actor_loss_fn`), [rows, T]; and whether its
    ratio was clipped. The loop weights the action tokens (`token_weights`)."""
    ratio = torch.exp((logprobs - old_logprobs) * mask)
    losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    return losses, ((ratio - 1).abs() > clip).float()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float) -> torch.Tensor:
    """Half the larger of the squared errors of each token's value and of the value clipped around the rollout's
    (official `critic_loss_fn`), [rows, T]; the loop weights the action tokens (`token_weights`)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)


def token_weights(mask: torch.Tensor, minibatch_mask: torch.Tensor, averaging: str) -> torch.Tensor:
    """Each action token's weight [rows, T] in its minibatch's mean loss, which the micro-batches' weighted sums add
    up to: `sample`, 1 / (its sample's action tokens x the minibatch's samples), the mean of each sample's token
    mean; `token`, one mean over the minibatch's action tokens. A micro-batch's own mean: `minibatch_mask = mask`."""
    if averaging == "sample":
        return mask / (mask.sum(1, keepdim=True).clamp(min=1) * len(minibatch_mask))
    return mask / minibatch_mask.sum().clamp(min=1)


def load_critic(path: str, from_reward_model: bool, device: torch.device | str = "cpu", *, bf16: bool = False,
                gradient_checkpointing: bool = False, policy_tokenizer=None, lora: LoraArgs | None = None,
                trust_remote_code: bool = False) -> torch.nn.Module:
    """A value head (one output, no bias) on a transformer, `AutoModelForTokenClassification`, FSDP2-sharded in fp32
    (`checkpoints.load_sharded`: each rank reads only its own rows of the checkpoint).

    From a sequence-classification reward model the head is its score head, read at every token instead of the
    last one only: at a sequence's last token the critic's value is the reward model's score of that sequence (as
    the official critic, `create_critic_model` from the RM checkpoint). From a causal LM the head is new and starts
    at zero, so every first value is 0 and the first advantages are the rewards' own. The critic reads the
    policy's tokens: a reward model whose vocabulary is not `policy_tokenizer`'s is refused.
    """
    from transformers import AutoConfig, AutoModelForTokenClassification

    if from_reward_model and policy_tokenizer is not None and \
            utils.load_tokenizer(path, trust_remote_code).get_vocab() != policy_tokenizer.get_vocab():
        raise SystemExit(f"--critic_init reward_model: the vocabulary of {path} is not the policy's, and the "
                         "critic reads the policy's tokens; use --critic_init policy")

    config = AutoConfig.from_pretrained(path, num_labels=1)
    config.token_classification_bias = False
    # a weight the checkpoint lacks starts at zero: at transformers' init scale a head's noise between neighbouring
    # tokens, far larger than score differences, would set the first advantages (docs/ma_ppo.md, "The critic")
    critic, missing = checkpoints.load_sharded(path, AutoModelForTokenClassification, device, bf16=bf16,
                                               gradient_checkpointing=gradient_checkpointing, config=config, lora=lora)
    if from_reward_model and missing:
        raise SystemExit(f"--critic_init reward_model: {path} has no weights for {sorted(missing)} "
                         "of a value head; it is not a one-output sequence-classification model of a head named "
                         "like transformers' own. Use --critic_init policy")
    return critic


def critic_initialisation(args: Args) -> str:
    """`--critic_init` with its default resolved: the reward model when the task has one, else the policy."""
    return args.critic_init or ("reward_model" if args.task_args.reward_model else "policy")


def dialogue_tensors(episodes: list[dialogues.Episode], pad_id: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor, torch.Tensor, int]:
    """(input_ids, attention_mask, action_mask, turn_ids) [rows, T] of whole dialogues, right-padded, and the number of
    turns left out. A row is the last prompt plus the last response; action tokens are the assistant's sampled
    tokens of every turn (`turn_ids`: their turn, -1 elsewhere). The last prompt renders earlier answers as text and
    tokenizes them again: a turn whose sampled tokens it does not reproduce (a split the tokenizer would not make, a
    dropped special token) holds tokens the policy never sampled, and is no action (counted)."""
    sequences, turns, left_out = [], [], 0
    for e in episodes:
        ids = e.prompts[-1] + e.responses[-1]
        turn = [-1] * len(ids)
        for k, (prompt, response) in enumerate(zip(e.prompts, e.responses)):
            span = slice(len(prompt), len(prompt) + len(response))
            if ids[span] != response:
                left_out += 1
                continue
            turn[span] = [k] * len(response)
        sequences.append(ids)
        turns.append(turn)
    input_ids = utils.pad_right(sequences, pad_id)
    attention_mask = utils.pad_right([[1] * len(s) for s in sequences], 0, input_ids.shape[1])
    turn_ids = utils.pad_right(turns, -1, input_ids.shape[1])
    return input_ids, attention_mask, (turn_ids >= 0).long(), turn_ids, left_out


def token_values(critic: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """V(s_t) at each column t: the value head read at column t - 1 (the state before token t), fp32."""
    out = critic(input_ids=input_ids, attention_mask=attention_mask).logits[..., 0].float()
    return torch.nn.functional.pad(out[:, :-1], (1, 0))


def steps_per_iteration(args: Args) -> int:
    """Optimizer steps per iteration (of each model): minibatches per epoch times epochs."""
    return args.num_epochs * -(-args.dialogues_per_rank // args.minibatch_dialogues)


PRESETS = {
    # the official TL;DR run (step 3 of run_gemma.sh): 256 responses per optimizer step (1 per device x 32
    # accumulation steps x 8 GPUs), one epoch, one pass over ~37k prompts (145 steps), n = 5, equal sigma, the critic
    # from the RM. Its Gemma-2B SFT policy and RM are not released: Gemma-2B-it and an RM trained from it stand in
    # (docs/ma_ppo.md)
    "ma-ppo-tldr": dict(
        task="chat", model="google/gemma-2b-it", reward_model="weqweasdas/RM-Gemma-2B", critic_init="reward_model",
        dataset="trl-lib/tldr", prompt_column="prompt", user="dataset", horizon=1, num_eval_prompts=2000,
        termination="ngram", ngram=5, value_weights="equal", reward_aggregation="mean", loss_averaging="sample",
        kl_coef=0.05, reward_clip=2.5, gamma=1.0, lam=0.95, clip_eps=0.2, value_clip=0.2, temperature=0.8,
        max_new_tokens=512, max_prompt_tokens=512, num_iterations=145, dialogues_per_rank=32,
        minibatch_dialogues=32, micro_batch_dialogues=4, num_epochs=1, lr=1.5e-5, critic_lr=1.5e-5,
        lr_schedule="linear", warmup_ratio=0.05, weight_decay=0.1, adam_betas=(0.9, 0.95), max_grad_norm=1.0,
        seed=1234, eval_every=15, save_every=15),
}
"""The official run as flag values: `--preset NAME`, then any flag to override one of them (the models too)."""


def check_args(args: Args) -> None:
    """Flags that cannot work are refused before anything loads."""
    problems = [message for bad, message in [
        (args.temperature <= 0, "--temperature must be > 0: log-probs divide the logits by it"),
        (args.termination not in TERMINATION_RULES,
         f"--termination {args.termination!r}: choose one of {', '.join(TERMINATION_RULES)}"),
        (args.ngram < 1, "--ngram must be at least 1"),
        (min(args.random_lengths, default=1) < 1 or args.random_repeats < 1,
         "--random_lengths and --random_repeats must be at least 1"),
        (args.kl_coef < 0, "--kl_coef must be >= 0: a negative penalty would reward drifting from the reference"),
        (args.reward_clip <= 0, "--reward_clip must be > 0: the score is clipped to [-reward_clip, reward_clip]"),
        (not 0 <= args.gamma <= 1, "--gamma must be in [0, 1]: it discounts the next macro step's value"),
        (not 0 <= args.lam <= 1, "--lam must be in [0, 1]: it weighs the later macro steps' TD errors"),
        (args.clip_eps <= 0, "--clip_eps must be > 0: the ratio is clipped to [1 - clip_eps, 1 + clip_eps]"),
        (args.value_clip <= 0, "--value_clip must be > 0: the values are clipped to the rollout's +- value_clip"),
        (min(args.lr, args.critic_lr) <= 0, "--lr and --critic_lr must be > 0"),
        (not 0 <= args.warmup_ratio <= 1, "--warmup_ratio must be in [0, 1]"),
        (args.weight_decay < 0, "--weight_decay must be >= 0"),
        (args.max_grad_norm <= 0, "--max_grad_norm must be > 0: gradients are clipped to this norm"),
        (min(args.dialogues_per_rank, args.minibatch_dialogues, args.micro_batch_dialogues, args.num_epochs,
             args.num_iterations) < 1, "batch sizes, --num_epochs and --num_iterations must be at least 1"),
        (args.minibatch_dialogues >= 1  # (a minibatch of 0 is refused above)
         and not 0 <= args.critic_warmup_steps < steps_per_iteration(args) * args.num_iterations,
         "--critic_warmup_steps must be >= 0 and below the run's optimizer steps: the actor must train at least once"),
        (args.critic_init == "reward_model" and args.task_args.reward_model is None,
         "--critic_init reward_model needs the task's --reward_model to start the critic from"),
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
    task, tokenizer = run.load_task(f"macro actions: {args.termination}"
                                    + (f" n={args.ngram}" if args.termination == "ngram" else ""))
    horizon = task.horizon
    # a row is a whole dialogue whose every answer gets logits; the critic is counted at the actor's size
    plan = run.check_memory(rows=args.micro_batch_dialogues, sequence_tokens=run.dialogue_tokens,
                            response_tokens=run.dialogue_tokens, reference=True, critic=True)

    # models: actor, critic (a value head on a transformer), frozen reference, each sharded with FSDP2 as it loads
    # (with --lora_rank: adapters on frozen bases, each its own; the reference is the actor with its adapters off)
    actor = checkpoints.load_sharded_causal_lm(run.policy_path, device, bf16=args.run.bf16, lora=args.lora,
                                               gradient_checkpointing=args.run.gradient_checkpointing)
    critic_from_rm = critic_initialisation(args) == "reward_model"  # as the official critic
    critic = load_critic(args.task_args.reward_model if critic_from_rm else run.policy_path, critic_from_rm, device,
                         bf16=args.run.bf16, gradient_checkpointing=args.run.gradient_checkpointing, lora=args.lora,
                         policy_tokenizer=tokenizer, trust_remote_code=args.task_args.trust_remote_code)
    reference = checkpoints.load_reference(actor, run.policy_path, device, bf16=args.run.bf16)
    # each model's schedule over its own steps: the actor takes none during the critic's warmup
    steps = args.num_iterations * steps_per_iteration(args)
    optimizers, schedulers = {}, {}
    for name, model, lr, model_steps in (("actor", actor, args.lr, steps - args.critic_warmup_steps),
                                         ("critic", critic, args.critic_lr, steps)):
        optimizers[name] = torch.optim.AdamW(utils.trainable(model), lr=lr, betas=args.adam_betas,
                                             weight_decay=args.weight_decay)
        schedulers[name] = lifecycle.lr_scheduler(optimizers[name], args.lr_schedule, args.warmup_ratio, model_steps,
                                                  args.run)
    trained = {"actor": (actor, optimizers["actor"]), "critic": (critic, optimizers["critic"])}
    engine = run.start_engine(plan, tokenizer)  # the actor's rollout engine, colocated on this rank
    run.resume_or_start(trained, schedulers, serve="actor")

    for iteration in run.iterations():
        rng = np.random.default_rng([seed, iteration, rank])

        # 1. play dialogues with pi_theta and the simulated user to the horizon
        openings = [task.train[i] for i in rng.choice(len(task.train), args.dialogues_per_rank)]
        episodes = dialogues.rollout_dialogues([copy.deepcopy(e) for e in openings], engine, tokenizer=tokenizer,
                                               user=task.user, horizons=[horizon] * len(openings),
                                               max_tokens=args.max_new_tokens, temperature=args.temperature,
                                               seed=(seed, iteration, rank))
        if args.run.engine_sleep:  # its device memory goes to the trainer until the next weight sync wakes it
            engine.sleep()
        run.lap("rollout")
        run.count_generated(episodes, [0] * len(episodes))
        run.spent["reward_calls"] += len(episodes)
        if args.run.schedule_over == "token_budget":
            for scheduler in schedulers.values():
                scheduler.start_iteration(*run.tokens_this_iteration(), steps_per_iteration(args))

        # 2. the score of each finished dialogue, clipped (official clip_reward_value)
        scores = torch.tensor(task.reward(episodes), dtype=torch.float64)
        if utils.sum_over_ranks({"finite": torch.isfinite(scores).sum().item()})["finite"] == 0:
            raise SystemExit(f"iteration {iteration}: the reward is NaN for every dialogue on every rank")
        finite = torch.isfinite(scores)
        scores = torch.nan_to_num(scores, nan=0.0).clamp(-args.reward_clip, args.reward_clip)
        run.lap("reward")

        # 3. old log-probs, reference log-probs and values from training forwards (never from the engine)
        input_ids, attention_mask, action_mask, turn_ids, retokenized = dialogue_tensors(episodes,
                                                                                         tokenizer.pad_token_id)
        chunk = args.micro_batch_dialogues
        with torch.no_grad():
            old_lp = utils.token_logprobs_in_chunks(actor, input_ids.to(device), attention_mask.to(device),
                                                    action_mask.to(device), args.temperature, chunk).double()
            ref_lp = utils.token_logprobs_in_chunks(reference, input_ids.to(device), attention_mask.to(device),
                                                    action_mask.to(device), args.temperature, chunk).double()
            old_values = torch.cat([token_values(critic, input_ids[i : i + chunk].to(device),
                                                 attention_mask[i : i + chunk].to(device)).cpu()
                                    for i in range(0, len(input_ids), chunk)]).double() * action_mask
        run.lap("old_logprobs")

        # 4. per-token rewards, macro actions, macro GAE, broadcast back to the tokens
        token_rewards = -args.kl_coef * (old_lp - ref_lp) * action_mask
        final_token = action_mask.shape[1] - 1 - action_mask.flip(1).argmax(1)  # each row's last action token
        token_rewards[torch.arange(len(episodes)), final_token] += scores * finite  # a NaN score leaves only the KL
        texts = [[tokenizer.decode([t]) for t in row] for row in input_ids.tolist()] \
            if args.termination == "punctuation" else None
        generator = torch.Generator().manual_seed(utils.sample_seed(seed, iteration, rank, "macro"))
        segment_ids = torch.stack([macro_segments(
            turn_ids[i], args.termination, args.ngram, nll=-(ref_lp[i]) if args.termination == "perplexity" else None,
            texts=texts[i] if texts else None, random_lengths=args.random_lengths,
            random_repeats=args.random_repeats, generator=generator,
            isolate_last_token=args.isolate_last_token) for i in range(len(episodes))])
        token_advantages, token_returns, num_macros = macro_advantages(
            token_rewards, old_values, segment_ids, value_weights=args.value_weights,
            reward_aggregation=args.reward_aggregation, gamma=args.gamma, lam=args.lam)

        # 5. PPO epochs over minibatches: the actor's clipped loss, the critic's clipped regression; in the critic's
        # warmup (the run's first --critic_warmup_steps steps) the actor's loss is only measured
        actor_losses, critic_losses, clip_fractions = [], [], []
        step = (iteration - 1) * steps_per_iteration(args)
        for epoch in range(args.num_epochs):
            shuffle = torch.Generator().manual_seed(utils.sample_seed(seed, iteration, rank, epoch))
            order = torch.randperm(len(episodes), generator=shuffle)
            for mb_start in range(0, len(episodes), args.minibatch_dialogues):
                mb = order[mb_start : mb_start + args.minibatch_dialogues]
                actor_waits = step < args.critic_warmup_steps
                for micro_start in range(0, len(mb), args.micro_batch_dialogues):
                    rows = mb[micro_start : micro_start + args.micro_batch_dialogues]
                    ids, attention, mask = (t[rows].to(device) for t in (input_ids, attention_mask, action_mask))
                    with torch.set_grad_enabled(not actor_waits):
                        logprobs = utils.token_logprobs(actor, ids, attention, mask, args.temperature)
                        per_token, clipped = policy_loss(logprobs, old_lp[rows].to(device).float(),
                                                         token_advantages[rows].to(device).float(), mask,
                                                         args.clip_eps)
                    per_token_v = value_loss(token_values(critic, ids, attention), old_values[rows].to(device).float(),
                                             token_returns[rows].to(device).float(), args.value_clip)
                    # the minibatch's mean loss, a micro-batch at a time (gradients accumulate)
                    weight = token_weights(mask, action_mask[mb].to(device), args.loss_averaging)
                    if not actor_waits:
                        (weight * per_token).sum().backward()
                    (weight * per_token_v).sum().backward()
                    own_mean = token_weights(mask, mask, args.loss_averaging)  # the micro-batch's own, for the log
                    actor_losses.append((own_mean * per_token).sum().item())
                    critic_losses.append((own_mean * per_token_v).sum().item())
                    clip_fractions.append(((clipped * mask).sum() / mask.sum().clamp(min=1)).item())
                stepping = ["critic"] if actor_waits else ["actor", "critic"]
                grad_norms = {name: utils.clip_grad_norm(model, args.max_grad_norm) if name in stepping else 0.0
                              for name, (model, _) in trained.items()}
                for name in stepping:
                    optimizers[name].step()
                    schedulers[name].step()
                    optimizers[name].zero_grad(set_to_none=True)
                step += 1
        run.lap("train")

        # 6. push the actor's new weights into this rank's engine, and check that they arrived
        sync_metrics = run.sync_weights(actor)
        run.lap("sync")

        # record metrics (averaged over ranks; counts summed); the run adds the budget and the evaluation
        actions = action_mask.bool()
        residual = (token_returns - old_values)[actions]
        macro_lengths = [int((segment_ids[i] == k).sum()) for i in range(len(episodes)) for k in range(num_macros[i])]
        metrics = utils.mean_over_ranks({
            "reward/score": scores[finite].tolist(), "reward/kl": ((old_lp - ref_lp) * action_mask).sum(1).tolist(),
            "loss/policy": actor_losses, "loss/value": critic_losses, "policy/clip_fraction": clip_fractions,
            "policy/entropy": (-old_lp[actions]).tolist(), "policy/actor_grad_norm": grad_norms["actor"],
            "policy/critic_grad_norm": grad_norms["critic"], "value/error": (residual**2).tolist(),
            "macro/length": macro_lengths, "macro/per_dialogue": num_macros.tolist(),
            "data/turns_played": [e.turns for e in episodes], **{f"sync/{k}": v for k, v in sync_metrics.items()}})
        # explained variance from the residual's variance: a value head off by a constant (a fresh one) explains all
        variance = utils.mean_over_ranks({"returns": token_returns[actions].tolist(),
                                          "returns_sq": (token_returns[actions] ** 2).tolist(),
                                          "residual": residual.tolist()})
        metrics["value/explained_variance"] = 1 - (metrics["value/error"] - variance["residual"] ** 2) / max(
            variance["returns_sq"] - variance["returns"] ** 2, 1e-12)
        metrics.update(utils.sum_over_ranks({"skipped/nan_reward_dialogues": (~finite).sum().item(),
                                             "skipped/context_full_dialogues": sum(e.context_full for e in episodes),
                                             "skipped/retokenized_turns": retokenized}))
        metrics["policy/lr"] = 0.0 if actor_waits else schedulers["actor"].get_last_lr()[0]
        run.end_iteration(iteration, metrics, {"reward": metrics["reward/score"], "kl": metrics["reward/kl"],
                                               "macros": metrics["macro/per_dialogue"],
                                               "clip": metrics["policy/clip_fraction"]}, trained, schedulers)

    run.summary()
