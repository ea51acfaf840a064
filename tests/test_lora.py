"""LoRA (`--lora_rank`): the reference is the initial policy without a second copy, the engine gets the merged
weights of the adapted blocks only and passes the sync checks, checkpoints hold what trains and export the folder
peft loads, the memory plan counts the adapters apart from the frozen base, bad flags are refused, and each of the
four scripts trains, syncs, checkpoints and resumes exactly with `--lora_rank 8`."""

import json
import math
import os
import shutil
import sys

import pytest
import torch

import checkpoints
import engines
import memory_plan
import utils
from conftest import free_port, run_side_by_side

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
LORA = checkpoints.LoraArgs(lora_rank=8)


def batch(seed=0):
    """Two rows of 12 tokens, log-probs over the last 6."""
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(seed))
    response = torch.zeros_like(ids)
    response[:, 6:] = 1
    return ids, torch.ones_like(ids), response


def logprobs(model, ids, attention, response):
    return utils.token_logprobs_in_chunks(model, ids, attention, response, 1.0, len(ids))


def trained_step(model, lr=1e-2):
    """One AdamW step on the adapters that raises the batch's log-probs; returns the optimizer."""
    optimizer = torch.optim.AdamW(utils.trainable(model), lr=lr)
    (-utils.token_logprobs(model, *batch(), 1.0).sum()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def test_adapters_train_alone_and_the_reference_is_the_initial_policy(process_group, tiny_model):
    device = process_group[2]
    policy = checkpoints.load_sharded_causal_lm(tiny_model, device, bf16=False, lora=LORA)
    base = checkpoints.load_sharded_causal_lm(tiny_model, device, bf16=False)
    trained = {n for n, p in policy.named_parameters() if p.requires_grad}
    # every linear layer of the 2 decoder layers (7 each) has an A and a B; nothing else trains
    assert len(trained) == 2 * 7 * 2 and all(".lora_A." in n or ".lora_B." in n for n in trained)
    initial = logprobs(base, *batch())
    assert torch.equal(logprobs(policy, *batch()), initial)  # B starts at zero: the adapted model is the base
    policy.reshard()  # FSDP2 keeps the root's parameters gathered after a forward without backward
    frozen = {n: p.detach().to_local().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    trained_step(policy)
    assert (logprobs(policy, *batch()) - initial).abs().max() > 1e-2  # the step moved the policy
    policy.reshard()
    assert all(torch.equal(p.detach().to_local(), frozen[n]) for n, p in policy.named_parameters() if n in frozen)
    reference = checkpoints.load_reference(policy, tiny_model, device, bf16=False)
    assert isinstance(reference, checkpoints.WithoutAdapters)  # no second copy of the weights
    assert torch.equal(logprobs(reference, *batch()), initial)
    assert (logprobs(policy, *batch()) - initial).abs().max() > 1e-2  # adapters on again after the reference


def test_sync_moves_the_adapted_blocks_merged_and_passes_both_checks(process_group, tiny_model, vllm_engine):
    device = process_group[2]
    policy = checkpoints.load_sharded_causal_lm(tiny_model, device, bf16=False, lora=LORA)
    base = checkpoints.load_sharded_causal_lm(tiny_model, device, bf16=False)
    tokenizer = utils.load_tokenizer(tiny_model)
    probe = engines.probe_sequence(tokenizer, utils.chat_token_ids(tokenizer, [{"role": "user", "content": "Hi"}],
                                                                   True), 512)
    engines.check_sync(vllm_engine, policy, *probe, device)  # the engine starts with the base's weights
    trained_step(policy)
    stale = engines.logprob_gap(vllm_engine, policy, *probe, device)["mean"]
    synced = engines.sync_weights(vllm_engine, policy, *probe, device, bucket_mb=0.1)
    try:
        assert stale > 1e-2 and synced["logprob_gap"] < 1e-4
        assert synced["tensors_checked"] >= 2  # the frozen embedding and norms, bitwise, after a partial reload
        sent = engines.weights_to_sync(policy)
        # only the decoder layers' linear weights (merged), none of the embedding, norms or head
        assert [n for n, _ in sent] == [f"model.layers.{i}.{block}.{name}_proj.weight" for i in range(2)
                                        for block, names in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down")))
                                        for name in names]
        full = sum(utils.weight_numel(t) for _, t in engines.weights_to_sync(base))
        assert sum(utils.weight_numel(t) for _, t in sent) == 2 * (4 * 64 * 64 + 3 * 64 * 128) < full / 70
        [[(name, merged)]] = utils.gathered_buckets(sent[:1], torch.float32, 0)
        layer = policy.model.layers[0].self_attn.q_proj
        by_hand = layer.base_layer.weight.full_tensor() + 2.0 * (layer.lora_B["default"].weight.full_tensor()
                                                                 @ layer.lora_A["default"].weight.full_tensor())
        assert name == "model.layers.0.self_attn.q_proj.weight" and torch.allclose(merged, by_hand, atol=1e-6)
        assert not torch.equal(merged, layer.base_layer.weight.full_tensor())
    finally:  # the session's engine goes back to the tiny model's own weights for the other tests
        engines.sync_weights(vllm_engine, base, *probe, device)


def test_checkpoint_holds_what_trains_exports_the_peft_folder_and_resumes_exactly(process_group, tiny_model,
                                                                                    tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device = process_group[2]
    policy = checkpoints.load_sharded_causal_lm(tiny_model, device, bf16=False, lora=LORA)
    optimizer = trained_step(policy)
    folder = checkpoints.save_checkpoint(str(tmp_path), 1, {"policy": (policy, optimizer)}, {"step": 1},
                                         utils.load_tokenizer(tiny_model), export_merged=True)
    manifest = json.load(open(os.path.join(folder, "manifest.json")))["files"]
    # the adapters (17,408 fp32 values) and their two AdamW moments, not the frozen base (3.2M values)
    assert sum(size for name, size in manifest.items() if name.startswith("dcp/")) < 3_245_376 * 4 / 10
    assert {"hf/adapter_config.json", "hf/adapter_model.safetensors", "hf_merged/config.json"} <= manifest.keys()
    expected = logprobs(policy, *batch())
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), os.path.join(folder, "hf"))
    assert torch.allclose(logprobs(peft_model.eval(), *batch()), expected, atol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "hf_merged")).eval()
    assert torch.allclose(logprobs(merged, *batch()), expected, atol=1e-5)
    # resumed into a fresh model: the same policy, and the next step (AdamW's moments) the same
    resumed = checkpoints.load_sharded_causal_lm(tiny_model, device, bf16=False, lora=LORA)
    resumed_optimizer = torch.optim.AdamW(utils.trainable(resumed), lr=1e-2)
    assert checkpoints.load_checkpoint(folder, {"policy": (resumed, resumed_optimizer)}) == {"step": 1}
    assert torch.equal(logprobs(resumed, *batch()), expected)
    for model, opt in ((policy, optimizer), (resumed, resumed_optimizer)):
        (-utils.token_logprobs(model, *batch(1), 1.0).sum()).backward()
        opt.step()
    assert torch.equal(logprobs(resumed, *batch()), logprobs(policy, *batch()))


