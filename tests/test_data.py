import json

import pytest

import utils


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_strings_and_chat_lists_are_read(tmp_path):
    source = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Hello?"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]},
    ])
    dialogues, skipped = utils.load_prompts(source, "prompt")
    assert dialogues == [[{"role": "user", "content": "Hello?"}],
                         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]]
    assert skipped == {}


def test_malformed_rows_are_skipped_and_counted(tmp_path):
    source = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "fine"}, {"prompt": ""}, {"prompt": [{"role": "user", "content": "a"},
                                                         {"role": "assistant", "content": "ends with assistant"}]},
    ])
    dialogues, skipped = utils.load_prompts(source, "prompt")
    assert len(dialogues) == 1 and skipped == {"empty": 1, "malformed": 1}


def test_missing_column_names_the_columns(tmp_path):
    source = write_jsonl(tmp_path / "p.jsonl", [{"question": "Hello?"}])
    with pytest.raises(ValueError, match=r"no column 'prompt'.*\['question'\]"):
        utils.load_prompts(source, "prompt")


def test_dataset_without_usable_rows_is_an_error(tmp_path):
    source = write_jsonl(tmp_path / "p.jsonl", [{"prompt": ""}, {"prompt": "   "}])
    with pytest.raises(ValueError, match="no usable prompt"):
        utils.load_prompts(source, "prompt")


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "p.jsonl").write_text("")
    with pytest.raises(Exception):
        utils.load_prompts(str(tmp_path / "p.jsonl"), "prompt")


def test_parquet_and_saved_folders_load(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"prompt": ["a?", "b?"]})
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    assert len(utils.load_prompts(str(tmp_path / "p.parquet"), "prompt")[0]) == 2
    assert len(utils.load_prompts(str(tmp_path / "saved"), "prompt")[0]) == 2


def test_reward_model_scores_dialogues_batched_or_not(process_group, tiny_reward_model):
    """Batched scoring must equal one-at-a-time scoring (right padding, last real token)."""
    import torch

    rm = utils.RewardModel(tiny_reward_model, process_group[2], torch.float32, max_length=512)
    dialogues = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x" * n}] for n in (1, 5, 9)]
    scores = rm(dialogues)
    single = [rm([d])[0] for d in dialogues]
    assert scores == pytest.approx(single, abs=1e-5)
    assert len(set(round(s, 6) for s in scores)) == 3
