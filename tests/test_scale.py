"""Memory at scale: streamed weight syncs, checkpoint exports, activation checkpointing, and the memory plan of an 8B
and a 70B model checked on 8 simulated ranks against numbers computed by hand."""

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


@pytest.fixture(scope="module")
def simulated_ranks():
    """Ranks 0 and 7 of 8 for each config, simulated by one simulate_fsdp.py process: {(config, rank): result}."""
    cases = [f"{os.path.join(HERE, 'data', config)}:{rank}" for config in sorted(SIMULATED) for rank in (0, 7)]
    out = subprocess.run([sys.executable, os.path.join(HERE, "simulate_fsdp.py"), "8", *cases],
                         capture_output=True, text=True, timeout=600, check=True)
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"config"')]
    assert [f"{r['config']}:{r['rank']}" for r in results] == cases
    return {(os.path.basename(r["config"]), r["rank"]): r for r in results}


@pytest.mark.slow  # starts simulate_fsdp.py (once for both configs) for two of the 8 ranks
@pytest.mark.parametrize("config", sorted(SIMULATED))
def test_simulated_8_ranks_shards_sync_and_plan(config, simulated_ranks):
    expected = SIMULATED[config]
    path = os.path.join(HERE, "data", config)
    for rank in (0, 7):
        result = simulated_ranks[(config, rank)]
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
    root = 2 * expected["embedding"] + expected["hidden"]  # the root FSDP2 unit: both embeddings, the final norm
    assert plan.gathered_root == 2 * root
    assert plan.sync_bucket == 2 * expected["embedding"]
    assert plan.checkpoint_bucket == max(exported)  # what the simulated export gathered
    assert plan.activations == 4 * 2048 * expected["per_token"] * 2 + logits
    assert plan.total == (16 * shard + 4 * expected["layer"] + 2 * root + 2 * expected["parameters"] + 20 * GiB
                          + 2 * expected["embedding"] + 4 * expected["embedding"] + plan.activations)


def test_plan_fits_an_80gib_device_only_with_checkpointing_for_8b_and_never_for_70b():
    model = memory_plan.meta_model(os.path.join(HERE, "data", "llama3_8b_config.json"))
    common = dict(world_size=8, bf16=True, kv_cache_bytes=20 * GiB, sync_bucket_bytes=512 * MiB, rows=4,
                  sequence_tokens=2048, response_tokens=1024)
    with_checkpointing = memory_plan.plan_memory(model, gradient_checkpointing=True, **common)
    assert with_checkpointing.total == 66_396_938_240  # 61.8 GiB: fits
    memory_plan.check_fits(with_checkpointing, 80 * GiB)
    without = memory_plan.plan_memory(model, gradient_checkpointing=False, **common)
    assert without.total == 106_897_137_664  # 99.6 GiB: activations of 32 layers are kept
    with pytest.raises(SystemExit, match="--gradient_checkpointing"):
        memory_plan.check_fits(without, 80 * GiB)
    # the log shows every term under its phase as the plan holds it (the activations labelled as a bound), each
    # phase's sum, and their sum as total when the engine stays awake
    lines = memory_plan.format_plan(without, 8).splitlines()
    assert lines[0] == "memory plan per rank (8.03B parameters, 8 ranks; the engine stays awake):"
    shown = {line.rsplit(None, 2)[0].strip(): float(line.split()[-2]) for line in lines[1:] if line.endswith("GiB")}
    terms = memory_plan.MemoryPlan.RESIDENT + memory_plan.MemoryPlan.ROLLOUT + memory_plan.MemoryPlan.TRAINING
    labels = [t if t != "activations" else "activations (bound)" for t in terms]
    assert list(shown) == labels + ["rollout phase", "training phase", "total (every term)"]
    assert all(shown[label] == round(getattr(without, t) / GiB, 2) for t, label in zip(terms, labels))
    assert shown["total (every term)"] == 99.56 == pytest.approx(sum(shown[label] for label in labels),
                                                                 abs=0.005 * len(terms))  # each rounded to 0.01

    big = memory_plan.plan_memory(memory_plan.meta_model(os.path.join(HERE, "data", "llama3.1_70b_config.json")),
                                  gradient_checkpointing=True, **common)
    # 141 GB of bf16 weights in a tensor-parallel-1 engine cannot sit on one 80 GiB device
    with pytest.raises(SystemExit, match="engine_weights"):
        memory_plan.check_fits(big, 80 * GiB)


