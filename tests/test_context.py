"""Lengths against the models: every preset's context fits the models it names, an over-long one is refused before
anything loads, and a dialogue that outgrows its engine's context ends there, counted, instead of failing inside
vLLM. Also the device choice, which must never turn a GPU run into a CPU run silently."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import dialogues
import dpo_multiturn
import ma_ppo
import rebel
import refuel
import lifecycle
import utils
from tasks.chat import LLMUser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"meta-llama/Meta-Llama-3-8B-Instruct": "llama3_8b_config.json",
           "meta-llama/Llama-3.1-70B-Instruct": "llama3.1_70b_config.json"}
"""the shipped configs (no weights) of the models the presets name"""


@pytest.fixture(scope="module")
def config_folders(tmp_path_factory):
    """A folder holding each shipped config as `config.json`, as a model folder would."""
    folders = {}
    for name, file in CONFIGS.items():
        folder = tmp_path_factory.mktemp(file.removesuffix("_config.json"))
        shutil.copy(os.path.join(REPO, "tests", "data", file), folder / "config.json")
        folders[name] = str(folder)
    return folders


def preset_values(script, preset: str) -> dict:
    """Every flag of `preset` over the script's defaults, flat (the task's flags included)."""
    return {**lifecycle.flat_args(script.Args()), **script.PRESETS[preset]}


MULTI_TURN = [(script, name) for script in (refuel, dpo_multiturn) for name in script.PRESETS]


@pytest.mark.parametrize("script,preset", MULTI_TURN, ids=[name for _, name in MULTI_TURN])
def test_every_multi_turn_preset_fits_its_policy(config_folders, script, preset):
    values = preset_values(script, preset)
    limit = dialogues.model_positions(config_folders[values["model"]])
    assert limit == 8192  # Llama-3-8B's max_position_embeddings
    context = dialogues.context_window(
        config_folders[values["model"]], max_prompt_tokens=values["max_prompt_tokens"], horizon=values["horizon"],
        max_new_tokens=values["max_new_tokens"], user_max_tokens=values["user_max_tokens"],
        max_context_tokens=values["max_context_tokens"])
    assert values["max_prompt_tokens"] + values["max_new_tokens"] <= context <= limit


def test_rebel_preset_fits_its_policy(config_folders):
    values = preset_values(rebel, "rebel-ultrafeedback")
    assert values["max_prompt_tokens"] + values["max_new_tokens"] <= dialogues.model_positions(
        config_folders[values["model"]])


def test_ma_ppo_preset_lengths_fit_gemma():
    """The MA-PPO preset's policy is Gemma-2B (no config shipped: its 8,192 positions are from its model card)."""
    values = preset_values(ma_ppo, "ma-ppo-tldr")
    turn = values["max_new_tokens"] + values["user_max_tokens"] + dialogues.TEMPLATE_TOKENS_PER_TURN
    assert values["max_prompt_tokens"] + values["horizon"] * turn <= 8192


def test_setting_one_lengths_without_a_cap_are_refused_naming_the_flags(config_folders):
    """The official per-turn caps (1,024 for the answer and for the user) over 5 turns need 11,584 tokens, more than
    Llama-3-8B's 8,192: vLLM would refuse the engine at start on every rank. Refused before anything loads."""
    values = preset_values(refuel, "refuel-setting-one")
    with pytest.raises(ValueError) as refused:
        dialogues.context_window(config_folders[values["model"]], max_prompt_tokens=1024, horizon=5,
                                 max_new_tokens=1024, user_max_tokens=1024)
    message = str(refused.value)
    for named in ("--max_prompt_tokens 1,024", "--horizon 5", "--max_new_tokens 1,024", "--user_max_tokens 1,024",
                  "= 11,584 tokens", "8,192 positions", "--max_context_tokens 8192"):
        assert named in message
    with pytest.raises(ValueError, match="--max_context_tokens 9,000 is longer than the 8,192 positions"):
        dialogues.context_window(config_folders[values["model"]], max_prompt_tokens=1024, horizon=5,
                                 max_new_tokens=1024, user_max_tokens=1024, max_context_tokens=9000)
    with pytest.raises(ValueError, match="cannot hold one turn"):
        dialogues.context_window(config_folders[values["model"]], max_prompt_tokens=1024, horizon=5,
                                 max_new_tokens=1024, user_max_tokens=1024, max_context_tokens=2000)


