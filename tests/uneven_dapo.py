"""Test-only launcher (torchrun): grpo.py under DAPO's dynamic sampling where every group of rank 0 scores the same
(its rewards are replaced by zeros after the real rollout) while rank 1's groups are the task's own. Rank 0 then
samples for all --max_sampling_rounds rounds; rank 1 could stop after one. Under FSDP each round's rollout gathers
the sharded weights, so the run finishes only if the ranks decide the rounds together.

    PYTHONPATH=. python -m torch.distributed.run --standalone --nproc_per_node=2 tests/uneven_dapo.py --fsdp ...

Each rank appends the number of rollout rounds of every step to OUT/rounds-rank{R}.txt.
"""
import os
from pathlib import Path

import grpo  # the project folder is on PYTHONPATH (see above)

real_sample_groups = grpo.sample_groups
rank = int(os.environ.get("RANK", "0"))
rounds = []


def sample_groups(run, args, *rest, **kwargs):
    records, rewards, parts = real_sample_groups(run, args, *rest, **kwargs)
    rounds.append(1)
    if run.rank == 0:
        rewards = [0.0] * len(rewards)
    return records, rewards, parts


def fill_batch(run, args, *rest):
    rounds.clear()
    batch = real_fill_batch(run, args, *rest)
    with open(Path(args.out) / f"rounds-rank{run.rank}.txt", "a") as f:
        f.write(f"{len(rounds)}\n")
    return batch


grpo.sample_groups = sample_groups
real_fill_batch, grpo.fill_batch = grpo.fill_batch, fill_batch
grpo.main()
