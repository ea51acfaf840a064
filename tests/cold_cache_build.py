"""Builds the cached model folders (the embedded SmolLM2, a guessing-task warm start) under torchrun with a cold
cache, rank 0 arriving late: whichever rank reaches the file lock first, every rank must get complete folders.

transformers' save_pretrained writes nothing on a rank other than 0, so a build won by rank 1 left an empty one.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import utils  # noqa: E402
from tasks import guess_number  # noqa: E402

if __name__ == "__main__":
    rank, _, _ = utils.init_distributed()
    if rank == 0:
        time.sleep(5)  # let rank 1 reach the builds first
    tokenizer_path = utils.resolve_model_path(utils.EMBEDDED_SMOLLM2)
    task = guess_number.make_task(seed=0, warm_start_steps=2, num_train=4, num_eval=4)
    for folder in (tokenizer_path, task.policy):
        utils.load_causal_lm(folder)
        utils.load_tokenizer(folder)
    print(f"rank {rank}: complete folders", flush=True)
    utils.shutdown()
