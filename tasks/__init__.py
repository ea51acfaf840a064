"""Tasks: what a multi-turn script trains on. A `Task` holds dialogue openings, a simulated user, a reward
and a horizon H; every multi-turn script gets one from `load_task` and never builds one itself.

Built in: `guess_number` (tasks/guess_number.py: the verifiable game), `chat` (tasks/chat.py: dataset openings,
a simulated user, a reward model), `digits` (tasks/digits.py: one turn of 48 digits scored as a whole), `harvest`
(tasks/harvest.py: a game whose score at every turn is informative but myopic) and `allowance` (tasks/allowance.py:
the harvest game's rules for a chat model, in words). A fork's
own task is `--task module:function` or `--task path/file.py:function`: a function with keyword parameters (any
of the `TaskArgs` fields and of the run's own values that `load_task` passes: seed, rank, device, bf16, model,
max_prompt_tokens, max_new_tokens, ...) that returns a `Task`. It is called exactly as the built-in ones are.
A parameter of its own (say `difficulty: int = 3`) is set with `--task_arg difficulty=5` (repeatable), the value
converted to the parameter's annotated type (int, float, bool, str or a Literal of them).
"""

import dataclasses
import importlib
import importlib.util
import inspect
import os
import typing
from typing import Annotated, Callable, Literal

import tyro

import dialogues
import utils