def test_bad_lora_flags_and_models_are_refused():
    assert checkpoints.check_lora_args(checkpoints.LoraArgs()) == []
    problems = checkpoints.check_lora_args(checkpoints.LoraArgs(lora_rank=-1, lora_alpha=0, lora_dropout=1.0,
                                                                lora_target_modules=(), export_merged=False))
    assert [p.split(" ")[0] for p in problems] == ["--lora_rank", "--lora_alpha", "--lora_dropout",
                                                    "--lora_target_modules"]
    assert checkpoints.check_lora_args(checkpoints.LoraArgs(export_merged=True))[0].startswith("--export_merged")
    llama = os.path.join(HERE, "data", "llama3_8b_config.json")
    with pytest.raises(SystemExit, match=r"no linear layers named \['qkv'\].*it has \['down_proj', 'gate_proj'"):
        memory_plan.meta_model(llama, checkpoints.LoraArgs(lora_rank=8, lora_target_modules=("q_proj", "qkv")))
    from transformers import GPT2Config

    with pytest.raises(SystemExit, match="GPT2LMHeadModel has no decoder layers"):
        memory_plan.meta_model(GPT2Config(n_layer=1, n_embd=32, n_head=2), LORA)


def test_plan_for_llama3_8b_on_one_80gib_gpu_counts_adapters_apart_from_the_frozen_base():
    llama = os.path.join(HERE, "data", "llama3_8b_config.json")
    common = dict(world_size=1, bf16=True, kv_cache_bytes=8 * 2**30, sync_bucket_bytes=512 * 2**20, rows=2,
                  sequence_tokens=2048, response_tokens=1024, reference=True, engine_sleep=True)
    full = memory_plan.plan_memory(memory_plan.meta_model(llama), gradient_checkpointing=True, **common)
    lora = memory_plan.plan_memory(memory_plan.meta_model(llama, LORA), gradient_checkpointing=True, **common)
    # r = 8 on q, k, v, o (4096 -> 4096, 1024, 1024, 4096) and gate, up, down (4096 <-> 14336), 32 layers
    adapters = 32 * 8 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    assert lora.trainable == adapters == 20_971_520 and lora.parameters == full.parameters == 8_030_261_248
    assert lora.weights == 4 * (full.parameters + adapters)  # the frozen base stays fp32 beside the adapters
    assert (lora.optimizer, lora.gradients, lora.reference) == (8 * adapters, 4 * adapters, 0)
    assert full.reference == full.weights and full.optimizer == 2 * full.weights
    # a sync moves every linear weight of the decoder layers (the embedding and the head stay): 87% of full
    assert lora.sync_bytes == 2 * 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    assert full.sync_bytes == 2 * full.parameters
    memory_plan.check_fits(lora, 80 * 2**30)
    with pytest.raises(SystemExit):
        memory_plan.check_fits(full, 80 * 2**30)


