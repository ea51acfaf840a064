"""The rollout engine: vLLM samples what it should, from the weights the trainer has."""

import helpers
import torch

import engines
import utils


def prompt(tokenizer, text="Tell me about cats."):
    return utils.chat_token_ids(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)


def test_parity_after_sync_and_failure_without_it(process_group, tiny_model, vllm_engine):
    device = process_group[2]
    tokenizer = utils.load_tokenizer(tiny_model)
    model = utils.shard_model(utils.load_causal_lm(tiny_model), bf16=False)
    probe = prompt(tokenizer) + tokenizer("A fixed answer.", add_special_tokens=False).input_ids
    assert engines.check_logprob_parity(vllm_engine, model, probe, device, 1e-4) < 1e-4

    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    try:
        engines.check_logprob_parity(vllm_engine, model, probe, device, 1e-4)
        raise AssertionError("stale engine weights went unnoticed")
    except engines.WeightSyncError as error:
        assert "not sampling from the weights being trained" in str(error)

    assert engines.sync_weights(vllm_engine, model, probe, device, 1e-4) < 1e-4
    # and the engine really samples from them: greedy decoding agrees with the transformers engine
    reference = engines.TransformersEngine(tiny_model, device, torch.float32)
    reference.load_weights(helpers.full_state_dict(model))
    prompts = [prompt(tokenizer, t) for t in ("Hi.", "What is two plus two?", "Name a color.")]
    ours = vllm_engine.generate(prompts, 12, 0.0, [0, 0, 0])
    theirs = reference.generate(prompts, 12, 0.0, [0, 0, 0])
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
    # restore the engine for other tests
    vllm_engine.load_weights(helpers.full_state_dict(utils.load_causal_lm(tiny_model)))


def test_completions_mark_unfinished_turns(process_group, smollm2_path):
    """A finished turn ends with the EOS token (kept, it is trained); a cut one is flagged."""
    device = process_group[2]
    tokenizer = utils.load_tokenizer(smollm2_path)
    engine = engines.TransformersEngine(smollm2_path, device, torch.float32)
    p = prompt(tokenizer, "What is the capital of France?")
    done, cut = engine.generate([p], 32, 0.0, [0]) + engine.generate([p], 3, 0.0, [0])
    assert done.finished and done.token_ids[-1] == tokenizer.eos_token_id and "Paris" in done.text
    assert not cut.finished and len(cut.token_ids) == 3 and tokenizer.eos_token_id not in cut.token_ids


def test_vllm_marks_finished_turns_and_keeps_eos(vllm_engine, tiny_model):
    tokenizer = utils.load_tokenizer(tiny_model)
    outs = vllm_engine.generate([prompt(tokenizer)] * 8, 6, 1.0, list(range(8)))
    for c in outs:
        assert c.finished == (c.token_ids[-1] == tokenizer.eos_token_id)
        assert c.finished or len(c.token_ids) == 6
    # per-request seeds: the same seed draws the same response, different seeds differ
    again = vllm_engine.generate([prompt(tokenizer)] * 2, 6, 1.0, [0, 1])
    assert again[0].token_ids == outs[0].token_ids and again[1].token_ids == outs[1].token_ids
    assert len({tuple(c.token_ids) for c in outs}) > 1


def test_a_sleeping_transformers_engine_wakes_with_the_next_sync(process_group, tiny_model):
    """--engine_sleep with the transformers backend (the GPU machines' rollouts): the engine's copy leaves the
    device while the trainer runs, and the next weight sync brings it back, checked by log-prob parity."""
    device = process_group[2]
    engine = engines.make_engine(tiny_model, device, max_model_len=512, seed=0, bf16=False, gpu_memory_utilization=0.05,
                                 kv_cache_memory_bytes=None, backend="transformers", sleep_mode=True)
    policy = utils.shard_model(utils.load_causal_lm(tiny_model), bf16=False)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01)
    engine.sleep()
    assert engine.asleep and next(engine.model.parameters()).device.type == "cpu"
    gap = engines.sync_weights(engine, policy, [1, 2, 3, 4, 5], device, 1e-4)
    assert not engine.asleep and gap < 1e-4
