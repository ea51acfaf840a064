"""The command line and the results file the benchmarks share.

Each benchmark of training runs takes:

    --seeds S [S ...]    seeds of the benchmarked runs (every configuration runs once per seed)
    --num_iterations N   iterations of each run (the cap, where a token budget stops the runs first)
    --token_budget T     generated tokens per run (policy and user), passed to the benchmarked scripts
    --output_dir DIR     where <benchmark>.json (every number of its tables and plot) and <benchmark>.png go
    --runs_dir DIR       where the benchmarked scripts write their runs (default: a new temporary folder); a run that
                         finished there with the same command is read instead of run again, so giving an
                         interrupted benchmark its folder again continues it
    --report             print the tables from DIR/<benchmark>.json and exit, running nothing
    -- FLAGS             everything after `--` is appended to the benchmarked script's command line

The tables are always printed from the JSON file, after a run too, so the Markdown in docs/ is `--report`'s output.
"""

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", default=os.path.join(REPO, "docs"),
                        help="where the results JSON and the plot are written (default docs/)")
    parser.add_argument("--report", action="store_true",
                        help="print the tables from the results JSON in --output_dir and exit, running nothing")


def add_run_flags(parser: argparse.ArgumentParser, seeds: list[int], num_iterations: int,
                  token_budget: int | None) -> None:
    parser.add_argument("--seeds", type=int, nargs="+", default=seeds, help="seeds of the benchmarked runs")
    parser.add_argument("--num_iterations", type=int, default=num_iterations, help="iterations of each run")
    parser.add_argument("--token_budget", type=int, default=token_budget,
                        help="generated tokens per run (policy and user); none: the iterations alone stop a run")
    parser.add_argument("--runs_dir", help="where the runs go (default: a new temporary folder); a run that "
                        "finished there with the same command is reused")
    add_output_flags(parser)


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The benchmark's flags; `script_flags` holds what follows `--`, for the benchmarked script."""
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.script_flags = argv[split + 1 :]
    return args


def runs_dir(args: argparse.Namespace, benchmark: str) -> str:
    """--runs_dir, made if missing, or a new temporary folder."""
    if args.runs_dir is None:
        return tempfile.mkdtemp(prefix=f"{benchmark}_")
    os.makedirs(args.runs_dir, exist_ok=True)
    return args.runs_dir


def budget_flags(args: argparse.Namespace) -> list[str]:
    return [] if args.token_budget is None else ["--token_budget", str(args.token_budget)]


def child_env() -> dict[str, str]:
    """This environment without torchrun's rank variables: a child makes a process group of its own (or its own
    torchrun does) instead of joining the one this process may have made; unbuffered, so its log follows it."""
    return {**{k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}, "PYTHONUNBUFFERED": "1"}