def test_the_printed_8b_plans_are_those_in_docs_scale():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import lora_plan

    with open(os.path.join(REPO, "docs", "scale.md")) as f:
        doc = f.read()
    for text in (lora_plan.plan_text(LORA, True), lora_plan.plan_text(LORA, False), lora_plan.plan_text(None, True),
                 lora_plan.presets_table(), lora_plan.sync_table()):
        assert text in doc
    assert lora_plan.plan_text(LORA, True).endswith("fits one 80 GiB device")
    without = lora_plan.plan_text(LORA, False)
    assert without.startswith("memory plan") and "does not fit" in without


def test_lora_dropout_acts_only_in_forwards_that_take_gradients(process_group, tiny_model):
    policy = checkpoints.load_sharded_causal_lm(tiny_model, process_group[2], bf16=False,
                                                lora=checkpoints.LoraArgs(lora_rank=8, lora_dropout=0.5))
    trained_step(policy, lr=0.1)  # B away from zero, so that the adapters' input matters
    scored = logprobs(policy, *batch())
    assert torch.equal(logprobs(policy, *batch()), scored)  # no dropout without gradients: deterministic
    with torch.no_grad():
        assert torch.equal(utils.token_logprobs(policy, *batch(), 1.0), scored)
    torch.manual_seed(0)
    assert not torch.equal(utils.token_logprobs(policy, *batch(), 1.0).detach(), scored)


# ----------------------------------------------------------------------------------------------------------
# the four scripts with --lora_rank 8: two iterations, a checkpoint after each, then the second replayed from
# the first's checkpoint


def script_commands(output_dir, tiny_model):
    # test_pinned.py's setting: the tiny random policy on one-turn chat openings from the embedded prompt set, the
    # dataset user ending each dialogue after its first answer and the brevity reward scoring its length, so that
    # answers differ in reward and every script has something to learn from
    common = ["--output_dir", output_dir, "--run_name", "r", "--model", tiny_model, "--seed", "1",
              "--num_iterations", "2", "--save_every", "1", "--eval_every", "2", "--lora_rank", "8", "--lr", "1e-2",
              "--max_new_tokens", "8", "--kv_cache_gib", "0.0625", "--num_eval_prompts", "4"]
    chat = ["--task", "chat", "--user", "dataset", "--max_prompt_tokens", "256"]
    pairs = ["--pairs_per_rank", "8", "--minibatch_pairs", "8", "--micro_batch_pairs", "4"]
    # refuel.py on 2 ranks: the merged weights are computed from real FSDP2 shards; with a KL term (the reference
    # is the policy without its adapters)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--rdzv_backend", "c10d",
                "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--nproc_per_node=2"]
    return {
        "refuel": [*torchrun, os.path.join(REPO, "refuel.py"), *common, *chat, *pairs, "--val_fraction", "0.25",
                   "--kl_coef", "0.05"],
        "rebel": [sys.executable, os.path.join(REPO, "rebel.py"), *common, "--pairs_per_rank", "4",
                  "--minibatch_pairs", "4", "--num_epochs", "1", "--penalty_reward", "None"],
        # DPO against pi_0: the policy with its adapters off
        "dpo_multiturn": [sys.executable, os.path.join(REPO, "dpo_multiturn.py"), *common, *chat, *pairs,
                          "--contexts", "onpolicy"],
        "ma_ppo": [sys.executable, os.path.join(REPO, "ma_ppo.py"), *common, *chat, "--dialogues_per_rank", "8",
                   "--minibatch_dialogues", "8", "--micro_batch_dialogues", "4"],
    }


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, tiny_model, script_env):
    """Each script's run, then the same run resumed from its first checkpoint (the second one deleted): {script:
    (the run's folder, its metrics as first written)}."""
    root = tmp_path_factory.mktemp("lora_runs")
    folders = {name: str(root / name) for name in ("refuel", "rebel", "dpo_multiturn", "ma_ppo")}
    commands = {name: script_commands(folders[name], tiny_model)[name] for name in folders}
    first = run_side_by_side(commands, script_env, tmp_path_factory.mktemp("lora_logs"), timeout=600)
    for name, (status, out, err) in first.items():
        assert status == 0, f"{name}:\n{out[-3000:]}\n{err[-3000:]}"
    written = {}
    for name, folder in folders.items():
        run_dir = os.path.join(folder, "r")
        written[name] = read_metrics(run_dir)
        shutil.rmtree(os.path.join(run_dir, "checkpoints", "iteration_000002"))
    resumed = run_side_by_side({name: [*command, "--resume"] for name, command in commands.items()}, script_env,
                               tmp_path_factory.mktemp("lora_resume_logs"), timeout=600)
    for name, (status, out, err) in resumed.items():
        assert status == 0 and "resumed from" in out, f"{name}:\n{out[-3000:]}\n{err[-3000:]}"
    return {name: (os.path.join(folders[name], "r"), written[name]) for name in folders}


