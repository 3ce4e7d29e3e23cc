"""Running on several processes with PyTorch's own engine (torch.distributed, launched by `torchrun`).

This is the only module of minivid that reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT). `init()` starts the process group (NCCL when CUDA is there, gloo on the
CPU) and pins `cuda:LOCAL_RANK`; at world size 1 (no torchrun, or `--nproc_per_node=1`) it starts
nothing and every helper below is a no-op, so a single process runs exactly as it would without
this module.

The helpers take no group argument: they act on the default group while it is active. `local()`
makes a scope in which this process counts as a world of one (what `minivid batch` does around each
item: the items of a batch are independent, so an item's tuning must not all-reduce with the item
another rank is running at the same time).

    ctx = distributed.init()             # under torchrun: rank, world size, device of this process
    ...                                  # minivid.tuning.tune is data-parallel from here on
    with distributed.local():
        ...                              # a one-process world: no collectives
"""
from __future__ import annotations

import contextlib
import datetime
import os
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 1800          # torch's default for gloo; a collective that waits longer raises

_local_depth = 0                  # > 0 inside `local()`


@dataclass(frozen=True)
class Context:
    """Where this process sits: `rank` of `world_size` processes, `local_rank` on its machine, and
    the device it should compute on (`cuda:LOCAL_RANK` where CUDA exists, else the CPU)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (torchrun sets it)") from None


def launch_environment() -> dict[str, Any]:
    """What torchrun told this process: rank, world size, local rank, master address and port."""
    return {"rank": _env_int("RANK", 0), "world_size": _env_int("WORLD_SIZE", 1),
            "local_rank": _env_int("LOCAL_RANK", 0), "master_addr": os.environ.get("MASTER_ADDR"),
            "master_port": os.environ.get("MASTER_PORT")}


def init(init_method: str | None = None, backend: str | None = None,
         timeout_s: float = DEFAULT_TIMEOUT_S) -> Context:
    """Start the process group torchrun describes (once; later calls return the same context).

    World size 1: nothing is started. Otherwise `backend` defaults to NCCL when CUDA is available and
    gloo elsewhere; `init_method` defaults to torchrun's `env://` (MASTER_ADDR/PORT); tests pass a
    `file://` rendezvous. With CUDA the process computes on `cuda:LOCAL_RANK`.
    """
    env = launch_environment()
    world, rank, local_rank = env["world_size"], env["rank"], env["local_rank"]
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"torchrun environment: RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if world == 1:
        return Context(0, 1, local_rank, device if cuda else torch.device("cpu"), None)
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; run one process (WORLD_SIZE=1)")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = backend or ("nccl" if cuda else "gloo")
        if init_method is None and (env["master_addr"] is None or env["master_port"] is None):
            raise ValueError(f"WORLD_SIZE={world} but MASTER_ADDR/MASTER_PORT are not set: launch with torchrun")
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())


def shutdown() -> None:
    """Leave the process group (if one was started)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """True while a process group of more than one process is in use (not inside `local()`)."""
    return (_local_depth == 0 and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1)


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


@contextlib.contextmanager
def local() -> Iterator[None]:
    """A scope in which this process is a world of one: the helpers do nothing, `tune` runs alone."""
    global _local_depth
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1


