"""The multi-turn machinery: the rollout loop, branching, the simulated users, the guessing task."""

import os
import time

import numpy as np
import pytest
import torch

import dialogues
import engines
import utils
from conftest import free_port
from refuel import refuel_loss, sample_horizons
from tasks.chat import DatasetUser, LLMUser, ServerUser, UserServerError, parse_user_reply, user_simulator_prompt
from tasks.guess_number import GuessNumber


def opening(text="Tell me about cats."):
    return dialogues.Episode([{"role": "user", "content": text}])


class EchoUser:
    """A user written in code: asks a numbered follow-up, and ends the dialogue after `stop_after` turns."""

    def __init__(self, stop_after=None):
        self.stop_after = stop_after

    def __call__(self, episodes):
        return [None if self.stop_after and e.turns >= self.stop_after else f"Follow-up {e.turns}?" for e in episodes]


def test_turns_alternate_and_unfinished_turns_are_marked(vllm_engine, tiny_model):
    tokenizer = utils.load_tokenizer(tiny_model)
    episodes = dialogues.rollout_dialogues([opening(), opening("Hi.")], vllm_engine, tokenizer=tokenizer,
                                           user=EchoUser(), horizons=[3, 2], max_tokens=4, temperature=1.0, seed=(0,))
    for e, h in zip(episodes, [3, 2]):
        assert e.turns == h and len(e.prompts) == h and len(e.finished) == h
        roles = [m["role"] for m in e.messages]
        assert roles == ["user", "assistant"] * h  # the dialogue ends with the policy's turn h
        assert [m["content"] for m in e.messages[2::2]] == [f"Follow-up {t}?" for t in range(1, h)]
        # a tiny random model never says EOS in 4 tokens: the turn is kept, capped and flagged
        assert all(len(r) == 4 for r in e.responses) and not any(e.finished)


def test_early_ending_dialogues_stop(vllm_engine, tiny_model):
    tokenizer = utils.load_tokenizer(tiny_model)
    episodes = dialogues.rollout_dialogues([opening(), opening()], vllm_engine, tokenizer=tokenizer,
                                           user=EchoUser(stop_after=2), horizons=[5, 1], max_tokens=4, temperature=1.0,
                                           seed=(0,))
    assert [e.turns for e in episodes] == [2, 1]
    assert episodes[0].done and not episodes[1].done  # the second reached its horizon, nobody ended it


def test_branch_shares_the_prefix_token_for_token(vllm_engine, tiny_model):
    tokenizer = utils.load_tokenizer(tiny_model)
    a_side = dialogues.rollout_dialogues([opening() for _ in range(4)], vllm_engine, tokenizer=tokenizer,
                                         user=EchoUser(), horizons=[4] * 4, max_tokens=5, temperature=1.0,
                                         seed=(0, "A"))
    for h in range(4):
        b = dialogues.rollout_dialogues([a.prefix(h) for a in a_side], vllm_engine, tokenizer=tokenizer,
                                        user=EchoUser(), horizons=[4] * 4, max_tokens=5, temperature=1.0,
                                        seed=(0, "B", h))
        for a, bb in zip(a_side, b):
            assert bb.messages[: 2 * h + 1] == a.messages[: 2 * h + 1]
            assert bb.prompts[h] == a.prompts[h]  # the same state s_h, token for token
            assert bb.responses[:h] == a.responses[:h]
            # and s_h's tokens are exactly the prefix of the whole dialogue's tokenization
            ids, masks = utils.tokenize_dialogue(tokenizer, a.messages)
            assert ids[: len(a.prompts[h])] == a.prompts[h]
            assert masks[h].index(1) == len(a.prompts[h])  # turn h's mask starts right after s_h
        assert sum(a.responses[h] != bb.responses[h] for a, bb in zip(a_side, b)) >= 3  # y' is a new draw


def test_dataset_user_replays_the_dataset_turns(vllm_engine, tiny_model):
    tokenizer = utils.load_tokenizer(tiny_model)
    e = dialogues.Episode([{"role": "user", "content": "First?"}], {"user_turns": ["Second?", "Third?"]})
    dialogues.rollout_dialogues([e], vllm_engine, tokenizer=tokenizer, user=DatasetUser(), horizons=[5], max_tokens=3,
                                temperature=1.0, seed=(0,))
    assert [m["content"] for m in e.messages if m["role"] == "user"] == ["First?", "Second?", "Third?"]
    assert e.turns == 3 and e.done