LOSS = {"refuel": "loss/refuel", "rebel": "loss/rebel", "dpo_multiturn": "loss/dpo", "ma_ppo": "loss/policy"}
GRAD_NORM = {"refuel": "policy/grad_norm", "rebel": "policy/grad_norm", "dpo_multiturn": "policy/grad_norm",
             "ma_ppo": "policy/actor_grad_norm"}


@pytest.mark.slow
@pytest.mark.parametrize("script", list(LOSS))
def test_script_trains_syncs_checkpoints_and_resumes_exactly_with_lora(lora_runs, script):
    run_dir, written = lora_runs[script]
    assert json.load(open(os.path.join(run_dir, "args.json")))["lora_rank"] == 8
    for m in written[1:]:  # a loss and a gradient on the adapters at every iteration, then a checked sync
        assert math.isfinite(m[LOSS[script]]) and m[GRAD_NORM[script]] > 0 and m["sync/logprob_gap"] < 1e-3
    hf = os.path.join(run_dir, "checkpoints", "iteration_000002", "hf")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(hf))
    resumed = read_metrics(run_dir)
    assert [m["iteration"] for m in resumed] == [0, 1, 2]
    for key in (LOSS[script], GRAD_NORM[script], "reward/score", "policy/lr", "budget/generated_tokens",
                "sync/logprob_gap"):
        assert resumed[2][key] == pytest.approx(written[2][key], rel=1e-3, abs=1e-5), key
    if script == "ma_ppo":  # the critic's adapters and value head trained too
        assert all(m["policy/critic_grad_norm"] > 0 for m in written[1:])
    # the first update, pinned as tests/test_pinned.py pins full fine-tuning's (relative tolerance 1e-4). The first
    # losses equal full fine-tuning's there (nothing has moved yet; REFUEL differs in its flags), the gradient norms
    # are the adapters' alone (B starts at zero, so only B has a gradient at first); MA-PPO's critic gradient is the
    # same as full fine-tuning's, all of it in the new value head, which starts at zero
    expected = PINNED[script]
    assert {key: written[1][key] for key in expected} == {k: pytest.approx(v, rel=1e-4) for k, v in expected.items()}


PINNED = {
    "refuel": {"loss/refuel": 0.014495849609375, "policy/grad_norm": 1.2444764375686646},
    "rebel": {"loss/rebel": 0.00067138671875, "policy/grad_norm": 0.5096505880355835},
    "dpo_multiturn": {"loss/dpo": 0.6931471824645996, "policy/grad_norm": 0.3154464662075043},
    "ma_ppo": {"loss/policy": -0.8396972417831421, "loss/value": 0.3531849980354309,
               "policy/actor_grad_norm": 0.41244012117385864, "policy/critic_grad_norm": 3.4716484546661377},
}
"""The first update of each script with `--lora_rank 8` in `script_commands`' setting (refuel.py on 2 ranks)"""