class LongUser:
    """A user written in code whose every reply is long, so dialogues outgrow a small context."""

    def __call__(self, episodes):
        return [" ".join(["word"] * 150) for _ in episodes]


def test_a_dialogue_that_outgrows_the_context_ends_there_and_is_counted(vllm_engine, tiny_model):
    """The engine's context is 512 tokens: after about three long user replies the next prompt plus its 4 new
    tokens no longer fits. vLLM would refuse the request; the dialogue ends before it instead, marked."""
    tokenizer = utils.load_tokenizer(tiny_model)
    episodes = [dialogues.Episode([{"role": "user", "content": "Hi."}]) for _ in range(2)]
    dialogues.rollout_dialogues(episodes, vllm_engine, tokenizer=tokenizer, user=LongUser(), horizons=[8, 1],
                                max_tokens=4, temperature=1.0, seed=(0,))
    long, short = episodes
    assert long.context_full and long.done and 1 < long.turns < 8
    assert all(len(p) + 4 <= vllm_engine.max_model_len for p in long.prompts)
    # the unanswered state is the one that did not fit
    last_state = utils.chat_token_ids(tokenizer, long.messages, add_generation_prompt=True)
    assert len(last_state) + 4 > vllm_engine.max_model_len
    assert short.turns == 1 and not short.context_full


def test_the_llm_user_ends_a_dialogue_it_cannot_read(vllm_engine, tiny_model):
    tokenizer = utils.load_tokenizer(tiny_model)
    fits = dialogues.Episode([{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}])
    too_long = dialogues.Episode([{"role": "user", "content": " ".join(["word"] * 600)},
                                  {"role": "assistant", "content": "Hello."}])
    user = LLMUser(vllm_engine, tokenizer, max_tokens=4, temperature=1.0, seed=0)
    replies = user([fits, too_long])
    assert isinstance(replies[0], str) and replies[1] is None
    assert too_long.context_full and not fits.context_full


def test_device_defaults_follow_the_device():
    class Flags:
        bf16, gradient_checkpointing, engine_sleep = None, True, None

    flags = Flags()
    lifecycle.device_defaults(flags, torch.device("cuda", 0))
    assert (flags.bf16, flags.gradient_checkpointing, flags.engine_sleep) == (True, True, True)
    flags = Flags()
    lifecycle.device_defaults(flags, torch.device("cpu"))
    assert (flags.bf16, flags.gradient_checkpointing, flags.engine_sleep) == (False, True, False)  # a given flag stays


def run_init(device: str, world_size: int, cuda_build: str | None = None) -> subprocess.CompletedProcess:
    """`utils.init_distributed(device)` in a fresh process that believes it is rank 0 of `world_size` (torchrun's
    variables) and whose torch sees no GPU; `cuda_build` makes torch report a CUDA build (this machine's wheel is
    the CPU one, so a CUDA wheel with no usable GPU, an old driver say, is stood in for by its version string)."""
    code = (f"import torch; torch.version.cuda = {cuda_build!r}; import utils; "
            f"r, w, d = utils.init_distributed({device!r}, 1); print('device', d)")
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29599", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_cuda_asked_for_without_a_gpu_stops():
    out = run_init("cuda", 1)
    assert out.returncode != 0 and "--device cuda, but torch" in out.stderr and "sees no GPU" in out.stderr


def test_auto_under_torchrun_with_a_cuda_build_and_no_gpu_stops():
    out = run_init("auto", 2, cuda_build="12.8")
    assert out.returncode != 0 and "2 ranks and torch built for CUDA 12.8, but no GPU" in out.stderr
    assert "pass --device cpu" in out.stderr
    # a single process on such a machine (a laptop with a CUDA wheel) trains on the CPU, as asked by `auto`
    assert run_init("auto", 1, cuda_build="12.8").stdout.strip().endswith("device cpu")


def test_environment_names_device_dtype_and_versions(process_group):
    environment = lifecycle.environment(torch.device("cpu"), 1, bf16=False)
    assert environment["device"] == "cpu" and environment["dtype"] == "fp32"
    assert environment["torch"] == torch.__version__ and environment["vllm"] == "0.32.0"
    line = lifecycle.environment_line(environment)
    assert line.startswith("device cpu x 1 ranks | fp32 | torch ") and "vLLM 0.32.0" in line