def test_user_prompt_and_parsing_follow_the_official_code():
    prompt = user_simulator_prompt([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
    assert prompt.startswith("Below is a dialogue between the user and the assistant. Pretend you are the user")
    assert "### user: Hi\n\n### assistant: Yo\n\n### Instructions:" in prompt
    assert prompt.endswith("Justification: \nQuestion: ")
    assert parse_user_reply("Justification: curious.\nQuestion: Why is it blue? ") == "Why is it blue?"
    assert parse_user_reply("Question: a\nQuestion: b") == "b"
    assert parse_user_reply("  no format at all ") == "no format at all"


def test_llm_user_with_a_tiny_model(vllm_engine, tiny_model):
    user = LLMUser(vllm_engine, utils.load_tokenizer(tiny_model), 8, 0.8, seed=0)
    replies = user([opening(), opening("Hi.")])
    assert len(replies) == 2 and all(isinstance(r, str) and r for r in replies)
    # a reply depends on the conversation, not on the call or the batch position: resumed runs replay it
    assert user([opening("Hi."), opening()]) == replies[::-1]
    # the budget counts what the user generated (at most the 8 tokens asked for), not the question it parsed
    assert all(1 <= r.generated_tokens <= 8 for r in replies)


def test_the_budget_counts_a_users_hidden_text():
    question = dialogues.UserReply("Why 4?", generated_tokens=30)
    dialogue = dialogues.Episode([{"role": "user", "content": "Pick a number."}, {"role": "assistant", "content": "4"},
                                  {"role": "user", "content": question}, {"role": "assistant", "content": "5"}],
                                 responses=[[5, 6], [7]])
    # the policy's 3 sampled tokens, and the 30 the user generated for its 2-word question (justification included)
    assert dialogues.generated_tokens([dialogue], None, [0]) == (3, 30)
    assert dialogues.generated_tokens([dialogue], None, [1]) == (1, 0)  # from turn 2 on: no reply after it


@pytest.mark.slow
def test_llm_user_with_smollm2_asks_a_question(process_group, smollm2_path):
    engine = engines.TransformersEngine(smollm2_path, process_group[2], torch.float32)
    user = LLMUser(engine, utils.load_tokenizer(smollm2_path), 64, 0.0, seed=0)
    e = dialogues.Episode([{"role": "user", "content": "What is the capital of France?"},
                       {"role": "assistant", "content": "The capital of France is Paris."}])
    (reply,) = user([e])
    assert len(reply.split()) >= 3 and "Question:" not in reply


@pytest.mark.slow
def test_server_user_answers_every_dialogue(user_server, tiny_model):
    user = ServerUser(user_server, tiny_model, max_tokens=8, temperature=0.8, seed=0)
    replies = user([opening(f"Question number {i}?") for i in range(5)])
    assert len(replies) == 5 and all(isinstance(r, str) for r in replies)
    assert all(1 <= r.generated_tokens <= 8 for r in replies)  # the server's count of what it generated


def test_server_down_is_a_clear_error_after_bounded_retries(tiny_model):
    user = ServerUser(f"http://127.0.0.1:{free_port()}", tiny_model, 8, 0.8, 0, timeout=2, retries=2)
    started = time.time()
    with pytest.raises(UserServerError, match=r"failed after 3 tries"):
        user([opening()])
    assert time.time() - started < 30


@pytest.fixture
def local_http_server():
    """A standard-library HTTP server on 127.0.0.1 with a handler given by the test, stopped afterwards."""
    import http.server
    import threading

    servers = []

    def start(handler_class):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_refused_request_keeps_the_servers_reason_and_is_not_retried(local_http_server):
    import http.server

    calls = []

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            calls.append(self.path)
            body = b'{"error": {"message": "The model `big-user` does not exist."}}'
            self.send_response(404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    user = ServerUser(local_http_server(NotFound), "big-user", 8, 0.8, 0, timeout=5, retries=3)
    with pytest.raises(UserServerError, match=r"HTTP 404 Not Found.*The model `big-user` does not exist"):
        user([opening()])
    assert len(calls) == 1


def test_a_server_that_never_answers_fails_within_the_timeout(local_http_server):
    import http.server

    class Silent(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            time.sleep(5)  # accepts the connection, answers too late

        def log_message(self, *args):
            pass

    user = ServerUser(local_http_server(Silent), "m", 8, 0.8, 0, timeout=0.5, retries=1)
    started = time.time()
    expected = r"failed after 2 tries \(--user_timeout 0.5 s, --user_retries 1\).*timed out"
    with pytest.raises(UserServerError, match=expected):
        user([opening()])
    assert time.time() - started < 4  # two waits of 0.5 s and one pause of 1 s, not minutes


def test_guess_number_user_and_reward():
    game = GuessNumber(n=32, horizon=5)
    e = game.new_episode(secret=20)
    e.messages.append({"role": "assistant", "content": "16"})
    assert game.reply(e) == "Higher: from 17 to 32."
    e.messages += [{"role": "user", "content": "..."}, {"role": "assistant", "content": "seven"}]
    assert game.reply(e).startswith("Please answer")
    e.messages += [{"role": "user", "content": "..."}, {"role": "assistant", "content": "24"}]
    assert game.reply(e) == "Lower: from 17 to 23."
    e.messages += [{"role": "user", "content": "..."}, {"role": "assistant", "content": "20"}]
    assert game.reply(e) is None and game.rewards([e]) == [1.0]
    assert game.rewards([game.new_episode(3)]) == [0.0]
    # a guess int() cannot read (str.isdigit accepts "₂") or in non-ASCII digits is not a guess, as in the harvest game
    assert [game.parse(a) for a in ("3", "₂", "٣", "6898887₂")] == [3, None, None, None]


def test_warm_start_games_are_consistent_play():
    import random

    game = GuessNumber(n=32, horizon=5)
    for seed in range(50):
        messages = game.random_consistent_game(random.Random(seed)).messages
        low, high = 1, 32
        for m in messages[2:]:
            if m["role"] == "assistant":
                assert low <= int(m["content"]) <= high
            else:
                low, high = map(int, m["content"].rstrip(".").split("from ")[1].split(" to "))


def test_the_warm_start_cache_is_keyed_by_what_the_policy_learns(monkeypatch, tmp_path, smollm2_path):
    """A fork's game with other wording gets a policy of its own, not the one cached for the original wording."""
    import random
    import shutil

    from tasks.guess_number import warm_start_key, warm_start_policy

    class Reworded(GuessNumber):
        def __init__(self):
            super().__init__()
            self.opening = "Pick the number I have in mind, 1 to 7. Reply with a digit."

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # smollm2_path was resolved before: not moved
    original = warm_start_policy(GuessNumber(), smollm2_path, steps=1)
    assert warm_start_policy(GuessNumber(), smollm2_path, steps=1) == original
    reworded = warm_start_policy(Reworded(), smollm2_path, steps=1)
    assert reworded != original and os.path.isfile(os.path.join(reworded, "config.json"))
    built = [d for d in os.listdir(tmp_path / "cache" / "multiturn_rlhf") if not d.endswith(".lock")]
    assert sorted(built) == sorted(os.path.basename(f) for f in (original, reworded))  # the repeat was cached
    # another tokenizer (here: the same one with another chat template) is another key too
    games = [GuessNumber().random_consistent_game(random.Random(0)).messages]
    other = shutil.copytree(smollm2_path, tmp_path / "tokenizer", ignore=shutil.ignore_patterns("*.safetensors"))
    with open(other / "chat_template.jinja", "a") as f:
        f.write("\n")
    assert warm_start_key(games, smollm2_path, {}) == warm_start_key(games, smollm2_path, {})
    assert warm_start_key(games, str(other), {}) != warm_start_key(games, smollm2_path, {})


def test_guess_number_reference_scores():
    """The task's yardsticks: binary search solves 31/32 games in 5 turns, random consistent play about half."""
    game = GuessNumber(n=32, horizon=5)
    binary, random_play = game.solved_by_turn("binary"), game.solved_by_turn("random")
    assert binary == pytest.approx([1 / 32, 3 / 32, 7 / 32, 15 / 32, 31 / 32], abs=0.01)
    assert 0.45 < random_play[-1] < 0.6 and all(r <= b + 0.01 for r, b in zip(random_play, binary))
    # the default game, 1..7 in 3 turns: binary search solves all; random consistent play 0.678 (exact recursion
    # over the intervals), so the gap left for credit assignment is a third of the games
    game = GuessNumber()
    binary, random_play = game.solved_by_turn("binary"), game.solved_by_turn("random")
    assert binary == pytest.approx([1 / 7, 3 / 7, 1.0], abs=0.01)
    assert random_play[-1] == pytest.approx(0.678, abs=0.015)


def test_refuel_loss_by_hand():
    new = torch.tensor([[-3.0, -5.0], [-1.0, -1.0]], dtype=torch.float64)
    old = torch.tensor([[-4.0, -4.0], [-2.0, -2.0]], dtype=torch.float64)
    rewards = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    # pair 0: residual (1 - (-1)) - 3*1 = -1 ; pair 1: equal rewards and equal log-ratios -> 0
    assert refuel_loss(new, old, rewards, eta=3.0).tolist() == pytest.approx([1.0, 0.0])


def test_horizon_sampling_matches_the_official_code():
    rng = np.random.default_rng(0)
    lengths, turns = sample_horizons(rng, 200_000, 5, "paper")
    assert set(lengths) == {1, 2, 3, 4, 5} and (turns < lengths).all()
    marginal = np.bincount(turns, minlength=5) / len(turns)
    assert marginal == pytest.approx([0.457, 0.257, 0.157, 0.090, 0.040], abs=0.005)
    lengths, turns = sample_horizons(rng, 100_000, 5, "uniform")
    assert (lengths == 5).all() and np.bincount(turns) / len(turns) == pytest.approx([0.2] * 5, abs=0.01)