def comm_device() -> torch.device:
    """Where tensors must be for the collectives: the local GPU under NCCL, the CPU under gloo."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_device(requested: str) -> str:
    """A --device for this process: "cuda" (no index) becomes `cuda:LOCAL_RANK` under torchrun."""
    if requested == "cuda" and torch.cuda.is_available():
        return f"cuda:{launch_environment()['local_rank']}"
    return requested


# ---------------------------------------------------------------- collectives (no-ops at world size 1)

def barrier() -> None:
    if active():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _in_place(tensor: torch.Tensor, op: Callable[[torch.Tensor], None]) -> torch.Tensor:
    dev = comm_device()
    buf = tensor if tensor.device == dev and tensor.is_contiguous() else tensor.detach().contiguous().to(dev)
    op(buf)
    if buf is not tensor:
        with torch.no_grad():
            tensor.copy_(buf.to(tensor.device))
    return tensor


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce `tensor` over all ranks in place ("sum" | "max" | "min"); returns it."""
    if not active():
        return tensor
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    return _in_place(tensor, lambda t: dist.all_reduce(t, op=reduce_op))


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Copy rank `src`'s `tensor` into every rank's `tensor` (in place); returns it."""
    if not active():
        return tensor
    return _in_place(tensor, lambda t: dist.broadcast(t, src=src))


def broadcast_object(obj: Any = None, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every rank."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=comm_device())
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean_(tensors: Sequence[torch.Tensor], bucket_bytes: int = 25 * 2**20) -> None:
    """Average `tensors` over all ranks in place, flattened into buckets of about `bucket_bytes`
    (one all-reduce per bucket instead of one per tensor). Tensors of one bucket share a dtype."""
    if not active():
        return
    world = world_size()
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    for same_dtype in groups.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for t in same_dtype + [None]:
            if t is not None:
                bucket.append(t)
                size += t.numel() * t.element_size()
            if bucket and (t is None or size >= bucket_bytes):
                flat = torch.cat([b.detach().reshape(-1).to(comm_device()) for b in bucket])
                dist.all_reduce(flat)
                flat.div_(world)
                with torch.no_grad():
                    for b, piece in zip(bucket, flat.split([b.numel() for b in bucket])):
                        b.copy_(piece.view_as(b).to(b.device))
                bucket, size = [], 0


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and return its result on every rank; if it raises, every rank raises
    the same exception (type and message), so no rank is left waiting in a collective."""
    if not active():
        return fn()
    result: tuple[str, Any] | None = None
    if rank() == 0:
        try:
            result = ("ok", fn())
        except Exception as e:  # handed to every rank, re-raised on each
            try:
                pickle.dumps(e)
                result = ("error", e)
            except Exception:
                result = ("error", RuntimeError(f"{type(e).__name__}: {e}"))
            broadcast_object(result)
            raise
    result = broadcast_object(result)
    if result[0] == "error":
        raise result[1]
    return result[1]


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The items rank `rank` of `world_size` takes: `rank`, `rank + world_size`, … (round robin).
    Over all ranks the shards are disjoint, cover every item and differ in length by at most one."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard: rank {rank} is not in 0..{world_size - 1}")
    return list(items[rank::world_size])


class DoneCounter:
    """Rank 0 learns when another rank finishes a unit of work (a batch item), without stopping its own:
    the other ranks `report()` (a one-element send on a gloo group of its own), a thread on rank 0
    receives from any rank and calls `on_done(rank)`. At world size 1 nothing is started and
    `report()` does nothing (rank 0 counts its own work itself).

    Every rank must create it (a group is made collectively), with `expected` = the number of reports
    rank 0 waits for (the other ranks' units).
    """

    def __init__(self, expected: int, on_done: Callable[[int], None]):
        import threading

        self._thread = None
        self._group = None
        if not active():
            return
        self._group = dist.new_group(backend="gloo")
        if rank() == 0 and expected > 0:
            def receive() -> None:
                buf = torch.zeros(1, dtype=torch.int64)
                for _ in range(expected):
                    src = dist.recv(buf, group=self._group)
                    on_done(int(src))
            self._thread = threading.Thread(target=receive, name="minivid-done-counter", daemon=True)
            self._thread.start()

    def report(self) -> None:
        if self._group is not None and rank() != 0:
            dist.send(torch.ones(1, dtype=torch.int64), dst=0, group=self._group)

    def close(self, timeout_s: float = 30.0) -> None:
        """Wait (a while) for the receiving thread; call after the ranks have met (e.g. a gather)."""
        if self._thread is not None:
            self._thread.join(timeout_s)
