"""REFUEL against the REFUEL paper's single-turn baselines, fairly: the same generated-token budget for every
method, the same learning-rate rule over it, the same turn distribution, and every method tuned on its own grid.

Every run starts from the task's policy with the same flags but its method's, and spends `--token_budget` generated
tokens (policy and simulated user, counted alike by refuel.py and dpo_multiturn.py; the baselines' dialogues played
once by pi_0 included): it stops after the iteration that reaches the budget, and nothing else stops it first (the
iteration cap, `--max_iterations`, is far beyond it; a run it stops is reported). Each run's learning rate follows
the share of the budget it has spent (`--schedule_over token_budget`): warmup, then the decay to 0 at the budget's
end, whatever its iterations cost. Methods that sample the turn h (REFUEL, the MT baselines) draw it uniformly over
the H turns; REFUEL with the paper's h is an extra row, at REFUEL's chosen setting (not on allowance: its sizing).

1. Tuning, on `--tuning_seeds` (two by default, never reported): each method runs every cell of its grid, `--lrs` times
   its own coefficient (`--etas` for REFUEL and REBEL, `--betas` for DPO) times `--steps` (optimizer steps per generated
   token, `Setting.steps`), on each tuning seed (evaluated at its start and end only), and keeps the cell with the best
   mean final measure at turn H. While that cell is on an edge of the grid, the grid grows one step past it along that
   dimension and the best is taken again, until it is inside, at the dimension's bound (`BOUNDS`) or grown
   `--max_extensions` times; the report names where it stopped.
2. The reported runs: each method's chosen cell on every seed of `--seeds` (none of them a tuning seed). A seed
   fixes the task's training draws, its recorded dialogues and the sampling, and the evaluation set is the task's
   own, so two methods' runs on one seed are paired. Every run is also evaluated after the iterations that cross a
   quarter, a half and three quarters of its budget: its curve against the tokens spent.
3. The report: per turn, each method's final measure (the evaluation score, or for the chat task the win rate
   against the initial policy judged by the reward, as the paper reports) as the mean and the 95% interval over
   the seeds; each method's paired difference from its seed's initial policy; the paired difference REFUEL minus
   each method with its paired t-test p, Holm-adjusted over the baselines at each turn, and at turn H the smallest
   difference the seeds detect with 80% power; the tokens spent (and the last iteration's overshoot of the
   budget), the reward calls and iterations; the curves; the tuning grid, every cell.

Tasks (`--task`): `guess_number`, `harvest`, `chat` (embedded SmolLM2 as the policy and as the LLM user, the
target-length reward, horizon 3) and `allowance` (SmolLM2 answering within a word allowance) come with their sizes;
any other plug-in runs with the scripts' defaults and the flags after `--`. Writes multiturn_comparison_<task>.json
and .png to --output_dir (a plug-in's name with its non-word characters as `_`); the flags all benchmarks share are
described in benchmarks/common.py (its --num_iterations is unused here: the budget stops the runs). `--jobs 2` runs
two runs at a time, each on one intra-op thread (the games' runs are one process with a tiny model each, which a
second thread does not speed up). A run is a process of its own with its own seed: what runs beside it changes its
seconds, not its results.

    .venv/bin/python benchmarks/multiturn_comparison.py --task harvest [--seeds 1 2 3 4 5] [--tuning_seeds 0 99]
        [--token_budget T] [--lrs ...] [--etas ...] [--betas ...] [--steps ...] [--max_extensions 4] [--methods ...]
        [--jobs 2] [--output_dir docs] [--runs_dir DIR]
    .venv/bin/python benchmarks/multiturn_comparison.py --task harvest --report   # the tables again, from the JSON
"""

import argparse
import concurrent.futures
import itertools
import math
import os
import re
import statistics
from typing import NamedTuple

import common

BASELINE = ["--contexts", "initial", "--target", "immediate"]
UNIFORM = ["--horizon_sampling", "uniform"]
METHODS = {
    # name: (script, its coefficient, its flags)
    "REFUEL": ("refuel.py", "eta", UNIFORM),
    "DPO-LT": ("dpo_multiturn.py", "beta", ["--loss", "dpo", "--turns", "last", *BASELINE]),
    "DPO-MT": ("dpo_multiturn.py", "beta", ["--loss", "dpo", "--turns", "sampled", *UNIFORM, *BASELINE]),
    "REBEL-LT": ("dpo_multiturn.py", "eta", ["--loss", "rebel", "--turns", "last", *BASELINE]),
    "REBEL-MT": ("dpo_multiturn.py", "eta", ["--loss", "rebel", "--turns", "sampled", *UNIFORM, *BASELINE]),
    "DPO-MT, on-policy contexts": ("dpo_multiturn.py", "beta", ["--loss", "dpo", "--turns", "sampled", *UNIFORM,
                                                                "--contexts", "onpolicy", "--target", "immediate"]),
    "DPO-MT, future target": ("dpo_multiturn.py", "beta", ["--loss", "dpo", "--turns", "sampled", *UNIFORM,
                                                           "--contexts", "initial", "--target", "future"]),
}
EXTRA_ROWS = {"REFUEL, the paper's h": ("REFUEL", ["--horizon_sampling", "paper"])}
"""rows run at another method's chosen cell, with these flags in place of that method's own"""


