"""benchmarks/peer_bench.py: rebel.py against TRL's RLOO, refuel.py against TRL's GRPO with a rollout function, and
the machine's limit.

The smoke test runs the benchmark at toy size (the tiny random policy, 2 prompts x 2 answers of 8 tokens, 2
iterations, one repeat; the multi-turn part with 2 openings x 2 dialogues for one iteration; TRL's vLLM colocate
side left out, since on vLLM's CPU build it only starts an engine to fail at its first weight sync, which the
committed results record) and checks what could break: the JSON's keys, the same prompts and the same generated
tokens on both sides, every phase and ratio finite, and that `--report` reprints the tables from the JSON alone.
The committed docs/peer_bench.json is checked without running anything: at least 3 repeats, finite positive
ratios, the share of the hardware limit, and the figures the docs quote from it."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks", "peer_bench.py")
PHASES = ["generation", "scoring", "logprobs", "update", "sync"]

sys.path.insert(0, os.path.join(REPO, "benchmarks"))


def run_bench(*flags, env, timeout=900):
    out = subprocess.run([sys.executable, BENCH, *flags], env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-5000:]
    return out


def positive(value):
    return math.isfinite(value) and value > 0


@pytest.mark.slow
def test_peer_bench_at_toy_size(tmp_path, tiny_model, script_env):
    pytest.importorskip("trl", reason="TRL is the benchmark's peer: setup.sh installs requirements-bench.txt")
    out = run_bench("--model", tiny_model, "--repeats", "1", "--num_iterations", "2", "--pairs", "2",
                    "--max_new_tokens", "8", "--skip_colocate", "--multi_repeats", "1", "--multi_iterations", "1",
                    "--multi_pairs", "2", "--output_dir", str(tmp_path), "--work_dir", str(tmp_path / "runs"),
                    env=script_env)
    assert os.path.getsize(tmp_path / "peer_bench.png") > 0
    with open(tmp_path / "peer_bench.json") as f:
        found = json.load(f)
    assert {"single", "multi", "probes", "model_facts", "limits", "ratios", "loadavg", "versions"} <= set(found)
    assert len(found["loadavg"]["before"]) == len(found["loadavg"]["after"]) == 3
    assert found["versions"]["trl"] == "1.16.0"

    single = found["single"]
    assert list(single["runs"]) == ["rebel.py", "TRL RLOO"]  # the colocate side was left out
    for name, [run] in single["runs"].items():
        assert run["error"] is None and run["peak_rss_bytes"] > 0
        assert [i["iteration"] for i in run["iterations"]] == [1, 2]
        for it in run["iterations"]:
            assert all(math.isfinite(it["phases"][p]) and it["phases"][p] >= 0 for p in PHASES), (name, it)
            assert math.isclose(sum(it["phases"].values()), it["seconds"], rel_tol=1e-6)
            # a random tiny model almost never ends within 8 tokens: every answer runs to the cap on both sides
            assert it["generated_tokens"] == 2 * 2 * 8
    check = single["work_check"]
    assert check["prompt_tokens_identical"] and check["generated_tokens_ratio"] == 1.0
    assert check["generated_tokens"]["rebel.py"] == check["generated_tokens"]["TRL RLOO"]
    # one repeat gives each side one slope and no interval, so no direction is shown
    assert {name: len(v["slopes"]) for name, v in check["learning"].items()} == {"rebel.py": 1, "TRL RLOO": 1}
    assert check["learning_agrees"] is None

    [ratio] = found["ratios"]["TRL RLOO"]["seconds_per_iteration"]
    assert positive(ratio)
    assert all(positive(v) for r in found["ratios"].values() for values in r.values() for v in values)

    multi = found["multi"]["runs"]
    for name in ("refuel.py", "TRL GRPO, rollout_func"):
        [run] = multi[name]
        assert run["error"] is None and len(run["iterations"]) == 1 and run["iterations"][0]["generated_tokens"] > 0
    assert multi["TRL GRPO, rollout_func"][0]["iterations"][0]["dialogues"] == 4  # 2 openings x 2 generations

    limits = found["limits"]
    assert positive(limits["bandwidth_gb_per_s"]) and positive(limits["matmul_gflops"])
    rows = {r["side"]: r for r in limits["rows"]}
    assert set(rows) == {"rebel.py", "TRL RLOO", "refuel.py", "TRL GRPO, rollout_func"}
    assert all(positive(s) for r in rows.values() for s in r["rollout_share"])
    assert all(positive(s) for s in rows["rebel.py"]["train_share"] + rows["TRL RLOO"]["train_share"])

    assert "| TRL RLOO / rebel.py |" in out.stdout and "### (3) The machine's limit" in out.stdout
    report = run_bench("--output_dir", str(tmp_path), "--report", env=script_env).stdout
    assert "|---|" in report and report.strip() in out.stdout


def test_learning_shows_a_direction_only_when_the_repeats_agree():
    import peer_bench

    def run(*scores):
        return {"iterations": [{"score": v} for v in scores]}

    rising = peer_bench.learning([run(0.1, 0.2, 0.3), run(0.2, 0.3, 0.5), run(0.0, 0.1, 0.2)])
    assert rising["slopes"] == pytest.approx([0.1, 0.15, 0.1]) and rising["sign"] == 1
    assert peer_bench.learning([run(0.3, 0.2), run(0.5, 0.35), run(0.4, 0.28)])["sign"] == -1
    mixed = peer_bench.learning([run(0.1, 0.3), run(0.3, 0.1), run(0.2, 0.25)])
    assert mixed["sign"] == 0 and mixed["half"] > abs(mixed["mean"])
    assert peer_bench.learning([run(0.1, 0.9)])["half"] is None  # one repeat: no interval


def committed():
    with open(os.path.join(REPO, "docs", "peer_bench.json")) as f:
        return json.load(f)


def test_the_committed_results_hold_ratios_with_their_spread_and_the_hardware_share():
    found = committed()
    assert os.path.getsize(os.path.join(REPO, "docs", "peer_bench.png")) > 0
    runs = found["single"]["runs"]
    assert len(runs["rebel.py"]) >= 3 and len(runs["TRL RLOO"]) >= 3
    ratios = found["ratios"]["TRL RLOO"]
    assert len(ratios["seconds_per_iteration"]) >= 3 and all(positive(v) for v in ratios["seconds_per_iteration"])
    colocate = runs.get("TRL RLOO, vLLM colocate", [])
    assert colocate and (colocate[0]["error"] or len(colocate) >= 3)  # it ran, or TRL's error is recorded
    assert all(positive(s) for r in found["limits"]["rows"] for s in r["rollout_share"])


def test_the_docs_quote_the_committed_results():
    import peer_bench

    found = committed()
    headline = peer_bench.fmt(found["ratios"]["TRL RLOO"]["seconds_per_iteration"])
    mean = re.match(r"[0-9.]+", headline).group(0)
    with open(os.path.join(REPO, "docs", "scale.md")) as f:
        scale = f.read()
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    assert "## Against the peers" in scale and "peer_bench.png" in scale
    assert headline in scale  # the table, printed by --report
    assert f"{mean}x" in readme
