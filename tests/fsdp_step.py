"""One REBEL optimizer step on a fixed batch of 4 pairs, split over however many ranks torchrun starts.

Writes the global loss and the updated weights to argv[2] (rank 0), so that runs on 1 and 2 ranks can be
compared: FSDP2 must average the ranks' gradients into the same step as one rank on the whole batch. The tests take
the one-rank step in their own process (`one_step`, on their one-process group) and the 2-rank one under torchrun.
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import helpers  # noqa: E402

import utils  # noqa: E402
from rebel import rebel_loss  # noqa: E402


def one_step(model_path: str, rank: int, world_size: int, device) -> dict:
    """The step on this rank's share of the pairs: {"loss": the global loss, "weights": the updated weights, whole}
    (a collective: every rank calls it)."""
    model = utils.shard_model(utils.load_causal_lm(model_path, torch.float32, device), bf16=False)
    # SGD: the step is linear in the averaged gradient (Adam would amplify the rounding of near-zero gradients)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 1000, (int(n),), generator=generator).tolist() for n in (3, 5, 4, 6, 2, 7, 5, 3)]
    responses = [torch.randint(0, 1000, (int(n),), generator=generator).tolist() for n in (4, 2, 6, 3, 5, 5, 2, 4)]
    rewards = torch.tensor([[1.0, 0.0], [0.2, 0.5], [0.0, 0.0], [0.9, -0.3]])
    old_lp = torch.tensor([[-20.0, -18.0], [-35.0, -30.0], [-25.0, -40.0], [-15.0, -22.0]])

    pairs = torch.arange(4).chunk(world_size)[rank]  # this rank's pairs
    rows = torch.stack([2 * pairs, 2 * pairs + 1], 1).flatten()
    input_ids, attention_mask, response_mask = utils.batch_for_logprobs(
        [prompts[i] for i in rows], [responses[i] for i in rows], pad_id=0)
    new_lp = utils.token_logprobs(model, input_ids, attention_mask, response_mask, 0.7).sum(-1).view(-1, 2)
    loss = rebel_loss(new_lp, old_lp[pairs], rewards[pairs], eta=2.0).mean()
    loss.backward()
    optimizer.step()

    global_loss = loss.detach().clone()
    dist.all_reduce(global_loss)
    return {"loss": global_loss.item() / world_size, "weights": helpers.full_state_dict(model)}


if __name__ == "__main__":
    model_path, out_path = sys.argv[1], sys.argv[2]
    rank, world_size, device = utils.init_distributed()
    step = one_step(model_path, rank, world_size, device)
    if rank == 0:
        torch.save(step, out_path)
    dist.destroy_process_group()
    # skip the interpreter's finalization: there, gloo's worker threads sometimes abort a finished process
    # ("terminate called without an active exception", about one run in six on 2 cores with this torch)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