BUILT_IN = {"guess_number": "tasks.guess_number:make_task", "chat": "tasks.chat:make_task",
            "digits": "tasks.digits:make_task", "harvest": "tasks.harvest:make_task",
            "allowance": "tasks.allowance:make_task"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Task:
    """What an algorithm needs to train on dialogues. Forks build their own and pass `--task module:function`."""

    train: list[dialogues.Episode]
    """dialogue openings (ending with the first user turn) to sample from"""
    eval: list[dialogues.Episode]
    """held-out openings for evaluation"""
    user: Callable[[list[dialogues.Episode]], list[str | None]]
    """writes the next user turn of each dialogue, or None to end it"""
    reward: Callable[[list[dialogues.Episode]], list[float]]
    """a score for each finished (or truncated) dialogue"""
    horizon: int
    """the largest number of assistant turns"""
    reference_scores: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    """known per-turn scores to read results against, e.g. {"optimal": [...], "random": [...]}"""
    policy: str | None = None
    """a policy that suits the task (a warm-started model folder), used when the script is given no model"""
    engines: list = dataclasses.field(default_factory=list)
    """rollout engines the task started (an LLM user's), for the script to close at the end"""
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    """dataset rows the task could not read, by cause (the scripts log them as `skipped/rows_<cause>`)"""
    recorded: list[dialogues.Episode] = dataclasses.field(default_factory=list)
    """whole dialogues played by some other policy (a dataset's own, the guessing game's random consistent play):
    the offline contexts of the single-turn baselines (dpo_multiturn.py --contexts offline)"""


@dataclasses.dataclass
class TaskArgs:
    task: str = "guess_number"
    """`guess_number` (verifiable: code user and reward), `chat` (dataset openings, a simulated user, a reward
    model or function), `digits` (one long answer, verifiable score), `harvest` (verifiable, an informative but
    myopic score at every turn), `allowance` (a chat model under a word allowance that grows when saved: every
    answer scored, every turn depending on the ones before), or `module:function` / `file.py:function` returning a
    `Task`"""
    task_arg: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """`name=value` for a parameter of a plug-in task's own factory, converted to its annotated type, one flag per
    parameter (`--task_arg difficulty=5 --task_arg mode=hard`)"""
    horizon: int | None = None
    """largest number of assistant turns H; default the task's own (guessing game: 3; chat: the paper's 5)"""

    # the guessing game (and the harvest game's warm start)
    guess_max: int = 7
    """the secret is a number from 1 to this (1..7 in 3 turns: binary search solves every game)"""
    warm_start_steps: int = 800
    """supervised steps that teach the game's tiny policy to play by the rules (the guessing game, the harvest
    game; trained once, cached; not run when `--model` is given)"""

    # the chat task
    dataset: str = os.path.join(REPO, "data", "prompts.jsonl")
    """first user turns: a .json/.jsonl/.parquet/.csv file, a saved dataset folder, or a hub id"""
    dataset_split: str = "train"
    """split, for hub datasets"""
    prompt_column: str = "prompt"
    """column with the first user message, or a list of messages (later user turns feed `--user dataset`)"""
    num_eval_prompts: int = 16
    """openings held out for evaluation"""
    user: Literal["llm", "server", "dataset"] = "llm"
    """who writes the user turns: an LLM on its own colocated engine, an LLM behind a vLLM OpenAI-compatible
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
    user_timeout: float = 120.0
    """seconds to wait for one answer of the user server"""
    user_retries: int = 3
    """further tries of a failed user-server request before the run stops with the server's error"""
    reward_model: str | None = None
    """a sequence-classification reward model scoring the whole dialogue (paper: RLHFlow/ArmoRM-Llama3-8B-v0.1);
    unset: `reward_function`"""
    reward_function: str = "tasks.chat:brevity_reward"
    """`module:function` or `file.py:function` scoring a dialogue (a list of messages)"""
    trust_remote_code: bool = False
    """allow the reward model's own code (needed by ArmoRM)"""
    reward_max_length: int = 4096
    """reward-model input is cut to its last this-many tokens (paper: 4096)"""


def import_function(spec: str) -> Callable:
    """`module:function` or `path/to/file.py:function`, for rewards and tasks that forks bring."""
    module_name, _, name = spec.partition(":")
    if module_name.endswith(".py") and not os.path.isfile(module_name):
        raise ValueError(f"{spec!r}: no file {module_name}")
    if module_name.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            raise ValueError(f"{spec!r}: cannot import {module_name} ({e})") from e
    if not hasattr(module, name):
        raise ValueError(f"{spec!r}: {module_name} has no {name!r}")
    return getattr(module, name)


def task_factory(name: str):
    """The function behind a task name: a built-in short name, `module:function` or `path/file.py:function`."""
    spec = BUILT_IN.get(name, name)
    if ":" not in spec:
        raise ValueError(f"unknown task {name!r}: use one of {sorted(BUILT_IN)} or module:function / file.py:function")
    return import_function(spec)


# the TaskArgs fields a factory gets when it names them; `task` picks the factory, `task_arg` sets its own parameters
TASK_FLAGS = [f.name for f in dataclasses.fields(TaskArgs) if f.name not in ("task", "task_arg")]


def converted(name: str, value: str, kind):
    """`value` as `kind` (int, float, bool, str or a Literal of them); a ValueError names the parameter."""
    if typing.get_origin(kind) is Literal:
        choices = {str(choice): choice for choice in typing.get_args(kind)}
        if value in choices:
            return choices[value]
        problem = f"choose one of {', '.join(choices)}"
    elif kind is bool:
        if value.lower() in ("true", "false"):
            return value.lower() == "true"
        problem = "write true or false"
    elif kind in (int, float, str):
        try:
            return kind(value)
        except ValueError:
            problem = f"not a valid {kind.__name__}"
    else:
        problem = f"--task_arg converts to int, float, bool, str or a Literal, not to {kind}"
    raise ValueError(f"--task_arg {name}={value}: {problem}")


def parameter_type(parameter: inspect.Parameter):
    """The type a value for `parameter` is converted to: its annotation, else its default's type, else str."""
    if parameter.annotation is not inspect.Parameter.empty:
        return parameter.annotation
    if parameter.default is inspect.Parameter.empty or parameter.default is None:
        return str
    return type(parameter.default)


def own_keywords(pairs: tuple[str, ...], factory: Callable, run_values: dict) -> dict:
    """The `--task_arg name=value` pairs as keyword arguments of `factory`, each converted to its parameter's type.
    A name that is a `TaskArgs` flag or a run value, that the factory does not take, or a value that does not
    convert is a ValueError naming it."""
    if not pairs:  # resolving the annotations runs the factory's string ones: only when there is a value to convert
        return {}
    parameters = inspect.signature(factory, eval_str=True).parameters
    passed = {*TASK_FLAGS, *run_values}
    own = [name for name, p in parameters.items()
           if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in passed]
    keywords = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals:
            raise ValueError(f"--task_arg {pair!r}: write it as name=value")
        if name in TASK_FLAGS:
            raise ValueError(f"--task_arg {name}: {name} is a flag of its own, set it with --{name}")
        if name in run_values:
            raise ValueError(f"--task_arg {name}: the script passes the task its own {name}")
        if name not in own:
            raise ValueError(f"--task_arg {name}: the task's factory {factory.__name__} has no parameter {name!r} "
                             f"(its own: {', '.join(own) or 'none'})")
        keywords[name] = converted(name, value, parameter_type(parameters[name]))
    return keywords


def load_task(args: TaskArgs, **run_values) -> Task:
    """Calls the task's factory with the `TaskArgs` fields and `run_values` it takes as parameters and the
    `--task_arg` values of its own, and checks what it returns. A flag set away from its default that the factory
    does not take is reported: it has no effect."""
    factory = task_factory(args.task)
    parameters = inspect.signature(factory).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    offered = {**{name: getattr(args, name) for name in TASK_FLAGS}, **run_values}
    defaults = TaskArgs()
    ignored = [f"--{name}" for name in TASK_FLAGS if name not in parameters and not takes_all
               and getattr(args, name) != getattr(defaults, name)]
    if ignored:
        utils.print0(f"warning: task {args.task!r} does not use {', '.join(ignored)}; those flags have no effect")
    task = factory(**{k: v for k, v in offered.items() if takes_all or k in parameters},
                   **own_keywords(args.task_arg, factory, run_values))
    if not isinstance(task, Task):
        raise TypeError(f"task {args.task!r} returned {type(task).__name__}, not a tasks.Task")
    if not task.train:
        raise ValueError(f"task {args.task!r} has no training openings")
    return task
