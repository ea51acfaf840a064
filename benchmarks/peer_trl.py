"""TRL's side of benchmarks/peer_bench.py: one TRL run in this process, timed by phase, its record written as JSON.

Two runs are defined here, each started by peer_bench.py in a fresh process (so its peak resident memory is its own):

  rloo    TRL's RLOOTrainer with two completions per prompt (k = 2) on the work of one rebel.py run: the same
          prompts in the same order (rebel.prompt_indices), answer length, temperature, learning rate and linear
          decay, AdamW epsilon, gradient clipping, KL coefficient (a sequence-level KL penalty in the reward, as
          rebel.py's), epochs (RLOO's `num_iterations`: passes over each generation batch, one optimizer step per
          pass), fp32 and no activation checkpointing (rebel.py's CPU defaults), and rebel.py's reward function with
          its penalty for an answer that never ends. Generation is TRL's default (transformers `generate` on the
          training model) or, with `use_vllm`, TRL's vLLM colocate mode.
  grpo    TRL's GRPOTrainer with a `rollout_func` that plays the guessing game (tasks/guess_number.py) with its code
          user: the multi-turn entry point TRL documents. See `grpo_guessing_game`.

What is timed, per iteration (one generation batch and the optimizer steps trained on it):
  generation   TRL's `_generate` (sampling, decoding), less the weight sync inside it
  scoring      `_calculate_rewards` (the reward function)
  logprobs     the rest of `_generate_and_score_completions`: the old and the reference log-probs, padding, the
               advantages
  sync         vLLM colocate only: `vllm_generation.sync_weights`, which TRL calls before a generation after a step
  update       the remainder of the iteration's wall time, from the first optimizer step's start to the last one's
               end: the loss's forward and backward, clipping, AdamW, the scheduler, TRL's bookkeeping
The phases add up to the iteration's wall time. Generated tokens are counted as TRL returns them (an answer that
ends includes its end-of-turn token, as vLLM's token ids in rebel.py do).

    python benchmarks/peer_trl.py CONFIG.json OUT.json      # CONFIG: written by peer_bench.py
"""

import json
import os
import random
import resource
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # vLLM in this process, as rebel.py's engines
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)


def small_guessing_game(seed: int, model: str | None = None):
    """The guessing game with 64 evaluation games instead of 1024, for peer_bench.py's refuel.py runs (their first
    and last evaluation are outside the timed phases, but 1024 games would take most of a run)."""
    from tasks.guess_number import make_task

    return make_task(seed, model=model, num_train=512, num_eval=64, num_recorded=16)


