"""How much of each script is its algorithm: file lengths, the main block's length and its share of algorithm lines.

    python benchmarks/line_table.py          # the table, and whether each script meets its target

A main block's non-blank lines are split by statement (a comment line goes with the statement below it), the
iteration loop's statements one by one (an `if`, branch by branch): a statement is plumbing when it calls the
run's life (`run.<step>(...)`, `run.spent`, `lifecycle.`), checks flags, times a phase (`t0`, `timings`), puts an
engine to sleep or records metrics; every other statement (the models, the optimizer, the rollout, the targets, the
loss, the update) is the algorithm, reading a run's attribute (`run.device`, `run.policy_path`) included.
"""

import ast
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = {"refuel.py": 420, "rebel.py": 380, "dpo_multiturn.py": 500, "ma_ppo.py": 600}
"""the most lines each script may have"""
MAIN_BLOCK_LINES, ALGORITHM_SHARE, UTILS_LINES = 170, 0.60, 650
PLUMBING = re.compile(r"(?<![\w.])run\.(\w+\(|spent)|lifecycle\.|check_args\(|\bt0\b|\btimings\b|\bmetrics\b"
                      r"|engine\.sleep\(\)")


def main_block(tree: ast.Module) -> ast.If:
    return next(node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test))


def statements(block: ast.If) -> list[ast.stmt]:
    """The main block's statements, with the iteration loop (`for iteration in ...`) opened into its own."""
    out = []
    for node in block.body:
        if isinstance(node, ast.For) and ast.unparse(node.target) == "iteration":
            out += node.body
        else:
            out.append(node)
    return out


def label(node: ast.stmt, lines: list[str], kind: dict[int, str], floor: int) -> str:
    """Labels the lines of `node` (and the comment lines right above it, down to line `floor`) and returns the
    label; an `if` is labelled branch by branch, its header as its body when the body is all one kind."""
    if isinstance(node, ast.If):
        labels = {label(child, lines, kind, node.lineno) for child in node.body + node.orelse}
        own = labels.pop() if len(labels) == 1 else "algorithm"
        text = "\n".join(lines[node.lineno - 1 : node.body[0].lineno - 1])
        own = "plumbing" if PLUMBING.search(text) else own
        numbers = [node.lineno] + [n for n in range(node.lineno, node.end_lineno + 1)
                                   if lines[n - 1].strip().startswith("else") and n not in kind]
    else:
        own = "plumbing" if PLUMBING.search("\n".join(lines[node.lineno - 1 : node.end_lineno])) else "algorithm"
        numbers = range(node.lineno, node.end_lineno + 1)
    for number in numbers:
        kind.setdefault(number, own)
    above = node.lineno - 1
    while above > floor and lines[above - 1].strip().startswith("#"):
        kind.setdefault(above, own)
        above -= 1
    return own


def count(path: str) -> dict[str, int | float]:
    with open(path) as f:
        source = f.read()
    lines = source.split("\n")
    block = main_block(ast.parse(source))
    kind = {}  # line number (1-based) -> "algorithm" | "plumbing"
    for node in statements(block):
        label(node, lines, kind, block.lineno)
    loop = next((n for n in block.body if isinstance(n, ast.For) and ast.unparse(n.target) == "iteration"), None)
    if loop is not None:  # the loop's own header line
        kind[loop.lineno] = "plumbing"
    non_blank = [n for n in range(block.lineno, block.end_lineno + 1) if lines[n - 1].strip()]
    algorithm = sum(kind.get(n) == "algorithm" for n in non_blank)
    return {"lines": len(lines) - (lines[-1] == ""), "main": block.end_lineno - block.lineno + 1,
            "non_blank": len(non_blank), "algorithm": algorithm, "share": algorithm / len(non_blank)}


def table() -> tuple[str, bool]:
    rows = ["| script | lines (target) | main block (≤ 170) | algorithm lines in main | share (≥ 60%) |",
            "|---|---|---|---|---|"]
    ok = True
    for script, target in TARGETS.items():
        c = count(os.path.join(REPO, script))
        good = c["lines"] <= target and c["main"] <= MAIN_BLOCK_LINES and c["share"] >= ALGORITHM_SHARE
        ok &= good
        rows.append(f"| {script} | {c['lines']} ({target}) | {c['main']} | {c['algorithm']} of {c['non_blank']} | "
                    f"{c['share']:.0%}{'' if good else ' (misses a target)'} |")
    with open(os.path.join(REPO, "utils.py")) as f:
        utils_lines = len(f.read().rstrip("\n").split("\n"))
    ok &= utils_lines < UTILS_LINES
    rows.append(f"\nutils.py: {utils_lines} lines (target < {UTILS_LINES})")
    return "\n".join(rows), ok


if __name__ == "__main__":
    text, ok = table()
    print(text)
    sys.exit(0 if ok else 1)
