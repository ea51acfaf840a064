"""Reward functions for the end-to-end tests, loaded by rebel.py through `--reward_function tests/rewards.py:...`."""

from tasks.chat import brevity_reward


def brevity_or_nan(dialogue):
    """The brevity reward, but NaN for prompts that mention France: a broken reward the run must survive."""
    return float("nan") if "France" in dialogue[0]["content"] else brevity_reward(dialogue)