class Setting(NamedTuple):
    """A task's size in the comparison: what every run gets, and the grid each method is tuned on."""
    flags: list[str]
    """flags of every run"""
    measure: str = "score"
    """the logged measure reported (eval/<measure>_turn<h>)"""
    token_budget: int | None = None
    """generated tokens per run; none: --token_budget must be given"""
    pairs: int = 256
    """pairs per iteration of the baselines"""
    refuel_pairs: int = 64
    """pairs per iteration of REFUEL. A REFUEL pair plays two dialogues on from turn h (about 60 tokens in the
    harvest game, a baseline pair about 4): its iterations are kept to about an eighth of the budget, so that the
    last one overshoots it little and a run has iterations enough for its curve"""
    recorded: int = 256
    """the dialogues pi_0 plays once for the baselines, in their budget"""
    lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    etas: tuple[float, ...] = (0.5, 5.0)
    """an order of magnitude apart: while the log-ratio difference stays far below eta times the reward difference,
    the regression's gradient is about that difference times eta, which Adam's normalisation undoes (REFUEL's harvest
    runs at eta 2 and 5 were the same to three decimals)"""
    betas: tuple[float, ...] = (0.1, 0.3)
    steps: tuple[int, ...] = (1,)
    """k, the optimizer steps per generated token as a multiple of one pass over an iteration's pairs in minibatches
    of `minibatch`: REFUEL passes k times over its pairs (`--num_epochs k`; the official code takes 4), so that its
    later steps see a log-ratio that has moved and eta acts; a baseline takes k times smaller minibatches
    (`--minibatch_pairs minibatch / k`). A baseline's pairs are most of its cost (each trains on a whole context for
    one turn's answer), so that more passes over them would multiply a run's time, where a smaller minibatch takes
    more steps for the same compute"""
    minibatch: int = 64
    """the baselines' minibatch at k = 1 (REFUEL's is the script's or the flags')"""
    methods: tuple[str, ...] = ("REFUEL", "DPO-LT", "DPO-MT", "REBEL-LT", "REBEL-MT")
    extra_rows: tuple[str, ...] = tuple(EXTRA_ROWS)
    """the `EXTRA_ROWS` reported beside the methods"""


