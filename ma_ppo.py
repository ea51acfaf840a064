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
critic a clipped regression of each token's value onto its macro's return, each loss a sample's token mean averaged
over samples. The critic starts from the task's reward model when it has one (its score head becomes the value
head), else from the policy with a new value head at zero. With one token per macro (`--ngram 1`) this is
token-level PPO exactly. In a dialogue with the simulated user the assistant's tokens of every turn are actions and
the user's are not; the reward comes at the end of the dialogue.

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
import time
from typing import Annotated, Literal

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

CLAUSE_ENDS = (".", ",", ";", ":", "!", "?", "\n")
"""`--termination punctuation` ends a macro action after a token whose text ends with one of these"""


@dataclasses.dataclass
class Args:
    # experiment
    exp_name: str = "ma_ppo"
    """name of this experiment, part of the run name"""
    seed: int = 1
    """seed of the experiment (data order, sampling, random macro lengths)"""
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
    """start from the official run's configuration (`PRESETS`: ma-ppo-tldr); flags given with it override it"""

    # the task: openings, a simulated user, a reward, a horizon (flags of tasks.TaskArgs)
    task_args: Annotated[TaskArgs, tyro.conf.arg(name="")] = dataclasses.field(default_factory=TaskArgs)

    # models and engines
    model: str | None = None
    """actor: hub id or folder; default the task's own policy, else the embedded SmolLM2 (paper: Gemma SFT)"""
    critic_init: Literal["reward_model", "policy"] | None = None
    """the critic's initial weights: the task's `--reward_model` (its score head becomes the value head, so the
    critic starts out predicting the score; official code: critic = the RM checkpoint) or the policy's with a fresh
    value head; default `reward_model` when the task has one, else `policy`"""
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
    """vLLM KV cache per engine and rank, in GiB; default: on a GPU what `engine_memory_share` leaves, on a CPU 0.25"""
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
    loss_averaging: Literal["sample", "token"] = "sample"
    """both losses: the mean over a minibatch's samples of each sample's token mean (official run: one sample per
    device, gradients accumulated and averaged over 32 steps and 8 devices), or one mean over all its tokens"""
    critic_warmup_steps: int = 0
    """the first this-many optimizer steps train the critic alone: the actor takes no step (its learning-rate
    schedule starts after them), so the advantages come from a critic that has fitted the returns first"""
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
    """the rollout engine's context: a dialogue whose next turn would not fit ends there (counted in
    `skipped/context_full_dialogues`); default the longest dialogue the length flags allow, max_prompt_tokens + H x
    (max_new_tokens + user_max_tokens + 64), which must fit the model's positions"""
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
    token_budget: int | None = None
    """stop after the iteration in which the generated tokens (policy and user, all ranks) reach this many, so that
    methods can be compared at equal generation cost"""
    schedule_over: Literal["iterations", "token_budget"] = "iterations"
    """what the LR schedule spans: the run's optimizer steps (`--num_iterations`), or `--token_budget`: each step's
    LR is the schedule at the share of the budget spent (utils.BudgetSchedule), so that methods whose iterations
    cost different numbers of tokens all decay, by one rule, to the end of the same budget; the actor takes no
    step in the critic's warmup, and then starts at the share reached"""

    # bookkeeping
    eval_every: int = 2
    """evaluate every this many iterations (and before the first and after the last)"""
    save_every: int = 2
    """checkpoint every this many iterations (and after the last)"""