def run_script(script: str, flags: list[str], folder: str, name: str, nproc: int = 1,
               keep_checkpoints: bool = True) -> dict:
    """Run `name` of `script` (a file in the repository) in `folder`: its command (without the run folder's
    flags), its wall seconds and its metrics (one record per iteration, iteration 0 first). A run that finished
    there with the same command is read, not repeated; an unfinished one is started again. Without
    `keep_checkpoints` a finished run keeps its metrics and log but not its checkpoints, for benchmarks that read
    only the metrics (a SmolLM2 run's checkpoint is about 130 MB)."""
    command = f"python {script} {shlex.join(flags)}".strip()
    run_dir, done = os.path.join(folder, name), os.path.join(folder, f"{name}.done.json")
    if os.path.exists(done):
        with open(done) as f:
            finished = json.load(f)
        if finished["command"] != command:
            raise SystemExit(f"{run_dir} was run as `{finished['command']}`, not `{command}`; give another --runs_dir")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        launcher = [sys.executable] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        log(f"{name}: {command}")
        started = time.time()
        log_path = os.path.join(folder, f"{name}.log")
        with open(log_path, "w") as log_file:
            process = subprocess.Popen([*launcher, os.path.join(REPO, script), *flags, "--output_dir", folder,
                                        "--run_name", name], cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
            for line in process.stdout:
                log_file.write(line)
                if line.startswith("iteration "):
                    log("    " + line.rstrip())
            process.wait()
        if process.returncode != 0:
            with open(log_path) as f:
                sys.stderr.write(f.read()[-5000:])
            raise SystemExit(f"{script} failed with exit code {process.returncode}; its log: {log_path}")
        finished = {"command": command, "seconds": time.time() - started}
        with open(done, "w") as f:
            json.dump(finished, f)
        if not keep_checkpoints:
            shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {**finished, "metrics": [json.loads(line) for line in f]}


def save_results(path: str, results: dict) -> None:
    """The results JSON, with the benchmark's command and where and when it ran."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    command = f"python {os.path.relpath(sys.argv[0], REPO)} {shlex.join(sys.argv[1:])}".strip()
    with open(path, "w") as f:
        json.dump({"command": command, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.machine(),
                   "cpu_count": os.cpu_count(), **results}, f, indent=1)
        f.write("\n")


def load_results(path: str) -> dict:
    if not os.path.exists(path):
        raise SystemExit(f"{path}: no results; run the benchmark with this --output_dir first")
    with open(path) as f:
        return json.load(f)


def header(results: dict) -> str:
    return (f"Command: `{results['command']}`; run {results['date']} on {results['cpu_count']} CPU cores "
            f"({results['machine']}).\n")


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz), for the
    Student t distribution below; accurate to about 1e-12 on the degrees of freedom the benchmarks have."""
    if x <= 0 or x >= 1:
        return min(max(x, 0.0), 1.0)
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast below this point: use the symmetry there
        return 1 - _incomplete_beta(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            numerator = 1.0
        elif i % 2 == 0:
            numerator = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            numerator = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1 + numerator * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + numerator / (c if abs(c) > tiny else tiny)
        f *= c * d
        if abs(1 - c * d) < 1e-14:
            break
    return front * (f - 1)


def t_two_sided_p(t: float, dof: int) -> float:
    """P(|T| >= |t|) for Student's t with `dof` degrees of freedom."""
    return _incomplete_beta(dof / 2, 0.5, dof / (dof + t * t))


def t_quantile(p: float, dof: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with `dof` degrees of freedom, by bisection on `t_two_sided_p`."""
    low, high = 0.0, 1e3
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if 1 - t_two_sided_p(mid, dof) / 2 < p else (low, mid)
    return (low + high) / 2


def interval95(values: list[float]) -> tuple[float, float]:
    """The mean and the half-width of its 95% confidence interval (Student's t over the values, which are taken as
    independent draws: one per seed); the half-width is inf for a single value."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, math.inf
    return mean, t_quantile(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def with_interval(values: list[float], digits: int = 3) -> str:
    """`mean ± half-width` of the 95% interval (the mean alone for a single value)."""
    mean, half = interval95(values)
    return f"{mean:.{digits}f}" if math.isinf(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def paired_p(differences: list[float]) -> float:
    """The two-sided p-value of the paired t-test that the differences' mean is 0 (1.0 for fewer than 2, or for
    differences that are all 0; 0.0 for identical non-zero ones)."""
    if len(differences) < 2:
        return 1.0
    mean, sd = statistics.mean(differences), statistics.stdev(differences)
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    return t_two_sided_p(mean / (sd / math.sqrt(len(differences))), len(differences) - 1)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values, in the given order: rejecting where an adjusted value
    is below a level keeps the chance of any false rejection in the family below that level."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def _detectable(n: int, sd: float, alpha: float, power: float) -> float:
    return (t_quantile(1 - alpha / 2, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)


def detectable_difference(differences: list[float], alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference that a paired t-test over as many pairs as `differences`, at their spread,
    detects at two-sided level `alpha` with probability `power`: (t_{1-alpha/2} + t_power) sd / sqrt(n), t with
    n - 1 degrees of freedom; inf for fewer than 2."""
    if len(differences) < 2:
        return math.inf
    return _detectable(len(differences), statistics.stdev(differences), alpha, power)


def seeds_to_detect(differences: list[float], alpha: float = 0.05, power: float = 0.8, most: int = 1000) -> int | None:
    """How many paired seeds would make the observed mean difference, at the observed spread, detectable
    (`detectable_difference`); None for fewer than 2 differences, a zero mean, or more than `most` seeds."""
    if len(differences) < 2 or statistics.mean(differences) == 0:
        return None
    mean, sd = abs(statistics.mean(differences)), statistics.stdev(differences)
    if _detectable(most, sd, alpha, power) > mean:
        return None
    low, high = 1, most  # detectable at `high` seeds, never at 1
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if _detectable(middle, sd, alpha, power) <= mean else (middle, high)
    return high


def spread(values: list[float], digits: int = 3) -> str:
    """The mean, and the standard deviation when there is more than one value."""
    mean = f"{statistics.mean(values):.{digits}f}"
    return mean if len(values) == 1 else f"{mean} ± {statistics.stdev(values):.{digits}f}"


def table(head: list[str], rows: list[list]) -> str:
    """A Markdown table; floats with 4 significant digits."""
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def score_turns(record: dict) -> list[int]:
    """The turns h of a multi-turn run's `eval/score_turn{h}` metrics, in order."""
    return sorted(int(k.rsplit("turn", 1)[1]) for k in record if k.startswith("eval/score_turn"))


def plot_by_turn(bars: dict[str, list], turns: list[int], ylabel: str, path: str) -> None:
    """Grouped bars, one group per turn h: `bars` maps a label to one value per turn, or one (mean, 95% half-width)
    per turn, drawn with its interval (none where the half-width is inf)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(bars)
    for i, (name, values) in enumerate(bars.items()):
        means, halves = zip(*(v if isinstance(v, tuple) else (v, 0.0) for v in values))
        ax.bar([t + (i - (len(bars) - 1) / 2) * width for t in turns], means, width, label=name,
               yerr=[0.0 if math.isinf(h) else h for h in halves], capsize=2)
    ax.set_xticks(turns, [f"by turn {t}" for t in turns])
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