TASKS = {
    # The games, sized for about 2.5 hours on 2 CPU cores, two runs at a time. A baseline's cost is its pairs, about
    # 17 ms of one core per generated token (each pair trains on a whole context for a few tokens' answer) against
    # about 1 ms for REFUEL; and every run starts (about 20 s) and evaluates, at its start and end at least (about 40 s
    # for 1,024 games). At 6,000 tokens and 256 evaluation games, the grids (8 cells a method on 2 seeds), their
    # extensions and the 30 reported runs come to about 2.5 hours by these timings, with about 8 REFUEL iterations of
    # 12 pairs (harvest; 24 in the guessing game, whose dialogues are half as long). pi_0 records 32 dialogues for the
    # baselines, a quarter of the budget. Measured: the grids grew to 57 and 59 cells, and the 144 and 148 runs took
    # about 110 and 104 min (harvest at the rate of its runs that had the cores to themselves)
    "guess_number": Setting(["--task", "guess_number", "--task_arg", "num_eval=256"], token_budget=6_000, pairs=128,
                            refuel_pairs=24, recorded=32, lrs=(3e-4, 1e-3), steps=(1, 4)),
    "harvest": Setting(["--task", "harvest", "--task_arg", "num_eval=256"], token_budget=6_000, pairs=128,
                       refuel_pairs=12, recorded=32, lrs=(3e-4, 1e-3), steps=(1, 4)),
    # A SmolLM2 (135M) token costs far more than a tiny model's, and a baseline's token about 6 times REFUEL's (it
    # trains on a whole dialogue's context for one turn's answer): at 40,000 tokens a REFUEL run took 17 min, and a
    # baseline's first iterations put it at about an hour. So chat runs at 4,000 tokens, tunes the learning rate
    # alone, and runs the last-turn baselines by default (DPO-MT and REBEL-MT with --methods): 26 runs. REFUEL takes
    # 4 pairs an iteration so that its last one overshoots by about 15%, as in the games. The reward is the target
    # length (tasks.chat): under the brevity reward a DPO-LT run learned to answer nothing by its 12th iteration,
    # then spent about 12 tokens an iteration with every pair tied, and would have run for about an hour
    "chat": Setting(["--task", "chat", "--horizon", "3", "--max_new_tokens", "48", "--user_max_tokens", "32",
                     "--reward_function", "tasks.chat:target_length_reward",
                     "--minibatch_pairs", "4", "--micro_batch_pairs", "4", "--num_eval_prompts", "16"],
                    "winrate_vs_initial", 4_000, pairs=8, refuel_pairs=4, recorded=8, lrs=(1e-4, 3e-4), etas=(0.5,),
                    betas=(0.1,), minibatch=4, methods=("REFUEL", "DPO-LT", "REBEL-LT")),
    # The word allowance (tasks.allowance), the chat task in which every answer is scored and every turn depends on
    # the ones before: SmolLM2 answers, code plays the user. Measured two runs at a time at 2,500 tokens: a REFUEL
    # iteration of 4 pairs about 30 s at one pass (a third of it training), a DPO-LT iteration of 8 pairs about 70 s,
    # an evaluation of the 64 dialogues about 80 s (a reported run evaluates 5 times, a tuning run twice). So REFUEL
    # takes the official 4 passes, so that eta acts, and tunes the learning rate and eta; DPO-LT, with the same k (4
    # steps of 1 pair where one pass takes 1 of 4), tunes the learning rate at beta 0.1; the other baselines run with
    # --methods. REFUEL's passes take more than the probes' one pass (about 65 s of training an iteration at 4), and
    # at 3e-5 and 1e-4 its runs fell below pi_0 on both tuning seeds, so that its learning rate grows down for
    # several rounds: the paper's h is left out, and 10 runs are reported after the 12 tuning runs and their extensions
    "allowance": Setting(["--task", "allowance", "--max_new_tokens", "32", "--micro_batch_pairs", "4"], "score",
                         2_500, pairs=8, refuel_pairs=4, recorded=8, lrs=(3e-5, 1e-4), etas=(0.5, 5.0),
                         betas=(0.1,), steps=(4,), minibatch=4, methods=("REFUEL", "DPO-LT"), extra_rows=()),
}
BOUNDS = {"lr": (1e-6, 1e-2), "eta": (1e-2, 1e2), "beta": (1e-2, 10.0), "steps": (1, 8)}
"""how far tuning may extend each dimension of a grid"""
CURVE_POINTS = 4
"""each run is evaluated after the iterations that cross a quarter, a half and three quarters of its budget, and at
its end: its curve against the tokens spent"""
DIAGNOSTICS = {"reward/score": "training reward", "dpo/rewards_chosen": "DPO: beta log-ratio of the chosen",
               "dpo/rewards_rejected": "DPO: of the rejected", "dpo/accuracy": "DPO: accuracy",
               "val/sign_align": "REFUEL: held-out sign agreement"}
"""each run's own diagnostics, at its first and its last iteration: why a method ends where it does (a DPO whose
chosen and rejected log-ratios to pi_0 both fall below 0 lowered both answers' probabilities)"""
MEASURES = {"score": "evaluation score", "winrate_vs_initial": "win rate against the initial policy"}
"""what each logged measure (eval/<measure>_turn<h>) is called in the report"""


def by_turn(record: dict, measure: str) -> dict[str, float]:
    """The evaluation measure by turn h of one metrics record, keyed by h."""
    prefix = f"eval/{measure}_turn"
    return {k[len(prefix):]: v for k, v in record.items() if k.startswith(prefix)}