PRESETS = {
    # the official TL;DR run (step 3 of run_gemma.sh, Gemma-2B): 256 responses per optimizer step (1 per device x
    # 32 accumulation steps x 8 GPUs), one PPO epoch, one pass over the RL prompts (~37k: 145 steps), n = 5, equal
    # sigma for values and rewards, the critic from the reward model. Its SFT policy and reward model (Gemma-2B
    # trained on TL;DR by steps 1 and 2) are not released: Gemma-2B-it and a reward model trained from it (general
    # preferences, the policy's vocabulary) stand in, on the Reddit TL;DR posts of trl-lib/tldr (docs/ma_ppo.md)
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
    starts, run, budget, nll_sum = set(), 0, None, 0.0
    for k, p in enumerate(positions):
        new_turn = k == 0 or turn_ids[p] != turn_ids[positions[k - 1]]
        macro = OpenMacro(run, nll_sum, budget, None if nll is None else float(nll[p]),
                          None if texts is None or k == 0 else texts[positions[k - 1]], ngram)
        if new_turn or ends(macro):
            starts.add(p)
            run, nll_sum = 0, 0.0
            budget = lengths.pop(0) if lengths else None
        run += 1
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
    macros = int(segment_ids.max()) + 1
    out = torch.zeros(segment_ids.shape[0], max(macros, 1), dtype=torch.float64)
    index = segment_ids.clamp(min=0)
    return out.scatter_add(1, index, (values.double() * weights * (segment_ids >= 0)))


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


def masked_mean(losses: torch.Tensor, mask: torch.Tensor, averaging: str) -> torch.Tensor:
    """The mean of per-token `losses` [rows, T] over the action tokens: each row's token mean, then the mean over
    rows (`sample`), or one mean over every token of the rows (`token`)."""
    if averaging == "sample":
        return ((losses * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    return (losses * mask).sum() / mask.sum().clamp(min=1)


def micro_batch_share(mask: torch.Tensor, minibatch_mask: torch.Tensor, averaging: str) -> torch.Tensor:
    """A micro-batch's weight in its minibatch's mean (gradients accumulate over micro-batches): its share of the
    minibatch's rows (`sample`) or of its action tokens (`token`)."""
    if averaging == "sample":
        return torch.tensor(len(mask) / len(minibatch_mask))
    return mask.sum() / minibatch_mask.sum().clamp(min=1)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float, averaging: str = "sample") -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped loss with per-token ratios (official `actor_loss_fn`), averaged as `masked_mean`; also the
    share of action tokens whose ratio was clipped."""
    ratio = torch.exp((logprobs - old_logprobs) * mask)
    losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    clipped = ((ratio - 1).abs() > clip).float()
    return masked_mean(losses, mask, averaging), (clipped * mask).sum() / mask.sum().clamp(min=1)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float, averaging: str = "sample") -> torch.Tensor:
    """Half the larger of the squared errors of the value and of the value clipped around the rollout's (official
    `critic_loss_fn`), averaged as `masked_mean`."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    losses = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * masked_mean(losses, mask, averaging)


def load_critic(path: str, from_reward_model: bool, device: torch.device | str = "cpu", *, bf16: bool = False,
                gradient_checkpointing: bool = False) -> torch.nn.Module:
    """A value head (one output, no bias) on a transformer, `AutoModelForTokenClassification`, FSDP2-sharded in fp32
    (`checkpoints.load_sharded`: each rank reads only its own rows of the checkpoint).

    From a sequence-classification reward model the head is its score head, read at every token instead of the
    last one only: at a sequence's last token the critic's value is the reward model's score of that sequence (as
    the official critic, `create_critic_model` from the RM checkpoint). From a causal LM the head is new and starts
    at zero, so every first value is 0 and the first advantages are the rewards' own.
    """
    from transformers import AutoConfig, AutoModelForTokenClassification

    config = AutoConfig.from_pretrained(path, num_labels=1)
    config.token_classification_bias = False
    # a weight the checkpoint lacks starts at zero: a head drawn at transformers' init scale gives values that differ
    # between neighbouring tokens by far more than scores differ between dialogues, so its noise, not the score,
    # would set the first advantages (measured in docs/ma_ppo.md, "The critic")
    critic, missing = checkpoints.load_sharded(path, AutoModelForTokenClassification, device, bf16=bf16,
                                               gradient_checkpointing=gradient_checkpointing, config=config)
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
    earlier turns left out. A row is its last prompt plus its last response; action tokens are the assistant's
    sampled tokens of every turn, `turn_ids` their turn (-1 elsewhere). Each turn's prompt is the dialogue so far
    rendered and tokenized again, so an earlier answer appears there as its text's tokens: where those are not the
    sampled ones (a split the tokenizer would not make, a special token dropped from the text), the turn's span
    holds tokens the policy never sampled, and the turn is no action (counted)."""
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


def fresh(episode: dialogues.Episode) -> dialogues.Episode:
    return dialogues.Episode(copy.deepcopy(episode.messages), copy.deepcopy(episode.info))


def steps_per_iteration(args: Args) -> int:
    """Optimizer steps per iteration (of each model): minibatches per epoch times epochs."""
    return args.num_epochs * -(-args.dialogues_per_rank // args.minibatch_dialogues)


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
        (args.schedule_over == "token_budget" and args.token_budget is None,
         "--schedule_over token_budget needs --token_budget"),
        (args.resume and args.run_name is None, "--resume needs --run_name of the run to continue"),
        (args.minibatch_dialogues >= 1  # (a minibatch of 0 is refused above)
         and not 0 <= args.critic_warmup_steps < steps_per_iteration(args) * args.num_iterations,
         "--critic_warmup_steps must be >= 0 and below the run's optimizer steps: the actor must train at least once"),
        (args.critic_init == "reward_model" and args.task_args.reward_model is None,
         "--critic_init reward_model needs the task's --reward_model to start the critic from"),
    ] if bad]
    if problems:
        raise SystemExit("\n".join(problems))
    task_factory(args.task_args.task)


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

    # the task and the policy it is played with
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
    utils.print0(f"task {args.task_args.task}: {len(task.train)} training and {len(task.eval)} evaluation openings "
                 f"({too_long} and {too_long_eval} over --max_prompt_tokens, skipped), horizon {horizon}; "
                 f"macro actions: {args.termination}" + (f" n={args.ngram}" if args.termination == "ngram" else ""))

    # the memory plan of this rank (the actor, its engine, the critic counted at the actor's size, the reference, the
    # task's reward model and user engine), checked on CUDA before anything large loads; it sizes the engine's share
    try:  # the task checked its own models already; a plug-in task's policy is checked here
        max_model_len = dialogues.context_window(
            policy_path, max_prompt_tokens=args.max_prompt_tokens, horizon=horizon, max_new_tokens=args.max_new_tokens,
            user_max_tokens=args.task_args.user_max_tokens, max_context_tokens=args.max_context_tokens)
    except ValueError as e:
        raise SystemExit(str(e))
    turn_tokens = args.max_new_tokens + args.task_args.user_max_tokens + dialogues.TEMPLATE_TOKENS_PER_TURN
    # a row is a whole dialogue, right-padded, whose answers of every turn get logits: from the shortest opening's
    # first answer to the longest dialogue's end, bounded here by the whole dialogue
    dialogue_tokens = min(max(len(utils.chat_token_ids(tokenizer, e.messages, True)) for e in task.train)
                          + horizon * turn_tokens, max_model_len)
    plan = memory_plan.plan_and_check(
        model_path=policy_path, device=device, world_size=world_size, bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing, kv_cache_bytes=kv_cache_bytes,
        sync_bucket_mb=args.sync_bucket_mb, rows=args.micro_batch_dialogues, sequence_tokens=dialogue_tokens,
        response_tokens=dialogue_tokens, reference=True, engine_memory_share=args.engine_memory_share,
        engine_sleep=args.engine_sleep, max_model_len=max_model_len, critic=True,
        reward_model=args.task_args.reward_model, trust_remote_code=args.task_args.trust_remote_code,
        user_model=utils.resolve_model_path(args.task_args.user_model or policy_path) if task.engines else None)

    # models: actor, critic (a value head on a transformer), frozen reference, each sharded with FSDP2 as it loads
    actor = checkpoints.load_sharded_causal_lm(policy_path, device, bf16=args.bf16,
                                               gradient_checkpointing=args.gradient_checkpointing)
    # the critic from the reward model (official) reads the policy's tokens: the two must share a vocabulary
    critic_from_rm = critic_initialisation(args) == "reward_model"
    critic_path = args.task_args.reward_model if critic_from_rm else policy_path
    if critic_from_rm and utils.load_tokenizer(critic_path, args.task_args.trust_remote_code).get_vocab() \
            != tokenizer.get_vocab():
        raise SystemExit(f"--critic_init reward_model: the vocabulary of {critic_path} is not the policy's, and the "
                         "critic reads the policy's tokens; use --critic_init policy")
    critic = load_critic(critic_path, critic_from_rm, device, bf16=args.bf16,
                         gradient_checkpointing=args.gradient_checkpointing)
    reference = checkpoints.load_sharded_causal_lm(policy_path, device, bf16=args.bf16)
    reference.requires_grad_(False)
    # each model's schedule over its own steps: the actor takes none during the critic's warmup
    steps = args.num_iterations * steps_per_iteration(args)
    optimizers, schedulers = {}, {}
    for name, model, lr, model_steps in (("actor", actor, args.lr, steps - args.critic_warmup_steps),
                                         ("critic", critic, args.critic_lr, steps)):
        optimizers[name] = torch.optim.AdamW(model.parameters(), lr=lr, betas=args.adam_betas,
                                             weight_decay=args.weight_decay)
        schedulers[name] = (
            utils.BudgetSchedule(optimizers[name], args.lr_schedule, args.warmup_ratio, args.token_budget)
            if args.schedule_over == "token_budget" else torch.optim.lr_scheduler.LambdaLR(
                optimizers[name], utils.lr_lambda(args.lr_schedule, model_steps, args.warmup_ratio)))
    trained = {"actor": (actor, optimizers["actor"]), "critic": (critic, optimizers["critic"])}

    # the actor's rollout engine, colocated on this rank
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
        saved = checkpoints.load_checkpoint(checkpoint, trained)
        for name in schedulers:
            schedulers[name].load_state_dict(saved["schedulers"][name])
        initial_scores, start_iteration, spent = saved["initial_scores"], saved["iteration"] + 1, saved["spent"]
        logger.truncate_after(saved["iteration"])
        engines.sync_weights(engine, actor, probe_ids, probe_answer_start, device, args.sync_tolerance,
                             args.sync_bucket_mb)
        utils.print0(f"resumed from {checkpoint}")
    else:
        if args.resume:
            utils.print0(f"--resume: no complete checkpoint in {run_dir}, starting from the beginning")
            logger.truncate_after(-1)
        start_iteration, spent = 1, {"policy_tokens": 0, "user_tokens": 0, "reward_calls": 0}
        engines.check_sync(engine, actor, probe_ids, probe_answer_start, device, args.sync_tolerance)
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

        # 1. play dialogues with pi_theta and the simulated user to the horizon
        t0 = time.time()
        openings = [task.train[i] for i in rng.choice(len(task.train), args.dialogues_per_rank)]
        episodes = dialogues.rollout_dialogues([fresh(e) for e in openings], engine, tokenizer=tokenizer,
                                               user=task.user, horizons=[horizon] * len(openings),
                                               max_tokens=args.max_new_tokens, temperature=args.temperature,
                                               seed=(args.seed, iteration, rank))
        if args.engine_sleep:  # its device memory goes to the trainer until the next weight sync wakes it
            engine.sleep()
        timings["rollout"] = time.time() - t0
        before = spent["policy_tokens"] + spent["user_tokens"]
        policy_tokens, user_tokens = dialogues.generated_tokens(episodes, tokenizer, [0] * len(episodes))
        spent["policy_tokens"] += policy_tokens
        spent["user_tokens"] += user_tokens
        spent["reward_calls"] += len(episodes)
        if args.schedule_over == "token_budget":
            tokens = utils.sum_over_ranks({"before": before, "after": spent["policy_tokens"] + spent["user_tokens"]})
            for name in schedulers:
                schedulers[name].start_iteration(tokens["before"], tokens["after"], steps_per_iteration(args))

        # 2. the score of each finished dialogue, clipped (official clip_reward_value)
        t0 = time.time()
        scores = torch.tensor(task.reward(episodes), dtype=torch.float64)
        if utils.sum_over_ranks({"finite": torch.isfinite(scores).sum().item()})["finite"] == 0:
            raise SystemExit(f"iteration {iteration}: the reward is NaN for every dialogue on every rank")
        finite = torch.isfinite(scores)
        scores = torch.nan_to_num(scores, nan=0.0).clamp(-args.reward_clip, args.reward_clip)
        timings["reward"] = time.time() - t0

        # 3. old log-probs, reference log-probs and values from training forwards (never from the engine)
        t0 = time.time()
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
        timings["old_logprobs"] = time.time() - t0

        # 4. per-token rewards, macro actions, macro GAE, broadcast back to the tokens
        token_rewards = -args.kl_coef * (old_lp - ref_lp) * action_mask
        last = action_mask.shape[1] - 1 - action_mask.flip(1).argmax(1)  # each row's last action token
        token_rewards[torch.arange(len(episodes)), last] += scores * finite  # a NaN score leaves only the KL
        texts = [[tokenizer.decode([t]) for t in row] for row in input_ids.tolist()] \
            if args.termination == "punctuation" else None
        generator = torch.Generator().manual_seed(utils.sample_seed(args.seed, iteration, rank, "macro"))
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
        t0 = time.time()
        actor_losses, critic_losses, clip_fractions = [], [], []
        step = (iteration - 1) * steps_per_iteration(args)
        for epoch in range(args.num_epochs):
            shuffle = torch.Generator().manual_seed(utils.sample_seed(args.seed, iteration, rank, epoch))
            order = torch.randperm(len(episodes), generator=shuffle)
            for mb_start in range(0, len(episodes), args.minibatch_dialogues):
                mb = order[mb_start : mb_start + args.minibatch_dialogues]
                frozen = step < args.critic_warmup_steps
                for micro_start in range(0, len(mb), args.micro_batch_dialogues):
                    rows = mb[micro_start : micro_start + args.micro_batch_dialogues]
                    ids, attention, mask = input_ids[rows].to(device), attention_mask[rows].to(device), \
                        action_mask[rows].to(device)
                    # gradients accumulate over micro-batches: each weighs by its share of the minibatch's mean
                    share = micro_batch_share(action_mask[rows], action_mask[mb], args.loss_averaging)
                    with torch.set_grad_enabled(not frozen):
                        logprobs = utils.token_logprobs(actor, ids, attention, mask, args.temperature)
                        loss, clipped = policy_loss(logprobs, old_lp[rows].to(device).float(),
                                                    token_advantages[rows].to(device).float(), mask, args.clip_eps,
                                                    args.loss_averaging)
                    if not frozen:
                        (loss * share).backward()
                    values = token_values(critic, ids, attention)
                    v_loss = value_loss(values, old_values[rows].to(device).float(),
                                        token_returns[rows].to(device).float(), mask, args.value_clip,
                                        args.loss_averaging)
                    (v_loss * share).backward()
                    actor_losses.append(loss.item())
                    critic_losses.append(v_loss.item())
                    clip_fractions.append(clipped.item())
                stepping = ["critic"] if frozen else ["actor", "critic"]
                grad_norms = {name: utils.clip_grad_norm(model, args.max_grad_norm) if name in stepping else 0.0
                              for name, (model, _) in trained.items()}
                for name in stepping:
                    optimizers[name].step()
                    schedulers[name].step()
                    optimizers[name].zero_grad(set_to_none=True)
                step += 1
        timings["train"] = time.time() - t0

        # 6. push the actor's new weights into this rank's engine, and check that they arrived
        t0 = time.time()
        sync_metrics = engines.sync_weights(engine, actor, probe_ids, probe_answer_start, device,
                                            args.sync_tolerance, args.sync_bucket_mb)
        timings["sync"] = time.time() - t0

        # TRY NOT TO MODIFY: record metrics (averaged over ranks), evaluate, checkpoint
        actions = action_mask.bool()
        residual = (token_returns - old_values)[actions]
        macro_lengths = [int((segment_ids[i] == k).sum()) for i in range(len(episodes)) for k in range(num_macros[i])]
        metrics = utils.mean_over_ranks({
            "reward/score": scores[finite].tolist(), "reward/kl": ((old_lp - ref_lp) * action_mask).sum(1).tolist(),
            "loss/policy": actor_losses, "loss/value": critic_losses, "policy/clip_fraction": clip_fractions,
            "policy/entropy": (-old_lp[actions]).tolist(), "policy/actor_grad_norm": grad_norms["actor"],
            "policy/critic_grad_norm": grad_norms["critic"], "value/error": (residual**2).tolist(),
            "macro/length": macro_lengths, "macro/per_dialogue": num_macros.tolist(),
            "data/turns_played": [e.turns for e in episodes], **{f"sync/{k}": v for k, v in sync_metrics.items()},
            **{f"time/{k}": v for k, v in timings.items()}})
        # explained variance as usual: the residual's variance, not its mean square, so a value head that is off
        # by a constant (a fresh head before it has fitted the mean return) is not counted as unexplained variance
        variance = utils.mean_over_ranks({"returns": token_returns[actions].tolist(),
                                          "returns_sq": (token_returns[actions] ** 2).tolist(),
                                          "residual": residual.tolist()})
        metrics["value/explained_variance"] = 1 - (metrics["value/error"] - variance["residual"] ** 2) / max(
            variance["returns_sq"] - variance["returns"] ** 2, 1e-12)
        metrics.update(utils.sum_over_ranks({"skipped/nan_reward_dialogues": (~finite).sum().item(),
                                             "skipped/context_full_dialogues": sum(e.context_full for e in episodes),
                                             "skipped/retokenized_turns": retokenized,
                                             **{f"budget/{k}": v for k, v in spent.items()}}))
        metrics["budget/generated_tokens"] = metrics["budget/policy_tokens"] + metrics["budget/user_tokens"]
        metrics["policy/lr"] = 0.0 if frozen else schedulers["actor"].get_last_lr()[0]
        over_budget = args.token_budget is not None and metrics["budget/generated_tokens"] >= args.token_budget
        last = iteration == args.num_iterations or over_budget
        if iteration % args.eval_every == 0 or last:
            metrics.update(dialogues.eval_metrics(evaluate(), initial_scores))
        logger.log(metrics, iteration=iteration)
        shown = {"reward": metrics["reward/score"], "kl": metrics["reward/kl"], "macros": metrics["macro/per_dialogue"],
                 "clip": metrics["policy/clip_fraction"]}
        if f"eval/score_turn{horizon}" in metrics:
            shown[f"eval_turn{horizon}"] = metrics[f"eval/score_turn{horizon}"]
            if rank == 0:
                utils.plot_curves(logger.read(), os.path.join(run_dir, "curves.png"))
        budget_progress = None if args.token_budget is None else (metrics["budget/generated_tokens"], args.token_budget)
        utils.print0(utils.progress_line(iteration, args.num_iterations, started, start_iteration - 1, shown, timings,
                                         budget_progress))
        if iteration % args.save_every == 0 or last:
            checkpoints.save_checkpoint(run_dir, iteration, trained, {
                "iteration": iteration, "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
                "initial_scores": initial_scores, "spent": spent}, tokenizer, export="actor",
                bucket_bytes=int(args.sync_bucket_mb * 2**20))
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
