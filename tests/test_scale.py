"""Memory at scale: streamed weight syncs, checkpoint exports, activation checkpointing, and the memory plan of an 8B
and a 70B model checked on 8 simulated ranks against numbers computed by hand."""

import dataclasses
import json
import logging
import os
import subprocess
import sys

import helpers
import pytest
import torch

import engines
import memory_plan
import utils

HERE = os.path.dirname(os.path.abspath(__file__))
GiB, MiB = 2**30, 2**20


def test_sync_buckets_group_consecutive_tensors():
    # 3 | 4+2 (=6, the limit) | 10 (over the limit, alone) | 1
    assert utils.size_buckets([3, 4, 2, 10, 1], 6) == [[0], [1, 2], [3], [4]]
    assert utils.size_buckets([], 6) == []


# Hand-computed from the config.json files (no weights): per decoder layer q and o are h*h, k and v h*kv with
# kv = 8 heads * 128, the MLP 3*h*i, two norms h; plus embedding and untied head v*h each, and the final norm h.
# Llama-3-8B:    h=4096, i=14336, 32 layers: 218,112,000 per layer, 525,336,576 per embedding -> 8,030,261,248
# Llama-3.1-70B: h=8192, i=28672, 80 layers: 855,654,400 per layer, 1,050,673,152 per embedding -> 70,553,706,496
SIMULATED = {
    "llama3_8b_config.json": dict(parameters=8_030_261_248, layers=32, hidden=4096, layer=218_112_000,
                                  embedding=525_336_576, per_token=4096 * 32 + 6 * 4096 + 2 * 1024 + 4 * 14336),
    "llama3.1_70b_config.json": dict(parameters=70_553_706_496, layers=80, hidden=8192, layer=855_654_400,
                                     embedding=1_050_673_152, per_token=8192 * 80 + 6 * 8192 + 2 * 1024 + 4 * 28672),
}