# refuel.py --preset refuel-setting-one on 8 x 80 GiB: Llama-3-8B policy; ArmoRM whole on every rank (a Llama-3-8B
# trunk: counted as transformers' LlamaForSequenceClassification of the shipped config, no lm_head and a 2-label
# score head); the 70B user on a server; no reference (kl_coef 0); bf16, checkpointing and engine sleep (the GPU
# defaults); 512 MiB buckets; micro-batches of one pair (2 rows) of at most the 8,192-token context, with logits
# over 1,024 response tokens
LLAMA3_8B = os.path.join(HERE, "data", "llama3_8b_config.json")
SETTING_ONE = dict(model_path=LLAMA3_8B, reward_model=LLAMA3_8B, capacity=80 * GiB, world_size=8, bf16=True,
                   gradient_checkpointing=True, kv_cache_bytes=None, sync_bucket_mb=512, rows=2, sequence_tokens=8192,
                   response_tokens=1024, reference=False, engine_memory_share=None, engine_sleep=True,
                   max_model_len=8192)
PARAMETERS, EMBEDDING, LAYER, HIDDEN = 8_030_261_248, 525_336_576, 218_112_000, 4096  # Llama-3-8B, as above
SHARD = PARAMETERS // 8


def test_setting_one_on_8_ranks_counts_the_reward_model_and_gives_the_engine_what_the_rollout_leaves():
    plan = memory_plan.run_plan(**SETTING_ONE)
    # the reward model: the trunk (no lm_head) and a 2 x 4096 score head, in bf16: 13.98 GiB
    assert plan.reward_model == 2 * (PARAMETERS - EMBEDDING + 2 * HIDDEN) == 15_009_865_728
    assert (plan.user_engine, plan.reference, plan.critic) == (0, 0, 0)
    # held throughout: fp32 weight shard 3.74, AdamW 7.48, the reward model 13.98, the gathered root (embedding,
    # head, final norm in bf16) 1.96 GiB
    resident = 4 * SHARD + 8 * SHARD + plan.reward_model + 2 * (2 * EMBEDDING + HIDDEN)
    assert resident == 29_156_612_096
    # the engine gets what the rest of the rollout phase (the resident state, a 0.98 GiB sync bucket and a 1.96 GiB
    # export bucket: the embedding in bf16 and in fp32) leaves of 90% of the device: 41.9 GiB, 0.524 of it
    others = resident + 2 * EMBEDDING + 4 * EMBEDDING
    share = (0.9 * 80 * GiB - others) / (80 * GiB)
    assert plan.engine_memory_share == pytest.approx(share, rel=1e-12) and 0.52 < share < 0.53
    assert plan.engine_weights == 2 * PARAMETERS
    assert abs(plan.kv_cache - (0.9 * 80 * GiB - others - 2 * PARAMETERS)) <= 1  # 26.95 GiB
    assert plan.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2  # K and V, 32 layers, 8 KV heads of 128, bf16
    assert plan.kv_cache // plan.kv_bytes_per_token == 220_796  # 27 contexts of 8,192 tokens
    assert plan.total == plan.rollout == pytest.approx(0.9 * 80 * GiB, abs=1)
    # training, the engine asleep: gradients 3.74, two gathered layers 0.81, activations 8.03 GiB
    activations = 2 * 8192 * (32 * HIDDEN + 6 * HIDDEN + 2 * 1024 + 4 * 14336) * 2 + 2 * 1024 * 128256 * (2 + 4)
    assert plan.activations == activations == 8_622_440_448
    assert plan.training == resident + 4 * SHARD + 4 * LAYER + activations == 42_666_631_168  # 39.74 GiB
    memory_plan.check_fits(plan, 80 * GiB)
    lines = memory_plan.format_plan(plan, 8).splitlines()
    assert lines[0] == "memory plan per rank (8.03B parameters, 8 ranks; the engine sleeps while the trainer trains):"
    assert lines[-3:] == ["  rollout phase                 72.00 GiB", "  training phase                39.74 GiB",
                          "  total (the larger phase)      72.00 GiB"]
    assert memory_plan.share_line(plan, 80 * GiB, None, 8192) == (
        "policy engine memory share 0.524 (what the rollout phase leaves of 0.9 of the device): a KV cache of "
        "26.95 GiB, 220,796 tokens, 27.0 contexts of 8,192 (less vLLM's own activations and CUDA graphs)")

    # without sleep the engine keeps 0.3 of the device through training too, and the total adds both phases
    awake = memory_plan.run_plan(**{**SETTING_ONE, "engine_sleep": False})
    assert awake.engine_memory_share == 0.3
    assert awake.kv_cache == int(0.3 * 80 * GiB) - 2 * PARAMETERS  # 9.04 GiB
    assert awake.total == awake.rollout + awake.training - resident
    # without checkpointing the training phase alone exceeds the device, and the flag that helps is named
    with pytest.raises(SystemExit, match="activations .* --gradient_checkpointing"):
        memory_plan.check_fits(memory_plan.run_plan(**{**SETTING_ONE, "gradient_checkpointing": False}), 80 * GiB)


