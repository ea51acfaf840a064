"""The rollout engine: vLLM samples what it should, from the weights the trainer has."""

import helpers
import pytest
import torch
from torch.distributed.tensor import DTensor

import engines
import utils


def prompt(tokenizer, text="Tell me about cats."):
    return utils.chat_token_ids(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)


def test_parity_after_sync_and_failure_without_it(process_group, tiny_model, vllm_engine):
    device = process_group[2]
    tokenizer = utils.load_tokenizer(tiny_model)
    model = utils.shard_model(utils.load_causal_lm(tiny_model), bf16=False)
    probe, answer_start = engines.probe_sequence(tokenizer, prompt(tokenizer), 512)
    assert engines.check_sync(vllm_engine, model, probe, answer_start, device, 1e-4)["logprob_gap_max"] < 1e-4

    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with pytest.raises(engines.WeightSyncError, match="does not compute what the trainer computes"):
        engines.check_logprob_parity(vllm_engine, model, probe, answer_start, device)

    assert engines.sync_weights(vllm_engine, model, probe, answer_start, device)["logprob_gap_max"] < 1e-4
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
    device while the trainer runs, and the next weight sync brings it back, checked by the read-back and the log-prob
    gap."""
    device = process_group[2]
    engine = engines.make_engine(tiny_model, device, max_model_len=512, seed=0, bf16=False, gpu_memory_utilization=0.05,
                                 kv_cache_memory_bytes=None, backend="transformers", sleep_mode=True)
    policy = utils.shard_model(utils.load_causal_lm(tiny_model), bf16=False)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01)
    engine.sleep()
    assert engine.asleep and next(engine.model.parameters()).device.type == "cpu"
    synced = engines.sync_weights(engine, policy, [1, 2, 3, 4, 5], 1, device, 1e-4)
    assert not engine.asleep and synced["logprob_gap_max"] < 1e-4 and synced["tensors_checked"] == 8


def nudge_one_weight(model: torch.nn.Module, dtype: torch.dtype) -> str:
    """Moves one weight of the middle decoder layer's input norm up to the next value `dtype` holds (one fp32 ulp,
    or one bf16 step of the fp32 master weight), in the trainer only; returns the tensor's name."""
    middle = (len(model.model.layers) - 1) // 2
    weight = model.model.layers[middle].input_layernorm.weight
    shard = weight.to_local() if isinstance(weight, DTensor) else weight
    with torch.no_grad():
        value = shard[0].to(dtype)
        shard[0] = torch.nextafter(value, torch.tensor(float("inf"), dtype=dtype)).float()
    return f"model.layers.{middle}.input_layernorm.weight"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["vllm", "transformers"])
def test_the_read_back_catches_a_stale_weight_the_gap_check_passes(backend, dtype, request, process_group,
                                                                    tiny_model):
    """After a sync the engine's tensors equal the trainer's bitwise and the mean gap is within the dtype's
    tolerance; one weight of a middle layer then moved by one rounding step in the trainer alone leaves the
    log-probs within the tolerance, and the read-back names the tensor."""
    device = process_group[2]
    if backend == "vllm":
        engine = request.getfixturevalue("vllm_engine" if dtype == torch.float32 else "vllm_bf16_engine")
    else:
        engine = engines.TransformersEngine(tiny_model, device, dtype)
    tokenizer = utils.load_tokenizer(tiny_model)
    probe, answer_start = engines.probe_sequence(tokenizer, prompt(tokenizer), 512)
    model = utils.shard_model(utils.load_causal_lm(tiny_model), bf16=dtype == torch.bfloat16)
    synced = engines.sync_weights(engine, model, probe, answer_start, device)
    # of the 8 tensors read back, vLLM's CPU build holds the embedding and the 3 norms unpacked
    assert synced["tensors_checked"] == (4 if backend == "vllm" and device.type == "cpu" else 8)
    tolerance = engines.SYNC_TOLERANCE[dtype]
    assert synced["logprob_gap"] < tolerance and synced["logprob_gap_p95"] <= synced["logprob_gap_max"]

    name = nudge_one_weight(model, dtype)
    assert engines.check_logprob_parity(engine, model, probe, answer_start, device)["mean"] < tolerance
    with pytest.raises(engines.WeightSyncError, match=f"rollout engine's {name} differs from the trainer's"):
        engines.check_weights_match(engine, model)

    resynced = engines.sync_weights(engine, model, probe, answer_start, device)
    assert resynced["tensors_checked"] == synced["tensors_checked"]
    if backend == "vllm":  # the shared engine back on the tiny model for other tests
        engine.load_weights(helpers.full_state_dict(utils.load_causal_lm(tiny_model)))


