import json
import re

import pytest

import dialogues


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_strings_and_chat_lists_are_read(tmp_path):
    source = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Hello?"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]},
    ])
    chats, skipped = dialogues.load_prompts(source, "prompt")
    assert chats == [[{"role": "user", "content": "Hello?"}],
                         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]]
    assert skipped == {}


def test_bad_rows_are_skipped_and_counted_by_cause(tmp_path):
    source = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "fine"}, {"prompt": ""}, {"prompt": None}, {"prompt": [{"role": "wizard", "content": "a"}]},
        {"prompt": [{"role": "assistant", "content": "no question"}]},
        {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "a recorded answer"}]},
    ])
    chats, skipped = dialogues.load_prompts(source, "prompt")
    assert len(chats) == 2 and chats[1][-1]["role"] == "assistant"  # a whole recorded dialogue is kept
    assert skipped == {"empty": 2, "unknown role 'wizard'": 1, "no user message": 1}


@pytest.mark.parametrize("cell,expected", [
    ("Hello?", [("user", "Hello?")]),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
     [("system", "Be brief."), ("user", "Hi?")]),
    # openbmb/UltraInteract_pair `trajectory`, ShareGPT: {"from", "value"}
    ([{"from": "user", "value": "Solve x + 1 = 2."}, {"from": "assistant", "value": "x = 1"},
      {"from": "user", "value": "Check it."}],
     [("user", "Solve x + 1 = 2."), ("assistant", "x = 1"), ("user", "Check it.")]),
    ([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], [("user", "Hi"), ("assistant", "Hello")]),
    # Anthropic/hh-rlhf transcripts
    ("\n\nHuman: What is tea?\n\nAssistant: A drink.\n\nHuman: Hot?",
     [("user", "What is tea?"), ("assistant", "A drink."), ("user", "Hot?")]),
    ("A plain question that mentions Human: inside.", [("user", "A plain question that mentions Human: inside.")]),
])
def test_each_message_shape_is_read(cell, expected):
    assert [(m["role"], m["content"]) for m in dialogues.as_messages(cell)] == expected


@pytest.mark.parametrize("cell,message", [
    (None, "empty"), ([], "empty"), ("   ", "empty"), (7, "a int cell: expected a string or a list of chat messages"),
    ([{"role": "user"}], "a message without text"), ([{"speaker": "user", "text": "x"}], "unknown role None"),
])
def test_bad_cells_say_what_is_wrong(cell, message):
    with pytest.raises(ValueError, match=message):
        dialogues.as_messages(cell)


def test_one_broken_json_line_keeps_the_good_rows(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a?"}\n{"prompt": "b?"\n{"prompt": "c?"}\n')
    chats, skipped = dialogues.load_prompts(str(path), "prompt")
    assert [d[0]["content"] for d in chats] == ["a?", "c?"] and skipped == {"bad_json_line": 1}
    assert "lines [2]" in capsys.readouterr().out


def test_a_column_of_the_wrong_type_names_the_first_bad_row(tmp_path):
    source = write_jsonl(tmp_path / "p.jsonl", [{"prompt": 1}, {"prompt": 2}])
    with pytest.raises(ValueError, match=r"row 0: a int cell"):
        dialogues.load_prompts(source, "prompt")


def test_missing_column_names_the_columns(tmp_path):
    source = write_jsonl(tmp_path / "p.jsonl", [{"question": "Hello?"}])
    with pytest.raises(ValueError, match=r"no column 'prompt'.*\['question'\]"):
        dialogues.load_prompts(source, "prompt")


def test_dataset_without_usable_rows_is_an_error(tmp_path):
    source = write_jsonl(tmp_path / "p.jsonl", [{"prompt": ""}, {"prompt": "   "}])
    with pytest.raises(ValueError, match="no usable prompt"):
        dialogues.load_prompts(source, "prompt")


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "p.jsonl").write_text("")
    with pytest.raises(ValueError, match="the file is empty"):
        dialogues.load_prompts(str(tmp_path / "p.jsonl"), "prompt")


@pytest.mark.parametrize("name", ["p.jsonl", "p.json", "p.parquet", "p.csv"])
def test_a_missing_data_file_is_named_not_looked_up_on_the_hub(tmp_path, name):
    # the hub would answer with its own error about a dataset repository (or, offline, a connection error)
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / name))}: no such file$"):
        dialogues.load_preferences(str(tmp_path / name))


def test_parquet_and_saved_folders_load(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"prompt": ["a?", "b?"]})
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    assert len(dialogues.load_prompts(str(tmp_path / "p.parquet"), "prompt")[0]) == 2
    assert len(dialogues.load_prompts(str(tmp_path / "saved"), "prompt")[0]) == 2


def test_reward_model_scores_dialogues_batched_or_not(process_group, tiny_reward_model):
    """Batched scoring must equal one-at-a-time scoring (right padding, last real token)."""
    import torch

    rm = dialogues.RewardModel(tiny_reward_model, process_group[2], torch.float32, max_length=512)
    chats = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x" * n}] for n in (1, 5, 9)]
    scores = rm(chats)
    single = [rm([d])[0] for d in chats]
    assert scores == pytest.approx(single, abs=1e-5)
    assert len(set(round(s, 6) for s in scores)) == 3
