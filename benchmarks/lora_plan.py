"""The memory plan of REFUEL's setting one with LoRA adapters on one 80 GiB GPU, with and without activation
checkpointing, and what a weight sync moves with LoRA against full fine-tuning: from Llama-3-8B's config on the meta
device (`memory_plan.run_plan`, the plan the scripts print at start), nothing downloaded.

    python benchmarks/lora_plan.py          # the two plans, whether each fits, and the sync sizes (docs/scale.md)
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import checkpoints  # noqa: E402
import memory_plan  # noqa: E402

GiB = 2**30
LLAMA3_8B = os.path.join(REPO, "tests", "data", "llama3_8b_config.json")
"""Llama-3-8B's config (hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336, vocabulary 128256)"""
SETTING_ONE_ON_ONE_GPU = dict(
    model_path=LLAMA3_8B, reward_model=LLAMA3_8B, capacity=80 * GiB, world_size=1, bf16=True, kv_cache_bytes=None,
    sync_bucket_mb=512, rows=2, sequence_tokens=8192, response_tokens=1024, reference=False,
    engine_memory_share=None, engine_sleep=True, max_model_len=8192)
"""`refuel.py --preset refuel-setting-one --lora_rank 8` on one rank: the policy, ArmoRM (a Llama-3-8B trunk) whole
in bf16, the 70B user on its own server, the GPU defaults (bf16, engine sleep), micro-batches of one pair (2 rows)
of at most the 8,192-token context with logits over 1,024 response tokens"""


def plan_text(lora: checkpoints.LoraArgs, gradient_checkpointing: bool) -> str:
    """The plan as the run prints it, then whether it fits the device (`memory_plan.check_fits`'s verdict)."""
    try:
        plan = memory_plan.run_plan(**SETTING_ONE_ON_ONE_GPU, gradient_checkpointing=gradient_checkpointing, lora=lora)
    except SystemExit as e:  # the engine's share: nothing left for it
        return f"refused at start: {e}"
    text = memory_plan.format_plan(plan, 1) + "\n" + memory_plan.share_line(plan, 80 * GiB, None, 8192)
    try:
        memory_plan.check_fits(plan, 80 * GiB)
        return text + "\nfits one 80 GiB device"
    except SystemExit as e:
        return text + f"\ndoes not fit: {e}"


PRESETS = [  # (preset, sequence tokens of a micro-batch's rows, a KL term, its reward model)
    ("refuel.py --preset refuel-setting-one", 8192, False, "ArmoRM (8B)"),
    ("refuel.py --preset refuel-setting-two-hh", 8192, True, "FsfairX (8B)"),
    ("refuel.py --preset refuel-setting-two-ultrainteract", 8192, False, "FsfairX (8B)"),
    ("rebel.py --preset rebel-ultrafeedback", 2048, True, "FsfairX (8B)"),
]
"""The presets whose policy is Llama-3-8B, with rows at the bound the plan takes: REFUEL's whole 8,192-token context
(setting two's dialogues have no cap of their own below it), REBEL's 1,024 prompt and 1,024 answer tokens"""


def presets_table() -> str:
    """Each preset on one 80 GiB GPU with LoRA r = 8 (its reward model whole in bf16, the user on a server or the
    dataset), with and without activation checkpointing: the plan's total, or why it does not fit."""
    lines = ["| run, `--lora_rank 8`, one 80 GiB GPU | reward model | checkpointing on | off |", "|---|---|---|---|"]
    for name, tokens, reference, reward_model in PRESETS:
        cells = []
        for checkpointing in (True, False):
            flags = {**SETTING_ONE_ON_ONE_GPU, "sequence_tokens": tokens, "reference": reference,
                     "gradient_checkpointing": checkpointing, "lora": checkpoints.LoraArgs(lora_rank=8)}
            plan = memory_plan.run_plan(**flags)
            verdict = "fits" if plan.total <= 80 * GiB else "does not fit"
            cells.append(f"{plan.total / GiB:.1f} GiB, {verdict}")
        lines.append(f"| `{name}` | {reward_model} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def sync_table() -> str:
    """GiB a weight sync moves (bf16) for Llama-3-8B: full fine-tuning, and LoRA on every linear layer of the
    blocks or on the attention's q and v projections only (whose block, q/k/v/o, then reloads whole)."""
    rows = [("full fine-tuning", None), ("LoRA, every linear layer (default)", ("all-linear",)),
            ("LoRA, q_proj and v_proj", ("q_proj", "v_proj"))]
    lines = ["| weights | a sync moves | share of full |", "|---|---|---|"]
    full = None
    for label, targets in rows:
        lora = None if targets is None else checkpoints.LoraArgs(lora_rank=8, lora_target_modules=targets)
        plan = memory_plan.plan_memory(memory_plan.meta_model(LLAMA3_8B, lora), world_size=1, bf16=True,
                                       gradient_checkpointing=True, kv_cache_bytes=0, sync_bucket_bytes=512 * 2**20,
                                       rows=1, sequence_tokens=1, response_tokens=1)
        full = full or plan.sync_bytes
        lines.append(f"| {label} | {plan.sync_bytes / GiB:.2f} GiB | {plan.sync_bytes / full:.0%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    lora = checkpoints.LoraArgs(lora_rank=8)
    for checkpointing in (True, False):
        print(f"## LoRA r=8, activation checkpointing {'on' if checkpointing else 'off'}\n")
        print(plan_text(lora, checkpointing) + "\n")
    print("## Full fine-tuning, activation checkpointing on\n")
    print(plan_text(None, True) + "\n")
    print("## The presets on one GPU\n")
    print(presets_table() + "\n")
    print("## What a weight sync moves (Llama-3-8B, bf16)\n")
    print(sync_table())
