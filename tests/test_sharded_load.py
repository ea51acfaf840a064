"""checkpoints.load_sharded: each rank reads only its own rows of a Hugging Face checkpoint into its FSDP2 shards,
and gets bitwise the parameters, logits and config of the whole load then `utils.shard_model`: tied and untied
heads, a bf16 checkpoint read into fp32, dimensions that do not divide by the ranks, a one-row head that leaves a
rank no rows, a checkpoint without safetensors, and weights a checkpoint lacks."""

import json
import os
import subprocess
import sys

import helpers
import pytest
import torch

import checkpoints
import utils

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def untied_bf16_model(tmp_path_factory, smollm2_path):
    """A tiny Llama with its own head, saved in bf16 (as Llama-3's checkpoints are), whose MLP's 129 rows split
    unevenly over 2 ranks (65 and 64)."""
    from transformers import AutoModelForCausalLM

    fp32 = utils.make_tiny_model(str(tmp_path_factory.mktemp("untied_fp32")), smollm2_path, seed=2,
                                 tie_word_embeddings=False, intermediate_size=129)
    folder = str(tmp_path_factory.mktemp("untied_bf16"))
    AutoModelForCausalLM.from_pretrained(fp32, dtype=torch.bfloat16).save_pretrained(folder)
    return folder


def assert_same_as_whole_load(path: str, device: torch.device) -> None:
    whole = utils.shard_model(utils.load_causal_lm(path, torch.float32, device), bf16=False)
    sharded = checkpoints.load_sharded_causal_lm(path, device, bf16=False)
    expected, got = helpers.full_state_dict(whole), helpers.full_state_dict(sharded)
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    assert all(p.dtype == torch.float32 for p in sharded.parameters())
    ids = torch.randint(0, 1000, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(sharded(input_ids=ids).logits, whole(input_ids=ids).logits)
    assert sharded.config.to_dict() == whole.config.to_dict() and not sharded.training
    assert sharded.generation_config.to_dict() == whole.generation_config.to_dict()


def test_sharded_load_is_the_whole_load_on_one_rank(process_group, tiny_model, untied_bf16_model, smollm2_path):
    device = process_group[2]
    for path in (tiny_model, untied_bf16_model, smollm2_path):  # SmolLM2: a real model's generation config
        assert checkpoints.safetensors_files(path) is not None
        assert_same_as_whole_load(path, device)
    sharded = checkpoints.load_sharded_causal_lm(tiny_model, device, bf16=False)
    assert sharded.lm_head.weight is sharded.model.embed_tokens.weight  # still tied


def copy_without_weights(folder: str, into) -> str:
    """`folder`'s config, generation config and tokenizer files in the new folder `into`, without its weights."""
    into.mkdir()
    for name in os.listdir(folder):
        if name != "model.safetensors":
            (into / name).write_bytes(open(os.path.join(folder, name), "rb").read())
    return str(into)


def test_a_checkpoint_without_safetensors_is_loaded_whole(process_group, tiny_model, tmp_path):
    from safetensors.torch import load_file

    folder = copy_without_weights(tiny_model, tmp_path / "bin")
    torch.save(load_file(os.path.join(tiny_model, "model.safetensors")), os.path.join(folder, "pytorch_model.bin"))
    assert checkpoints.safetensors_files(folder) is None
    assert_same_as_whole_load(folder, process_group[2])


def test_a_weight_the_checkpoint_lacks_is_refused_for_a_policy(process_group, tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_without_weights(tiny_model, tmp_path / "incomplete")
    tensors = load_file(os.path.join(tiny_model, "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"has no weights for \['model.norm.weight'\]"):
        checkpoints.load_sharded_causal_lm(folder, process_group[2], bf16=False)


@pytest.mark.slow  # torchrun, 2 ranks
def test_sharded_load_is_the_whole_load_on_two_ranks(tiny_model, untied_bf16_model, tiny_reward_model, tmp_path,
                                                     script_env):
    out = str(tmp_path / "result.json")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.join(HERE, "sharded_load.py"), out, tiny_model, untied_bf16_model,
                    "--token_classification", tiny_reward_model], check=True, timeout=300, env=script_env)
    with open(out) as f:
        ranks = json.load(f)
    for rank, results in enumerate(ranks):
        for path, result in results.items():
            assert result["names"] and result["bitwise"] and result["logits"] and result["config"], (rank, path)
            assert result["missing"] == []
    # each rank read its own rows: 129 MLP rows as 65 + 64, the one-row value head as 1 + 0
    mlp = "model.layers.0.mlp.gate_proj.weight"
    assert [r[untied_bf16_model]["local_rows"][mlp] for r in ranks] == [[65, 64], [64, 64]]
    assert [r[tiny_reward_model]["local_rows"]["score.weight"] for r in ranks] == [[1, 64], [0, 64]]