def run(method: str, cell: dict, seed: int, args: argparse.Namespace, setting: Setting, runs_dir: str,
        flags: list[str] | None = None, curve: bool = True) -> dict:
    """One run of `method` at `cell` (its lr, coefficient and steps k): its final measure by turn and what it
    spent; with `curve`, its evaluations at each `CURVE_POINTS`th of the budget too (a tuning run is scored by its
    end alone, and an evaluation of the task's held-out set can cost as much as several iterations)."""
    script, name, own = METHODS[method]
    pairs = setting.refuel_pairs if script == "refuel.py" else setting.pairs
    cap = str(args.max_iterations)
    lr, coefficient, steps = cell["lr"], cell[name], cell["steps"]
    more_steps = ["--num_epochs", str(steps)] if script == "refuel.py" else [
        "--minibatch_pairs", str(max(setting.minibatch // steps, 1))]  # k times the steps: `Setting.steps`
    command = [*setting.flags, "--seed", str(seed), "--token_budget", str(setting.token_budget), "--schedule_over",
               "token_budget", "--num_iterations", cap, "--eval_every", cap,
               "--eval_budget_points", str(CURVE_POINTS if curve else 0), "--save_every", cap, "--pairs_per_rank",
               str(pairs), "--lr", str(lr), f"--{name}", str(coefficient), *more_steps, *(flags or own),
               *([] if script == "refuel.py" else ["--num_recorded_dialogues", str(setting.recorded)]),
               *args.script_flags]
    label = "".join(c for c in (method if flags is None else f"{method}+") if c.isalnum() or c in "-+")
    done = common.run_script(script, command, runs_dir,
                             f"{task_label(args)}_{label}_lr{lr:g}_{name}{coefficient:g}_k{steps}_s{seed}",
                             keep_checkpoints=False)
    first, last = done["metrics"][0], done["metrics"][-1]
    return {"seed": seed, "lr": lr, name: coefficient, "steps": steps, "command": done["command"],
            "seconds": done["seconds"],
            "initial": by_turn(first, setting.measure), "final": by_turn(last, setting.measure),
            "final_by_measure": {m: by_turn(last, m) for m in MEASURES if by_turn(last, m)},
            "generated_tokens": last["budget/generated_tokens"], "reward_calls": last["budget/reward_calls"],
            "iterations": last["iteration"],
            "curve": [{"tokens": m.get("budget/generated_tokens", 0), "measure": by_turn(m, setting.measure)}
                      for m in done["metrics"] if by_turn(m, setting.measure)],
            "diagnostics": {key: [m.get(key, math.nan) for m in (done["metrics"][1], last)] for key in DIAGNOSTICS},
            "stopped_by_budget": last["budget/generated_tokens"] >= setting.token_budget,
            "references": {k[len("reference/"):]: v for k, v in first.items() if k.startswith("reference/")}}


def task_label(args: argparse.Namespace) -> str:
    """The task's name in file names: a plug-in's file and function, non-word characters as `_`."""
    return re.sub(r"\W", "_", os.path.basename(args.task))


def task_settings(args: argparse.Namespace) -> Setting:
    """The task's setting (a plug-in's: the defaults), with what the flags give in its place."""
    setting = TASKS.get(args.task, Setting(["--task", args.task]))
    given = {"token_budget": args.token_budget, "pairs": args.pairs_per_rank, "refuel_pairs": args.pairs_per_rank,
             "recorded": args.num_recorded_dialogues, "lrs": args.lrs, "etas": args.etas, "betas": args.betas,
             "steps": args.steps, "methods": args.methods}
    return setting._replace(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None})


def extend(scores: dict[tuple, float], dimensions: list[str], grown: dict[str, int], max_extensions: int
           ) -> tuple[list[tuple], list[str]]:
    """Where tuning goes next, from the cells run so far ({cell: score}, a cell a tuple of values in `dimensions`'
    order): for each dimension with more than one value explored, if the best cell holds its smallest or largest
    value, the best cell with that value one step further out (the step: the ratio of the edge to its neighbour;
    whole numbers for steps), clipped to the dimension's `BOUNDS`. A dimension already at its bound, or grown
    `max_extensions` times (`grown`, updated), is not extended and is named in the second list."""
    best = max(scores, key=scores.get)
    cells, stopped = [], []
    for i, dimension in enumerate(dimensions):
        explored = sorted({cell[i] for cell in scores})
        if len(explored) < 2 or best[i] not in (explored[0], explored[-1]):
            continue
        neighbour = explored[1] if best[i] == explored[0] else explored[-2]
        low, high = BOUNDS[dimension]
        value = min(max(best[i] * best[i] / neighbour, low), high)
        value = round(value) if dimension == "steps" else float(f"{value:.3g}")
        if value in explored or grown.get(dimension, 0) >= max_extensions:
            stopped.append(f"{dimension} {best[i]:g} ({'its bound' if value in explored else 'the extension limit'})")
            continue
        grown[dimension] = grown.get(dimension, 0) + 1
        cells.append(best[:i] + (value,) + best[i + 1 :])
    return cells, stopped


def tune(method: str, args: argparse.Namespace, setting: Setting, runs_dir: str,
         pool: concurrent.futures.Executor) -> tuple[list[dict], dict, list]:
    """`method`'s grid (learning rate x its coefficient x steps) on every tuning seed, each cell scored by its mean
    final measure at turn H over them; while the best cell is on an edge of the grid, the grid grows past it
    (`extend`) and the best is taken again. The runs of a round go to `pool` together. Returns every cell (its mean
    results, and each seed's run), the chosen cell, and the dimensions where the choice stopped at a bound."""
    name = METHODS[method][1]
    dimensions = ["lr", name, "steps"]
    todo = list(itertools.product(setting.lrs, getattr(setting, f"{name}s"), setting.steps))
    results, grown, horizon = {}, {}, None
    while todo:
        queued = {cell: [pool.submit(run, method, dict(zip(dimensions, cell)), seed, args, setting, runs_dir,
                                     curve=False) for seed in args.tuning_seeds] for cell in todo}
        for cell, runs in queued.items():
            done = [r.result() for r in runs]
            horizon = horizon or max(done[0]["final"], key=int)
            results[cell] = {**dict(zip(dimensions, cell)), "seeds": [r["seed"] for r in done],
                             "final": {t: statistics.mean(r["final"][t] for r in done) for t in done[0]["final"]},
                             "generated_tokens": statistics.mean(r["generated_tokens"] for r in done),
                             "seconds": sum(r["seconds"] for r in done)}
        todo, stopped = extend({cell: r["final"][horizon] for cell, r in results.items()}, dimensions, grown,
                               args.max_extensions)
    best = max(results.values(), key=lambda r: r["final"][horizon])
    return list(results.values()), {d: best[d] for d in dimensions}, stopped


def measure(args: argparse.Namespace, setting: Setting) -> dict:
    """Every method tuned, then every row on every reported seed: `--jobs` runs at a time, the methods' tuning
    side by side (a method's next round waits for its last)."""
    runs_dir = common.runs_dir(args, "multiturn_comparison")
    grid, chosen, bounds = {}, {}, {}
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool, \
            concurrent.futures.ThreadPoolExecutor(len(setting.methods)) as tuners:
        tuned = {method: tuners.submit(tune, method, args, setting, runs_dir, pool) for method in setting.methods}
        for method in setting.methods:
            grid[method], chosen[method], bounds[method] = tuned[method].result()
        rows = {method: (method, None) for method in setting.methods}
        rows.update({row: EXTRA_ROWS[row] for row in setting.extra_rows if EXTRA_ROWS[row][0] in chosen})
        queued = {row: [pool.submit(run, method, chosen[method], seed, args, setting, runs_dir, flags)
                        for seed in args.seeds] for row, (method, flags) in rows.items()}
        runs = {row: [r.result() for r in by_seed] for row, by_seed in queued.items()}
    return {"task": args.task, "measure": setting.measure, "token_budget": setting.token_budget,
            "tuning_seeds": args.tuning_seeds, "seeds": args.seeds, "grid": grid, "chosen": chosen,
            "stopped_at_bounds": bounds, "runs": runs}


def turns(results: dict) -> list[str]:
    return sorted(next(iter(results["runs"].values()))[0]["final"], key=int)


def references(results: dict) -> dict[str, list[float]]:
    """The task's yardsticks by turn (their scores), e.g. {"optimal": [0.07, 0.26, 1.0]}."""
    first = next(iter(results["runs"].values()))[0]["references"]
    names = dict.fromkeys(k.rsplit("_turn", 1)[0] for k in first)
    return {n: [first[f"{n}_turn{t}"] for t in turns(results)] for n in names}


def comparisons(results: dict) -> dict[str, dict[str, list[float]]]:
    """REFUEL minus each other row, paired by seed: {row: {turn: [difference per shared seed]}}."""
    refuel = {r["seed"]: r for r in results["runs"].get("REFUEL", [])}
    return {method: {t: [refuel[r["seed"]]["final"][t] - r["final"][t] for r in by_seed if r["seed"] in refuel]
                     for t in turns(results)}
            for method, by_seed in results["runs"].items() if method != "REFUEL" and refuel}


def curve_points(run: dict, budget: int) -> dict[int, dict]:
    """A run's evaluations by the share of the budget they follow, in `CURVE_POINTS`ths (0: the start)."""
    return {min(int(p["tokens"] * CURVE_POINTS / budget), CURVE_POINTS): p for p in run["curve"]}


def curve_table(results: dict) -> str:
    last, budget = turns(results)[-1], results["token_budget"]
    rows = []
    for method, by_seed in results["runs"].items():
        points = [curve_points(r, budget) for r in by_seed]
        cells = []
        for k in range(CURVE_POINTS + 1):
            reached = [p[k] for p in points if k in p]
            cells.append("" if not reached else
                         f"{common.with_interval([p['measure'][last] for p in reached])} "
                         f"[{statistics.mean(p['tokens'] for p in reached):,.0f}]"
                         + ("" if len(reached) == len(points) else f" (n {len(reached)})"))
        rows.append([method, *cells])
    return common.table(["method", "start", *(f"{k}/{CURVE_POINTS}" for k in range(1, CURVE_POINTS)), "end"], rows)


def diagnostics_table(results: dict) -> str:
    rows = []
    for method, by_seed in results["runs"].items():
        cells = []
        for key in DIAGNOSTICS:
            ends = [[r["diagnostics"][key][i] for r in by_seed if math.isfinite(r["diagnostics"][key][i])]
                    for i in (0, 1)]
            cells.append(" → ".join(f"{statistics.mean(v):.3f}" for v in ends) if all(ends) else "")
        rows.append([method, *cells])
    return common.table(["method", *DIAGNOSTICS.values()], rows)


def other_measures(results: dict) -> list[str]:
    """The report's lines for every logged measure but the one reported (the chat tasks: the win rate against pi_0
    beside the score): each method's final value by turn, mean and 95% interval; none for results without them."""
    every = [r for by_seed in results["runs"].values() for r in by_seed]
    lines = []
    for measure in MEASURES:
        if measure == results["measure"] or not all(measure in r.get("final_by_measure", {}) for r in every):
            continue
        rows = [[method, *(common.with_interval([r["final_by_measure"][measure][t] for r in by_seed])
                           for t in turns(results))] for method, by_seed in results["runs"].items()]
        lines += ["", f"The final {MEASURES[measure]} by turn, mean ± 95% interval over the seeds:\n",
                  common.table(["method", *(f"turn {t}" for t in turns(results))], rows)]
    return lines


def with_p(differences: list[float]) -> str:
    """`mean ± half-width (p ...)` of paired differences: the 95% interval and the paired t-test's p."""
    return f"{common.with_interval(differences)} (p {common.paired_p(differences):.2g})"


def report(results: dict) -> str:
    runs, ts, what = results["runs"], turns(results), MEASURES[results["measure"]]
    budget = results["token_budget"]
    every = [r for by_seed in runs.values() for r in by_seed] + [r for cells in results["grid"].values() for r in cells]
    minutes = sum(r["seconds"] for r in every) / 60
    count = sum(len(r.get("seeds", [r.get("seed")])) for r in every)  # a tuning cell holds a run per tuning seed
    main = [["initial policy", *(common.with_interval([r["initial"][t] for r in next(iter(runs.values()))])
                                 for t in ts), "", "", "", ""]]
    for method, by_seed in runs.items():
        over = statistics.mean(r["generated_tokens"] - budget for r in by_seed)
        main.append([method, *(common.with_interval([r["final"][t] for r in by_seed]) for t in ts),
                     f"{statistics.mean(r['generated_tokens'] for r in by_seed):,.0f} (+{over:,.0f})",
                     f"{statistics.mean(r['reward_calls'] for r in by_seed):,.0f}",
                     f"{statistics.mean(r['iterations'] for r in by_seed):.1f}",
                     "" if all(r["stopped_by_budget"] for r in by_seed) else "no: the iteration cap"])
    if results["measure"] == "score":
        main += [[name, *(f"{v:.3f}" for v in values), "", "", "", ""]
                 for name, values in references(results).items()]
    against_initial = [[f"{method} − π₀", *(with_p([r["final"][t] - r["initial"][t] for r in by_seed])
                                            for t in ts)] for method, by_seed in runs.items()]
    paired, last = comparisons(results), ts[-1]
    family = [name for name in paired if not name.startswith("REFUEL,")]  # the baselines
    adjusted = {t: dict(zip(family, common.holm([common.paired_p(paired[name][t]) for name in family]))) for t in ts}
    level = 0.05 / max(len(family), 1)  # Holm's strictest step: the level its smallest p must pass
    rows = []
    for name, by_turn in paired.items():
        if name in family:
            cells = [f"{common.with_interval(by_turn[t])} (p {adjusted[t][name]:.2g})" for t in ts]
            needed = common.seeds_to_detect(by_turn[last], alpha=level) if adjusted[last][name] >= 0.05 else 0
            tail = [f"{common.detectable_difference(by_turn[last], alpha=level):.3f}",
                    "resolved" if needed == 0 else "–" if needed is None else f"{needed}"]
        else:  # a variant of REFUEL, outside the family: its p is not adjusted
            cells, tail = [with_p(by_turn[t]) + " unadjusted" for t in ts], ["", ""]
        rows.append([f"REFUEL − {name}", *cells, *tail])
    curves = curve_table(results) if all("curve" in r for by_seed in runs.values() for r in by_seed) else None
    diagnostics = diagnostics_table(results) \
        if all("diagnostics" in r for by_seed in runs.values() for r in by_seed) else None
    grid = []
    for method, cells in results["grid"].items():
        name = METHODS[method][1]
        for r in cells:
            mark = " (chosen)" if all(r.get(k) == v for k, v in results["chosen"][method].items()) else ""
            steps = f", {r['steps']}x steps" if "steps" in r else ""
            grid.append([method + mark, f"{r['lr']:g}", f"{name} {r[name]:g}{steps}",
                         *(f"{r['final'][t]:.3f}" for t in ts), f"{r['generated_tokens']:,.0f}"])
    tuning = results.get("tuning_seeds", [results.get("tuning_seed")])
    tuned_on = f"seed {tuning[0]}" if len(tuning) == 1 else \
        f"seeds {', '.join(map(str, tuning))} (a cell's results: the mean over them)"
    stopped = "; ".join(f"{m}: {', '.join(b)}" for m, b in results.get("stopped_at_bounds", {}).items() if b)
    grown = "" if "stopped_at_bounds" not in results else (
        "; a chosen cell on an edge of the grid grew it one step further, until inside or at a bound "
        f"({stopped or 'none reached'})")
    n = len(results["seeds"])
    return "\n".join([
        common.header(results),
        f"Task `{results['task']}`; token budget {budget:,} per run; the {count} runs took {minutes:.0f} min. "
        f"Reported seeds {', '.join(map(str, results['seeds']))}, tuned on {tuned_on}. "
        f"Cells: the final {what} by turn h, mean ± the half-width of its 95% interval over the {n} seeds.\n",
        common.table(["method", *(f"turn {t}" for t in ts), "generated tokens (overshoot)", "reward calls",
                      "iterations", "budget stopped it"], main),
        *other_measures(results),
        "",
        f"Each method against the initial policy π₀ on the same seed (its final minus its initial {what}), by "
        "turn, mean ± 95% interval (p: two-sided paired t-test):\n",
        common.table(["difference", *(f"turn {t}" for t in ts)], against_initial),
        "",
        f"Paired differences (same seed), REFUEL minus each method, {what} by turn, mean ± 95% interval (p: paired "
        f"t-test, Holm-adjusted over the {len(family)} baseline{'s' * (len(family) != 1)} at each turn). At turn "
        f"{last}, the smallest difference {n} seed{'s' * (n != 1)} detect with 80% power at level {level:.3g} (0.05 "
        "over the baselines: Holm's strictest step), and, where the adjusted p is 0.05 or more, the seeds that would "
        "detect the observed difference (–: none up to 1,000, or fewer than 2 seeds):\n",
        common.table(["difference", *(f"turn {t}" for t in ts), f"detectable, turn {last}", "seeds to resolve"],
                     rows),
        *([] if curves is None else [
            "",
            f"Curves: the {what} at turn {last} at the start, after the iterations that crossed each {CURVE_POINTS}th "
            f"of the budget, and at the end; mean ± 95% interval over the seeds, the mean tokens spent by then in "
            "brackets (n: the seeds with that point, where an iteration crossed two at once):\n", curves]),
        *([] if diagnostics is None else [
            "",
            "Each method's own diagnostics at its first and its last iteration (first → last; the mean over the "
            "seeds of the values logged, blank where the method logs none):\n", diagnostics]),
        "",
        f"Tuning grid on {tuned_on} (chosen: the best final {what} at turn {ts[-1]}{grown}):\n",
        common.table(["method", "lr", "coefficient", *(f"turn {t}" for t in ts), "generated tokens"], grid)])


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, ts = results["runs"], turns(results)
    x = [int(t) for t in ts]
    with_curves = all("curve" in r for by_seed in runs.values() for r in by_seed)
    fig, axes = plt.subplots(1, 2 if with_curves else 1, figsize=(13 if with_curves else 8, 3.8), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / (len(runs) + 1)
    for i, (method, by_seed) in enumerate(runs.items()):
        finals = [common.interval95([r["final"][t] for r in by_seed]) for t in ts]
        ax.bar([t + (i - len(runs) / 2) * width for t in x], [m for m, _ in finals], width,
               yerr=[0 if h == float("inf") else h for _, h in finals], capsize=2, label=method)
    initial = [statistics.mean(r["initial"][t] for r in next(iter(runs.values()))) for t in ts]
    ax.bar([t + len(runs) / 2 * width for t in x], initial, width, color="lightgray", label="initial policy")
    if results["measure"] == "score":
        for name, values in references(results).items():
            ax.scatter(x, values, marker="_", s=400, label=name, zorder=3)
    ax.set_xticks(x, [f"turn {t}" for t in ts])
    ax.set_ylabel(f"final {MEASURES[results['measure']]}\n(mean, 95% interval)", fontsize=8)
    ax.set_title(f"{results['task']}: {len(results['seeds'])} seeds, {results['token_budget']:,} tokens a run",
                 fontsize=9)
    ax.legend(fontsize=6, ncol=3)
    if with_curves:
        plot_curves(axes[0][1], results)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(ax, results: dict) -> None:
    """Each method's measure at turn H against the tokens spent: the mean over seeds at each budget point, with its
    95% band."""
    last, budget = turns(results)[-1], results["token_budget"]
    for method, by_seed in results["runs"].items():
        points = [curve_points(r, budget) for r in by_seed]
        shares = [k for k in range(CURVE_POINTS + 1) if any(k in p for p in points)]
        tokens = [statistics.mean(p[k]["tokens"] for p in points if k in p) for k in shares]
        means, halves = zip(*(common.interval95([p[k]["measure"][last] for p in points if k in p]) for k in shares))
        halves = [0.0 if h == float("inf") else h for h in halves]
        line, = ax.plot(tokens, means, marker="o", markersize=3, label=method)
        ax.fill_between(tokens, [m - h for m, h in zip(means, halves)], [m + h for m, h in zip(means, halves)],
                        color=line.get_color(), alpha=0.15)
    ax.set_xlabel("generated tokens spent")
    ax.set_ylabel(f"{MEASURES[results['measure']]} at turn {last}\n(mean, 95% band)", fontsize=8)
    ax.legend(fontsize=6)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_run_flags(parser, seeds=[1, 2, 3, 4, 5], num_iterations=0, token_budget=None)
    parser.add_argument("--task", default="guess_number", help="a built-in task or a plug-in, as the scripts take")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS),
                        help="default: the task's (REFUEL and the four paper baselines in the games; chat: the "
                        "last-turn ones; allowance: DPO-LT)")
    parser.add_argument("--tuning_seeds", type=int, nargs="+", default=[0, 99],
                        help="the seeds the grids run on (a cell scores its mean over them), never reported")
    parser.add_argument("--steps", type=int, nargs="+", help="k, the optimizer steps per generated token as a "
                        "multiple of one pass: REFUEL's passes, a baseline's minibatch over k (default: the task's)")
    parser.add_argument("--max_extensions", type=int, default=4,
                        help="how many times tuning may grow each dimension of a grid past a chosen edge cell")
    parser.add_argument("--lrs", type=float, nargs="+", help="the grid's learning rates (default: the task's; "
                        "the games 3e-4 1e-3, chat 1e-4 3e-4, allowance 3e-5 1e-4)")
    parser.add_argument("--etas", type=float, nargs="+", help="REFUEL's and REBEL's eta (default: 0.5 5; chat 0.5)")
    parser.add_argument("--betas", type=float, nargs="+", help="DPO's beta (default: 0.1 0.3; chat, allowance 0.1)")
    parser.add_argument("--pairs_per_rank", type=int, help="pairs per iteration of every method (default: the task's, "
                        "64 for REFUEL and 256 for the baselines in the games)")
    parser.add_argument("--num_recorded_dialogues", type=int,
                        help="the dialogues pi_0 plays once for the baselines, in their budget (default: the task's)")
    parser.add_argument("--max_iterations", type=int, default=1000,
                        help="the iteration cap, far beyond the budget: it stops no run that the budget should")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each on one intra-op thread when > 1")
    args = common.parse_args(parser)
    setting = task_settings(args)
    if not args.report:
        if setting.token_budget is None:
            parser.error(f"task {args.task!r} has no default budget: give --token_budget")
        if set(args.tuning_seeds) & set(args.seeds):
            parser.error("--tuning_seeds must not be among the reported --seeds")
        if any(len(getattr(setting, f"{g}s")) * len(setting.lrs) * len(setting.steps) > 12 for g in ("eta", "beta")):
            parser.error("a method's starting grid has at most 12 cells (--lrs times --etas or --betas times --steps)")
    name = f"multiturn_comparison_{task_label(args)}"
    path = os.path.join(args.output_dir, f"{name}.json")
    if not args.report:
        if args.jobs > 1:
            os.environ["OMP_NUM_THREADS"] = "1"
        common.save_results(path, measure(args, setting))
        plot(common.load_results(path), os.path.join(args.output_dir, f"{name}.png"))
    print(report(common.load_results(path)))