def test_a_colocated_llm_user_takes_its_share_first_and_the_policy_engine_what_is_left():
    # --user llm on the policy's own model: its engine takes 0.3 of the device (its bf16 weights and the KV cache
    # vLLM sizes from that share) and never sleeps
    plan = memory_plan.run_plan(**SETTING_ONE, user_model=LLAMA3_8B)
    assert plan.user_engine == int(0.3 * 80 * GiB)
    others = 29_156_612_096 + 6 * EMBEDDING + plan.user_engine
    assert plan.engine_memory_share == pytest.approx((0.9 * 80 * GiB - others) / (80 * GiB), rel=1e-12)
    assert plan.kv_cache // plan.kv_bytes_per_token == 24_188  # 2.95 GiB: about 3 contexts of 8,192
    assert plan.training == 42_666_631_168 + plan.user_engine
    # with a KL reference as well, what is left (12.2 GiB) does not hold the engine's weights and one context's KV
    # cache (16.0 GiB): refused before anything loads, with the numbers
    with pytest.raises(SystemExit, match=r"the policy's engine needs 16.0 GiB .* leaves it 12.2 GiB of 0.9 x 80.0"):
        memory_plan.run_plan(**{**SETTING_ONE, "reference": True}, user_model=LLAMA3_8B)


def test_the_engine_share_is_the_one_given_the_default_without_a_gpu_and_refused_when_nothing_fits():
    assert memory_plan.run_plan(**{**SETTING_ONE, "engine_memory_share": 0.45}).engine_memory_share == 0.45
    cpu = memory_plan.run_plan(**{**SETTING_ONE, "capacity": 0})
    assert (cpu.engine_memory_share, cpu.kv_cache) == (0.3, engines.CPU_KV_CACHE_BYTES)
    assert memory_plan.user_engine_share(None) == 0.3 and memory_plan.user_engine_share(0.2) == 0.2
    # a 70B policy's bf16 copy (131 GiB) cannot have an engine on one 80 GiB device
    with pytest.raises(SystemExit, match=r"the policy's engine needs 133.9 GiB \(its weights, 131.4 GiB"):
        memory_plan.run_plan(**{**SETTING_ONE, "model_path": os.path.join(HERE, "data", "llama3.1_70b_config.json")})


def test_a_reward_model_without_a_classification_class_counts_as_its_trunk(tmp_path):
    from transformers import AutoModel, CohereConfig

    # transformers has no sequence-classification class for Cohere (as for a reward model's remote-code head)
    CohereConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2).save_pretrained(tmp_path)
    model = memory_plan.meta_reward_model(str(tmp_path))
    with torch.device("meta"):
        trunk = AutoModel.from_config(CohereConfig.from_pretrained(tmp_path))
    assert type(model) is type(trunk)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in trunk.parameters())


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
    assert engines.sync_weights(engine, model, probe, 1, device, 1e-5, bucket_mb=0.01)["logprob_gap_max"] < 1e-5


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
    # a run's quiet console (lifecycle.quiet_third_party), started in this process by an earlier test, raises vLLM's
    # level to ERROR: the capture needs its warnings whatever ran before
    level = vllm_logger.level
    vllm_logger.setLevel(logging.WARNING)
    vllm_logger.addHandler(handler)
    try:
        # the plain reload RPC of a whole state dict logs the warning: the capture sees vLLM's records
        state = helpers.full_state_dict(model)
        vllm_engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state.items())})
        assert any("Failed to load weights" in r.getMessage() for r in records)
        records.clear()
        # 64 KiB buckets: the tiny model's 50 tensors arrive in many pieces
        probe = list(range(5, 40))
        synced = engines.sync_weights(vllm_engine, model, probe, 1, device, 1e-4, bucket_mb=1 / 16)
        assert synced["logprob_gap_max"] < 1e-4
        assert not [r.getMessage() for r in records if "Failed to load weights" in r.getMessage()]
    finally:
        vllm_logger.removeHandler(handler)
        vllm_logger.setLevel(level)
    # the rotary cache set aside during the reload is back, and the engine keeps sampling
    assert vllm_engine.generate([probe], 4, 0.0, [0])[0].token_ids
    vllm_engine.load_weights(helpers.full_state_dict(utils.load_causal_lm(tiny_model)))