@pytest.mark.slow  # starts simulate_fsdp.py for two of the 8 ranks
@pytest.mark.parametrize("config", sorted(SIMULATED))
def test_simulated_8_ranks_shards_sync_and_plan(config):
    expected = SIMULATED[config]
    path = os.path.join(HERE, "data", config)
    for rank in (0, 7):
        out = subprocess.run([sys.executable, os.path.join(HERE, "simulate_fsdp.py"), path, str(rank), "8"],
                             capture_output=True, text=True, timeout=300, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["meta"]  # nothing was allocated
        local = result["local"]
        # every dimension divides by 8: each rank holds exactly an eighth, the embedding in 16,032-row slices
        assert sum(torch.Size(s).numel() for s in local.values()) * 8 == expected["parameters"]
        assert local["model.embed_tokens.weight"] == [128256 // 8, expected["hidden"]]
        assert local["model.layers.0.self_attn.k_proj.weight"] == [1024 // 8, expected["hidden"]]
        # the sync streams every tensor whole, in bf16: 2 embeddings, 9 per layer, the final norm
        streamed = result["streamed"]
        assert len(streamed) == 3 + 9 * expected["layers"]
        assert {dtype for _, _, dtype in streamed} == {"torch.bfloat16"}
        assert sum(torch.Size(s).numel() for _, s, _ in streamed) == expected["parameters"]
        sizes = [2 * torch.Size(s).numel() for _, s, _ in streamed]
        buckets = utils.size_buckets(sizes, 512 * MiB)
        largest = max(sum(sizes[i] for i in b) for b in buckets)
        assert largest == 2 * expected["embedding"]  # the embedding, alone in its bucket
        assert all(sum(sizes[i] for i in b) <= 512 * MiB for b in buckets if len(b) > 1)
        # the checkpoint's export gathers every tensor once, whole, in fp32 buckets of at most 512 MiB: only a
        # tensor larger than that (an embedding) makes a bucket of its own that is bigger
        exported = [sum(n for _, n in bucket) for bucket in result["exported"]]
        assert sum(exported) == 4 * expected["parameters"]
        assert len([name for bucket in result["exported"] for name, _ in bucket]) == 3 + 9 * expected["layers"]
        assert all(size <= 512 * MiB for size, bucket in zip(exported, result["exported"]) if len(bucket) > 1)
        assert max(exported) == 4 * expected["embedding"]

    plan = memory_plan.plan_memory(memory_plan.meta_model(path), world_size=8, bf16=True, gradient_checkpointing=True,
                                   kv_cache_bytes=20 * GiB, sync_bucket_bytes=512 * MiB, rows=4, sequence_tokens=2048,
                                   response_tokens=1024)
    shard = expected["parameters"] // 8
    logits = 4 * 1024 * 128256 * (2 + 4)  # over the response columns only
    assert plan.parameters == expected["parameters"]
    assert (plan.weights, plan.gradients, plan.optimizer, plan.reference) == (4 * shard, 4 * shard, 8 * shard, 0)
    assert plan.engine_weights == 2 * expected["parameters"]
    assert plan.gathered_layers == 2 * 2 * expected["layer"]
    assert plan.sync_bucket == 2 * expected["embedding"]
    assert plan.checkpoint_bucket == max(exported)  # what the simulated export gathered
    assert plan.activations == 4 * 2048 * expected["per_token"] * 2 + logits
    assert plan.total == (16 * shard + 4 * expected["layer"] + 2 * expected["parameters"] + 20 * GiB
                          + 2 * expected["embedding"] + 4 * expected["embedding"] + plan.activations)


def test_plan_fits_an_80gib_device_only_with_checkpointing_for_8b_and_never_for_70b():
    model = memory_plan.meta_model(os.path.join(HERE, "data", "llama3_8b_config.json"))
    common = dict(world_size=8, bf16=True, kv_cache_bytes=20 * GiB, sync_bucket_bytes=512 * MiB, rows=4,
                  sequence_tokens=2048, response_tokens=1024)
    with_checkpointing = memory_plan.plan_memory(model, gradient_checkpointing=True, **common)
    assert with_checkpointing.total == 64_295_583_744  # 59.9 GiB: fits
    memory_plan.check_fits(with_checkpointing, 80 * GiB)
    without = memory_plan.plan_memory(model, gradient_checkpointing=False, **common)
    assert without.total == 104_795_783_168  # 97.6 GiB: activations of 32 layers are kept
    with pytest.raises(SystemExit, match="--gradient_checkpointing"):
        memory_plan.check_fits(without, 80 * GiB)
    # the log shows every term as the plan holds it (the activations labelled as a bound), and their sum as total
    lines = memory_plan.format_plan(without, 8).splitlines()
    assert lines[0] == "memory plan per rank (8.03B parameters, 8 ranks):"
    shown = {label.strip(): float(gib) for label, gib, unit in (line.rsplit(None, 2) for line in lines[1:])
             if unit == "GiB"}
    terms = [f.name for f in dataclasses.fields(without) if f.name != "parameters"]
    assert list(shown) == [t if t != "activations" else "activations (bound)" for t in terms] + ["total"]
    assert all(shown[t if t != "activations" else "activations (bound)"] == round(getattr(without, t) / GiB, 2)
               for t in terms)
    assert shown["total"] == 97.60 == pytest.approx(sum(shown[t] for t in shown if t != "total"),
                                                    abs=0.005 * len(terms))  # each term rounded to 0.01

    big = memory_plan.plan_memory(memory_plan.meta_model(os.path.join(HERE, "data", "llama3.1_70b_config.json")),
                                  gradient_checkpointing=True, **common)
    # 141 GB of bf16 weights in a tensor-parallel-1 engine cannot sit on one 80 GiB device
    with pytest.raises(SystemExit, match="engine_weights"):
        memory_plan.check_fits(big, 80 * GiB)


def test_gradient_checkpointing_same_losses_and_gradients(process_group, tiny_model):
    device = process_group[2]
    batch = torch.randint(0, 1000, (3, 24), generator=torch.Generator().manual_seed(0)).to(device)
    results = []
    for checkpointing in (False, True):
        # eval mode, as the scripts train: the checkpointing must not depend on it
        model = utils.shard_model(utils.load_causal_lm(tiny_model, torch.float32, device), False, checkpointing)
        calls = []
        # a pre-hook: the checkpoint's recompute stops as soon as the saved tensors are back, before a layer's
        # forward hooks would run
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        grads = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}
        results.append((loss.item(), grads, len(calls)))
    (loss, grads, calls), (loss_ckpt, grads_ckpt, calls_ckpt) = results
    assert (calls, calls_ckpt) == (1, 2)  # the layer really was recomputed in the backward
    assert loss_ckpt == pytest.approx(loss, abs=1e-6)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-6, rtol=1e-5)


def test_streamed_weights_are_the_model_in_the_engine_dtype(process_group, tiny_model):
    device = process_group[2]
    model = utils.shard_model(utils.load_causal_lm(tiny_model, torch.float32, device), bf16=False)
    full = helpers.full_state_dict(model)
    streamed = dict(engines.stream_weights(model, torch.bfloat16, 4096))
    assert set(streamed) == set(full)  # the tied head too, under its own name
    for name, tensor in streamed.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, full[name].to(torch.bfloat16))
    # the transformers engine loads a stream too
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    engine = engines.TransformersEngine(tiny_model, device, torch.float32)
    probe = list(range(5, 40))
    assert engines.sync_weights(engine, model, probe, device, 1e-5, bucket_mb=0.01) < 1e-5


def test_streamed_vllm_sync_has_parity_and_no_rotary_warning(process_group, tiny_model, vllm_engine):
    device = process_group[2]
    model = utils.shard_model(utils.load_causal_lm(tiny_model), bf16=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    vllm_logger = logging.getLogger("vllm")
    vllm_logger.addHandler(handler)
    try:
        # the plain reload RPC of a whole state dict logs the warning: the capture sees vLLM's records
        state = helpers.full_state_dict(model)
        vllm_engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state.items())})
        assert any("Failed to load weights" in r.getMessage() for r in records)
        records.clear()
        # 64 KiB buckets: the tiny model's 50 tensors arrive in many pieces
        probe = list(range(5, 40))
        assert engines.sync_weights(vllm_engine, model, probe, device, 1e-4, bucket_mb=1 / 16) < 1e-4
        assert not [r.getMessage() for r in records if "Failed to load weights" in r.getMessage()]
    finally:
        vllm_logger.removeHandler(handler)
    # the rotary cache set aside during the reload is back, and the engine keeps sampling
    assert vllm_engine.generate([probe], 4, 0.0, [0])[0].token_ids
    vllm_engine.load_weights(helpers.full_state_dict(utils.load_causal_lm(tiny_model)))
