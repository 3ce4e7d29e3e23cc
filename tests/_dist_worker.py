"""One rank of the multi-process tuning tests (tests/test_distributed.py starts two of these).

    python tests/_dist_worker.py RENDEZVOUS_FILE OUT_DIR      (RANK, WORLD_SIZE, LOCAL_RANK in the environment)

Runs the scenarios on the toy model of `toy_model` and writes what it saw to OUT_DIR/rank<r>.pt.
"""
import os
import sys

import torch
import torch.nn as nn

torch.set_num_threads(1)

from minivid import distributed  # noqa: E402
from minivid.tuning import TuneConfig, TuningError, select_parameters, tune  # noqa: E402

STEPS = 3


def toy_model(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4))


def draw_loss(model):
    """The loss of one draw: a batch chosen by the generator, with generator noise (so that two
    ranks' draws differ)."""
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(2))
    y = x.flip(-1)

    def loss_fn(step, gen):
        idx = torch.randint(0, 32, (8,), generator=gen)
        noise = torch.randn(8, 4, generator=gen) * 0.1
        return ((model(x[idx] + noise) - y[idx]) ** 2).mean()
    return loss_fn


def config(steps: int, every: int = 1) -> TuneConfig:
    return TuneConfig(steps=steps, lr=1e-2, grad_clip=0.5, checkpoint_every=every, progress=False, seed=7)


def main(rendezvous: str, out: str) -> None:
    ctx = distributed.init(init_method=f"file://{rendezvous}", timeout_s=120)
    r = ctx.rank
    seen: dict = {"world_size": ctx.world_size, "backend": ctx.backend}

    # 1. a 3-step tune; rank 1 starts from OTHER weights (rank 0's are broadcast) and its own folder
    m = toy_model(1 if r == 0 else 99)
    steps = []
    train = select_parameters(m, ["*"])
    res = tune(m, train, draw_loss(m), config(STEPS), os.path.join(out, f"tune-rank{r}"),
               on_step=lambda s, v: steps.append({k: p.detach().clone() for k, p in train.items()}))
    seen["tune"] = {"steps": steps, "losses": res.losses, "checkpoint": str(res.checkpoint)}

    # 2. resume in a shared folder: 2 steps, then a fresh model goes on to 4
    shared = os.path.join(out, "resume")
    m = toy_model(1)
    tune(m, select_parameters(m, ["*"]), draw_loss(m), config(2, every=2), shared)
    m = toy_model(1 if r == 0 else 5)
    res = tune(m, select_parameters(m, ["*"]), draw_loss(m), config(4, every=2), shared)
    seen["resume"] = {"start": res.start_step, "state": {k: v.clone() for k, v in m.state_dict().items()}}

    # 3. resume at another world size: the folder holds a one-process run of 2 steps
    m = toy_model(1)
    res = tune(m, select_parameters(m, ["*"]), draw_loss(m), config(4, every=2), os.path.join(out, "from-one"))
    seen["from_one"] = {"start": res.start_step, "state": {k: v.clone() for k, v in m.state_dict().items()}}

    # 4. a NaN loss on rank 1 only, at step 2
    m = toy_model(1)
    base = draw_loss(m)

    def nan_on_rank1(step, gen):
        loss = base(step, gen)
        return loss * float("nan") if (r == 1 and step == 1) else loss
    try:
        tune(m, select_parameters(m, ["*"]), nan_on_rank1, config(STEPS, every=100), os.path.join(out, "nan"))
        seen["nan"] = None
    except TuningError as e:
        seen["nan"] = str(e)

    # 5. an exception on rank 0 only, at the first step
    m = toy_model(1)

    def fails_on_rank0(step, gen):
        if r == 0:
            raise KeyError("boom")
        return base(step, gen)
    try:
        tune(m, select_parameters(m, ["*"]), fails_on_rank0, config(STEPS, every=100), os.path.join(out, "error"))
        seen["error"] = None
    except TuningError as e:
        seen["error"] = str(e)

    # 6. rank 0 refuses to resume another run (another lr) in the shared folder: every rank raises it
    m = toy_model(1)
    other = TuneConfig(**{**vars(config(6, every=2)), "lr": 1e-3})
    try:
        tune(m, select_parameters(m, ["*"]), draw_loss(m), other, shared)
        seen["refused"] = None
    except TuningError as e:
        seen["refused"] = str(e)

    torch.save(seen, os.path.join(out, f"rank{r}.pt"))
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