class ShiftedEngine:
    """Scores a probe with the trainer's own log-probs plus `shifts[p]` at each token position p: an engine whose
    gap at every token is known."""

    def __init__(self, model, device, shifts: dict[int, float], dtype: torch.dtype = torch.float32):
        self.model, self.device, self.shifts, self.dtype = model, device, shifts, dtype

    def prompt_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        logprobs = engines.probe_logprobs(self.model, token_ids, self.device)
        for position, shift in self.shifts.items():
            logprobs[position - 1] += shift  # entry k scores token k + 1
        return logprobs


def test_the_gap_covers_the_probe_answer_only(process_group, tiny_model):
    device = process_group[2]
    tokenizer = utils.load_tokenizer(tiny_model)
    model = utils.load_causal_lm(tiny_model)
    opening = prompt(tokenizer)
    probe, answer_start = engines.probe_sequence(tokenizer, opening, 512)
    assert probe[:answer_start] == opening and len(probe) - answer_start >= 48
    assert probe[-1] == tokenizer.eos_token_id
    answer = range(answer_start, len(probe))
    # a large gap on every opening token, the last one included, and a known ramp over the answer from 0
    shifts = {p: 10.0 for p in range(1, answer_start)} | {p: (p - answer_start) / 100 for p in answer}
    gap = engines.logprob_gap(ShiftedEngine(model, device, shifts), model, probe, answer_start, device)
    ramp = torch.tensor([shifts[p] for p in answer])
    assert gap == pytest.approx({"mean": ramp.mean().item(), "p95": torch.quantile(ramp, 0.95).item(),
                                 "max": ramp.max().item()}, abs=1e-5)
    # a short context cuts the answer, keeping the probe shorter than the context
    short, start = engines.probe_sequence(tokenizer, opening, answer_start + 10)
    assert start == answer_start and len(short) == answer_start + 9


def test_the_parity_check_bounds_the_mean_gap_by_the_engine_dtype(process_group, tiny_model):
    """One answer token far off passes in bf16 (rounding has such tails); every token 0.2 off does not; fp32 is
    held to 1e-3 unless a tolerance is given."""
    device = process_group[2]
    tokenizer = utils.load_tokenizer(tiny_model)
    model = utils.load_causal_lm(tiny_model)
    probe, answer_start = engines.probe_sequence(tokenizer, prompt(tokenizer), 512)
    answer = range(answer_start, len(probe))

    def check(shifts, dtype, tolerance=None):
        return engines.check_logprob_parity(ShiftedEngine(model, device, shifts, dtype), model, probe, answer_start,
                                            device, tolerance)

    assert check({answer_start: 1.0}, torch.bfloat16)["max"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(engines.WeightSyncError, match="by 0.2 on average"):
        check({p: 0.2 for p in answer}, torch.bfloat16)
    with pytest.raises(engines.WeightSyncError, match="tolerance 0.001"):
        check({p: 0.01 for p in answer}, torch.float32)
    assert check({p: 0.01 for p in answer}, torch.float32, tolerance=0.02)["mean"] == pytest.approx(0.01, abs=1e-5)
