import pytest

import utils
from tasks import chat


def dialogue(turns: int) -> list[dict]:
    messages = []
    for t in range(turns):
        messages.append({"role": "user", "content": f"Question {t}: what is {t} plus {t}?"})
        messages.append({"role": "assistant", "content": f"It is {2 * t}. Anything else about number {t}?"})
    return messages


@pytest.fixture(params=["smollm2", "llama3"])
def tokenizer(request, smollm2_path, llama3_tokenizer):
    return utils.load_tokenizer(smollm2_path) if request.param == "smollm2" else llama3_tokenizer


@pytest.mark.parametrize("turns", [1, 2, 3, 4, 5])
def test_turn_masks_cover_each_assistant_turn_exactly(tokenizer, turns):
    messages = dialogue(turns)
    ids, masks = utils.tokenize_dialogue(tokenizer, messages)
    # piecewise tokenization equals tokenizing the whole rendered chat at once
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert ids == tokenizer(rendered, add_special_tokens=False).input_ids
    assert len(masks) == turns
    for t, mask in enumerate(masks):
        covered = [i for i, m in zip(ids, mask) if m]
        # contiguous, and exactly the content plus the end-of-turn token
        positions = [i for i, m in enumerate(mask) if m]
        assert positions == list(range(positions[0], positions[-1] + 1))
        assert covered[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(covered[:-1]) == messages[2 * t + 1]["content"]
        # what precedes a turn is exactly the generation prompt the policy sampled it from
        prompt = utils.chat_token_ids(tokenizer, messages[: 2 * t + 1], add_generation_prompt=True)
        assert ids[: positions[0]] == prompt
    assert sum(map(sum, masks)) < len(ids)  # user turns and headers are never masked in


def test_masks_do_not_overlap(tokenizer):
    _, masks = utils.tokenize_dialogue(tokenizer, dialogue(3))
    assert max(sum(column) for column in zip(*masks)) == 1


def test_a_template_that_rewrites_history_is_refused(smollm2_path, tmp_path):
    tokenizer = utils.load_tokenizer(smollm2_path)
    # renders only the last two messages: earlier turns vanish, so prefixes are not prefixes
    tokenizer.chat_template = (
        "{% for m in messages[-2:] %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(ValueError, match="prefix"):
        utils.tokenize_dialogue(tokenizer, dialogue(3))


def test_tokenizer_without_chat_template_is_a_clear_error(smollm2_path, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path)
    for name in ("chat_template.jinja",):
        if (tmp_path / name).exists():
            (tmp_path / name).unlink()
    with pytest.raises(ValueError, match="no chat template"):
        utils.load_tokenizer(str(tmp_path))


def test_batch_for_logprobs_aligns_prompt_ends_and_masks_only_responses():
    input_ids, attention, response = utils.batch_for_logprobs([[5, 6, 7], [5]], [[8, 9], [8, 9, 10]], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7, 8, 9, 0], [0, 0, 5, 8, 9, 10]]
    assert attention.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert response.tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]]


def test_token_logprobs_of_a_padded_batch_equal_each_sequence_alone(tiny_model):
    """Padding on both sides, position ids and the response-only vocabulary projection change nothing: each
    row's tokens equal a plain forward of that sequence alone, zero outside the response, and the gradient stays
    finite."""
    import torch

    model = utils.load_causal_lm(tiny_model)
    prompts, responses = [[5, 6, 7, 8, 20, 21], [9, 10], [30]], [[11, 12], [13, 14, 15, 16], [17]]
    input_ids, attention, response = utils.batch_for_logprobs(prompts, responses, 0)
    per_token = utils.token_logprobs(model, input_ids, attention, response, temperature=0.7)
    assert per_token.shape == input_ids.shape and (per_token[response == 0] == 0).all()
    ours = per_token.sum(-1)
    ours.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        for row, (p, r) in enumerate(zip(prompts, responses)):
            ids = torch.tensor([p + r])
            logits = model(input_ids=ids).logits[0, len(p) - 1 : -1] / 0.7
            alone = logits.log_softmax(-1).gather(-1, ids[0, len(p) :, None]).squeeze(-1)
            torch.testing.assert_close(per_token[row][response[row] == 1].detach(), alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ours[row].detach(), alone.sum(), rtol=1e-5, atol=1e-5)


def test_chat_task_records_the_rows_that_hold_assistant_turns(tmp_path):
    """The chat task's recorded dialogues (dpo_multiturn.py --contexts offline) are its training rows that hold
    assistant turns, whole, in UltraInteract_pair's `trajectory` ({"from", "value"}) or as role/content lists, with
    the later user turns the dataset user replays; rows without an answer, and the evaluation rows, give none."""
    import json

    import torch
    from test_presets import ultrainteract_pair_rows

    import dialogues
    from tasks.chat import make_task

    def task(rows, column, num_eval_prompts):
        path = tmp_path / f"{column}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return make_task(seed=1, rank=0, device=torch.device("cpu"), bf16=False, dataset=str(path),
                         prompt_column=column, user="dataset", num_eval_prompts=num_eval_prompts)

    rows = ultrainteract_pair_rows(8)  # odd rows: question, a wrong answer, "check it again"; even rows: a question
    ultrainteract = task(rows, "trajectory", num_eval_prompts=2)
    # rows 3, 5, 7 of the training rows 2-7 (row 1, held out for evaluation, is not one)
    assert len(ultrainteract.train) == 6 and len(ultrainteract.recorded) == 3
    for e, i in zip(ultrainteract.recorded, (3, 5, 7)):
        assert e.messages == dialogues.as_messages(rows[i]["trajectory"]) and e.messages[1]["role"] == "assistant"
        assert e.info == {"user_turns": ["Your answer is wrong. Check it again."]}
    user, assistant = ({"role": r, "content": c} for r, c in (("user", "Name a colour."), ("assistant", "Red.")))
    messages = [[user], [user, assistant, {"role": "user", "content": "Another?"}, {"role": "assistant",
                                                                                  "content": "Blue."}], [user], [user]]
    message_lists = task([{"messages": m} for m in messages], "messages", num_eval_prompts=1)
    assert [e.messages for e in message_lists.recorded] == [messages[1]]
    assert message_lists.recorded[0].info == {"user_turns": ["Another?"]}
    assert task([{"prompt": f"Question {i}?"} for i in range(4)], "prompt", num_eval_prompts=1).recorded == []


def test_the_target_length_reward_pays_most_at_its_length_and_nothing_for_silence():
    def score(words):
        return chat.target_length_reward([{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": " ".join(["word"] * words)}])
    assert score(0) == 0.0 and score(chat.TARGET_WORDS) == 1.0 and score(chat.LONG_ANSWER_WORDS) == score(100) == 0.0
    assert score(4) == 0.5 and score(36) == 0.5  # linear on both sides of the target
    assert chat.brevity_reward([{"role": "assistant", "content": ""}]) == 1.0  # the reward it replaces for benchmarks