class PhaseClock:
    """Wall seconds spent inside wrapped methods, per phase, and the iterations' boundaries (a TrainerCallback)."""

    def __init__(self, steps_per_iteration: int):
        self.steps_per_iteration = steps_per_iteration
        self.open = {}  # phase -> seconds since the iteration started
        self.iterations = []
        self.step_in_iteration = 0
        self.started = None
        self.extra = {}  # per-iteration figures the wrappers record (tokens, scores)

    def wrap(self, owner, name: str, phase: str, after=None):
        """Replace owner.name by a timed call; `after(result)` sees its result."""
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            result = inner(*args, **kwargs)
            self.open[phase] = self.open.get(phase, 0.0) + time.perf_counter() - t0
            if after is not None:
                after(result)
            return result

        setattr(owner, name, timed)

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class Boundaries(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if clock.step_in_iteration == 0:
                    clock.started = time.perf_counter()
                    clock.open, clock.extra = {}, {}

            def on_step_end(self, args, state, control, **kwargs):
                clock.step_in_iteration += 1
                if clock.step_in_iteration == clock.steps_per_iteration:
                    clock.close_iteration()

        return Boundaries()

    def close_iteration(self):
        wall = time.perf_counter() - self.started
        o = self.open
        sync = o.get("sync", 0.0)
        phases = {"generation": o.get("generate", 0.0) - sync, "scoring": o.get("scoring", 0.0),
                  "logprobs": o.get("generate_and_score", 0.0) - o.get("generate", 0.0) - o.get("scoring", 0.0),
                  "sync": sync}
        phases["update"] = wall - sum(phases.values())
        self.iterations.append({"iteration": len(self.iterations) + 1, "seconds": wall, "phases": phases,
                                **self.extra})
        self.step_in_iteration = 0


def brevity_scores(reward_function, penalty: float | None, eos_ids: set[int], max_tokens: int, record: dict):
    """TRL's reward-function signature around rebel.py's reward of a dialogue, with rebel.py's penalty for an
    answer that never ends (no end-of-turn token within `max_tokens`); each call's scores go into `record`."""

    def reward(prompts, completions, completion_ids, **kwargs):
        scores = []
        for prompt, completion, ids in zip(prompts, completions, completion_ids):
            finished = bool(ids) and (ids[-1] in eos_ids or len(ids) < max_tokens)
            score = float(reward_function(prompt + completion))
            scores.append(score if finished or penalty is None else penalty)
        record["scores"] = scores
        return scores

    reward.__name__ = "rebel_reward"
    return reward


def rloo(config: dict) -> dict:
    """One RLOOTrainer run of config["iterations"] iterations; its per-iteration record."""
    import torch
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    import rebel
    import tasks
    import utils

    path = utils.resolve_model_path(config["model"])
    tokenizer = utils.load_tokenizer(path)
    args = rebel.Args(model=config["model"], max_new_tokens=config["max_new_tokens"])
    chats, _, _, _, _ = rebel.load_prompt_split(args, tokenizer)
    pairs = config["pairs"]
    order = [i for it in range(1, config["iterations"] + 1)
             for i in rebel.prompt_indices(len(chats), it, pairs, config["seed"])]
    dataset = Dataset.from_list([{"prompt": chats[i]} for i in order])

    eos_ids = {tokenizer.eos_token_id}  # and the ids TRL stops at, once the trainer is made
    record = {}
    reward = brevity_scores(tasks.import_function(config["reward_function"]), config["penalty_reward"], eos_ids,
                            config["max_new_tokens"], record)
    epochs = config["epochs"]
    trl_args = RLOOConfig(
        output_dir=config["work_dir"], report_to="none", save_strategy="no", logging_steps=10**6, seed=config["seed"],
        use_cpu=True, bf16=False, gradient_checkpointing=False, disable_dropout=True, shuffle_dataset=False,
        per_device_train_batch_size=2 * pairs, gradient_accumulation_steps=1, num_generations=2,
        num_iterations=epochs, max_steps=config["iterations"] * epochs, max_completion_length=config["max_new_tokens"],
        temperature=config["temperature"], top_p=1.0, top_k=0, learning_rate=config["lr"],
        lr_scheduler_type="linear", warmup_steps=0, adam_epsilon=config["adam_eps"], weight_decay=0.0,
        max_grad_norm=config["max_grad_norm"], beta=config["kl_coef"],
        model_init_kwargs={"dtype": "float32"},
        use_vllm=config["use_vllm"], vllm_mode="colocate", vllm_gpu_memory_utilization=0.3,
        vllm_max_model_length=config["max_model_len"], dataloader_num_workers=0)
    trainer = RLOOTrainer(model=path, reward_funcs=reward, args=trl_args, train_dataset=dataset,
                          processing_class=tokenizer)

    eos_ids.update(trainer.eos_token_ids)
    clock = PhaseClock(steps_per_iteration=epochs)

    def count(result):
        prompt_ids, completion_ids, _ = result
        clock.extra["prompt_tokens"] = sum(len(p) for p in prompt_ids)
        clock.extra["generated_tokens"] = sum(len(c) for c in completion_ids)
        clock.extra["prompts"] = len(prompt_ids)

    def scored(_):
        clock.extra["score"] = sum(record["scores"]) / len(record["scores"])

    clock.wrap(trainer, "_generate", "generate", after=count)
    clock.wrap(trainer, "_calculate_rewards", "scoring", after=scored)
    clock.wrap(trainer, "_generate_and_score_completions", "generate_and_score")
    if config["use_vllm"]:
        clock.wrap(trainer.vllm_generation, "sync_weights", "sync")
    trainer.add_callback(clock.callback())
    trainer.train()
    return {"iterations": clock.iterations, "torch_threads": torch.get_num_threads()}


def grpo(config: dict) -> dict:
    """TRL's documented multi-turn path on the guessing game: GRPOTrainer with a `rollout_func` that plays each
    opening `num_generations` = 2 times against the game's code user (tasks/guess_number.py), up to the horizon,
    sampling every assistant turn with TRL's default generation (the training model's `generate`; TRL's vLLM colocate
    mode cannot sync weights on vLLM's CPU build, see `rloo`'s record). The completion handed back is the whole
    dialogue after the opening, with `env_mask` 0 on the user's tokens so that only the policy's are trained; the
    reward is the game's (1 when the secret is named). Timed like `rloo`; `generation` is the whole rollout
    (sampling and the user)."""
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    import utils
    from tasks.guess_number import GuessNumber, make_task

    path = utils.resolve_model_path(config["model"])
    tokenizer = utils.load_tokenizer(path)
    game = GuessNumber()
    task = make_task(config["seed"], model=path, num_train=config["iterations"] * config["pairs"], num_eval=1,
                     num_recorded=1)
    dataset = Dataset.from_list([{"prompt": e.messages} for e in task.train])
    secrets = random.Random(config["seed"])  # the simulated user picks its secret as each game starts
    clock = PhaseClock(steps_per_iteration=1)

    def play(prompts, trainer):
        """Each opening as often as TRL hands it over (once per generation it wants), all dialogues a turn at a
        time; returns the dialogues' token ids after the opening and the mask of the policy's tokens."""
        import dialogues

        episodes = [dialogues.Episode([dict(m) for m in p], {"secret": secrets.randint(1, game.n)}) for p in prompts]
        model = trainer.accelerator.unwrap_model(trainer.model)
        generated = 0
        for _ in range(game.horizon):
            live = [e for e in episodes if not e.done]
            if not live:
                break
            ids = [utils.chat_token_ids(tokenizer, e.messages, add_generation_prompt=True) for e in live]
            width = max(map(len, ids))
            batch = torch.tensor([[tokenizer.pad_token_id] * (width - len(i)) + i for i in ids])
            mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
            with torch.no_grad():
                out = model.generate(input_ids=batch, attention_mask=mask, do_sample=True,
                                     temperature=config["temperature"], top_p=1.0, top_k=0,
                                     max_new_tokens=config["max_new_tokens"], pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id)
            for e, row in zip(live, out[:, width:].tolist()):
                row = row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row
                generated += len(row)
                e.messages.append({"role": "assistant", "content": tokenizer.decode(row, skip_special_tokens=True)})
                reply = game.reply(e)
                if reply is None or e.turns + 1 >= game.horizon:
                    e.done = True
                if reply is not None:
                    e.messages.append({"role": "user", "content": reply})
                e.responses.append(row)
        prompt_ids, completion_ids, env_mask = [], [], []
        for p, e in zip(prompts, episodes):
            if e.messages[-1]["role"] == "user":  # the user's last word after the horizon is not trained on
                e.messages.pop()
            start = len(utils.chat_token_ids(tokenizer, p, add_generation_prompt=True))
            ids, turn_masks = utils.tokenize_dialogue(tokenizer, e.messages)
            prompt_ids.append(ids[:start])
            completion_ids.append(ids[start:])
            env_mask.append([int(any(m[i] for m in turn_masks)) for i in range(start, len(ids))])
        clock.extra.update({"generated_tokens": generated, "dialogues": len(episodes),
                            "turns": sum(e.turns for e in episodes),
                            "score": sum(game.rewards(episodes)) / len(episodes)})
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None, "env_mask": env_mask,
                "solved": game.rewards(episodes)}

    def solved(prompts, completions, solved, **kwargs):
        return solved

    trl_args = GRPOConfig(
        output_dir=config["work_dir"], report_to="none", save_strategy="no", logging_steps=10**6, seed=config["seed"],
        use_cpu=True, bf16=False, gradient_checkpointing=False, disable_dropout=True, shuffle_dataset=False,
        per_device_train_batch_size=2 * config["pairs"], gradient_accumulation_steps=1, num_generations=2,
        num_iterations=1, max_steps=config["iterations"], max_completion_length=4096,
        temperature=config["temperature"], learning_rate=config["lr"], lr_scheduler_type="linear", warmup_steps=0,
        adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=config["max_grad_norm"], beta=config["kl_coef"],
        model_init_kwargs={"dtype": "float32"}, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=path, reward_funcs=solved, args=trl_args, train_dataset=dataset,
                          processing_class=tokenizer, rollout_func=play)
    clock.wrap(trainer, "_generate", "generate")
    clock.wrap(trainer, "_calculate_rewards", "scoring")
    clock.wrap(trainer, "_generate_and_score_completions", "generate_and_score")
    trainer.add_callback(clock.callback())
    trainer.train()
    return {"iterations": clock.iterations, "torch_threads": torch.get_num_threads()}


def main():
    config_path, out_path = sys.argv[1:3]
    with open(config_path) as f:
        config = json.load(f)
    started = time.time()
    result = {"kind": config["kind"], "error": None}
    try:
        result.update(rloo(config) if config["kind"] == "rloo" else grpo(config))
    except Exception as e:  # noqa: BLE001 -- the benchmark records TRL's own error, word for word
        import traceback

        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()[-4000:]
    result["seconds"] = time.time() - started
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
