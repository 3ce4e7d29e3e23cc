"""minivid.distributed and data-parallel tuning: shard, the world-size-1 no-op, and two real gloo
processes (CPU, one thread each, file rendezvous in tmp_path) against one process."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from minivid import distributed
from minivid.tuning import select_parameters, step_seed, tune

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _dist_worker as worker  # noqa: E402

TIMEOUT_S = 240
WORKER = pathlib.Path(__file__).parent / "_dist_worker.py"


# ---------------------------------------------------------------- one process

@pytest.mark.parametrize("n, world", [(0, 1), (1, 3), (5, 2), (7, 3), (12, 4), (3, 5)])
def test_shard_is_disjoint_complete_and_balanced(n, world):
    items = [f"item{i}" for i in range(n)]
    shards = [distributed.shard(items, r, world) for r in range(world)]
    flat = [x for s in shards for x in s]
    assert sorted(flat) == sorted(items) and len(flat) == len(set(flat))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert shards[0] == items[0::world]                       # rank r takes r, r + W, ...
    with pytest.raises(ValueError, match="rank"):
        distributed.shard(items, world, world)


def test_world_size_one_is_a_no_op(monkeypatch):
    for name in distributed.ENV:
        monkeypatch.delenv(name, raising=False)
    ctx = distributed.init()
    assert (ctx.rank, ctx.world_size, ctx.backend) == (0, 1, None)
    assert not torch.distributed.is_initialized() and not distributed.active()
    t = torch.arange(4.0)
    assert distributed.all_reduce_(t) is t and torch.equal(t, torch.arange(4.0))
    assert distributed.broadcast_object("x") == "x" and distributed.all_gather_object(3) == [3]
    assert distributed.on_main(lambda: 5) == 5
    with pytest.raises(KeyError):
        distributed.on_main(lambda: {}["missing"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2"):
        distributed.init()


def test_world_size_one_tunes_as_before(tmp_path):
    """The single-process loop draws from seed·1000003 + step, as before the distributed engine, and
    an explicit re-implementation of the old loop gives bit-identical tensors."""
    assert step_seed(7, 3, 0) == 7 * 1_000_003 + 3 and step_seed(7, 3, 1) != step_seed(7, 3, 0)
    m = worker.toy_model()
    train = select_parameters(m, ["*"])
    cfg = worker.config(4, every=2)
    res = tune(m, train, worker.draw_loss(m), cfg, tmp_path)
    assert res.extra == {}
    ref = worker.toy_model()
    params = list(ref.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    loss_fn, gen, losses = worker.draw_loss(ref), torch.Generator(), []
    for step in range(cfg.steps):
        gen.manual_seed(cfg.seed * 1_000_003 + step)
        loss = loss_fn(step, gen)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
    assert res.losses == losses
    for a, b in zip(m.parameters(), ref.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- two processes

def averaged_loss(model):
    """One process's loss that averages the two ranks' draws (rank r draws from step_seed(seed, step, r))."""
    one = worker.draw_loss(model)

    def loss_fn(step, gen):
        gens = [torch.Generator().manual_seed(step_seed(7, step, r)) for r in (0, 1)]
        return 0.5 * (one(step, gens[0]) + one(step, gens[1]))
    return loss_fn


def reference(steps, out, every=1, record=None):
    m = worker.toy_model(1)
    train = select_parameters(m, ["*"])
    on_step = (lambda s, v: record.append({k: p.detach().clone() for k, p in train.items()})) if record is not None else None
    res = tune(m, train, averaged_loss(m), worker.config(steps, every), out, on_step=on_step)
    return m, res


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two-ranks")
    reference(2, out / "from-one", every=2)                  # a one-process run the 2 ranks resume
    env = {**os.environ, "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(out / "rendezvous"), str(out)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-3000:]}"
    return out, [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


@pytest.mark.distributed
def test_two_ranks_equal_one_process_averaging_their_draws(two_ranks, tmp_path):
    out, seen = two_ranks
    assert seen[0]["world_size"] == 2 and seen[0]["backend"] == "gloo"
    steps = []
    _, res = reference(worker.STEPS, tmp_path, record=steps)
    for r in (0, 1):
        assert len(seen[r]["tune"]["steps"]) == worker.STEPS
        for mine, ref in zip(seen[r]["tune"]["steps"], steps):
            for k in ref:
                assert (mine[k] - ref[k]).abs().max() <= 1e-6, (r, k)
        assert seen[r]["tune"]["losses"] == pytest.approx(res.losses, abs=1e-6)


@pytest.mark.distributed
def test_parameters_identical_on_both_ranks_after_every_step(two_ranks):
    _, seen = two_ranks
    for a, b in zip(seen[0]["tune"]["steps"], seen[1]["tune"]["steps"]):
        for k in a:
            assert torch.equal(a[k], b[k]), k        # rank 1 began from other weights: broadcast, then equal updates


@pytest.mark.distributed
def test_only_rank_zero_writes(two_ranks):
    out, seen = two_ranks
    names = sorted(p.name for p in (out / "tune-rank0").iterdir())
    assert names == sorted(f"tuned-{s:06d}{x}.safetensors" for s in (1, 2, 3) for x in ("", ".optim"))
    assert not (out / "tune-rank1").exists()
    assert seen[1]["tune"]["checkpoint"] == str(out / "tune-rank1" / "tuned-000003.safetensors")


@pytest.mark.distributed
def test_resume_on_two_ranks_equals_uninterrupted(two_ranks, tmp_path):
    _, seen = two_ranks
    ref, _ = reference(4, tmp_path, every=2)
    for key in ("resume", "from_one"):                       # written by the 2 ranks / by one process
        for r in (0, 1):
            assert seen[r][key]["start"] == 2
            for k, v in ref.state_dict().items():
                assert (seen[r][key]["state"][k] - v).abs().max() <= 1e-6, (key, r, k)


@pytest.mark.distributed
def test_nan_on_one_rank_stops_both_with_the_same_error(two_ranks):
    out, seen = two_ranks
    assert seen[0]["nan"] is not None and seen[0]["nan"] == seen[1]["nan"]
    assert "step 2/3" in seen[0]["nan"] and "rank 1: loss nan" in seen[0]["nan"]
    assert (out / "nan" / "tuned-000001.safetensors").is_file()      # the last good tensors
    assert seen[0]["error"] == seen[1]["error"] and "rank 0: an error" in seen[0]["error"]


@pytest.mark.distributed
def test_a_refused_resume_reaches_every_rank(two_ranks):
    _, seen = two_ranks
    assert seen[0]["refused"] == seen[1]["refused"] and "config.lr: 0.01 (checkpoint) vs 0.001" in seen[0]["refused"]


# ---------------------------------------------------------------- minivid batch

@pytest.fixture(scope="module")
def batch_inputs(tmp_path_factory):
    """A tiny SD file on disk (so --weights loads go through the per-process cache) and a 2-frame clip."""
    from minivid.models import StableDiffusion
    from minivid.video import write_video

    d = tmp_path_factory.mktemp("batch-inputs")
    weights = StableDiffusion.from_config("tiny", seed=3).save(d / "tiny.safetensors")
    clip = write_video(d / "clip.mp4", torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    return weights, clip


def write_plan(path, items):
    import json

    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    return path


def generate_item(name, weights, seed=0):
    return {"id": name, "command": "generate", "args": {"weights": str(weights), "prompt": f"a {name}", "steps": 1,
                                                         "seed": seed}}


def test_batch_in_one_process_records_a_failure_and_goes_on(tmp_path, batch_inputs, capsys):
    import json

    from minivid.cli import main

    weights, clip = batch_inputs
    plan = write_plan(tmp_path / "plan.jsonl", [
        generate_item("a", weights),
        {"id": "bad", "command": "invert", "args": {"weights": str(weights), "video": str(tmp_path / "missing.mp4"),
                                                    "steps": 1, "size": 32}},
        {"id": "typo", "command": "generate", "args": {"weights": str(weights), "prompt": "x", "stepz": 1}},
        {"id": "inv", "command": "invert", "args": {"weights": str(weights), "video": str(clip), "frames": 2,
                                                    "steps": 1, "size": 32}},
    ])
    out = tmp_path / "out"
    assert main(["batch", str(plan), "--out", str(out), "--no-progress"]) == 1
    report = json.loads((out / "batch.json").read_text())
    status = {e["id"]: e["status"] for e in report["items"]}
    assert status == {"a": "done", "bad": "failed", "typo": "failed", "inv": "done"}
    assert report["ranks"][0]["model_loads"] == 1                     # one load, reused by the other items
    bad = json.loads((out / "bad" / "error.json").read_text())
    assert "missing.mp4" in bad["error"] and "no such file" in bad["error"] and not (out / "bad" / "record.json").exists()
    assert "unrecognized arguments: --stepz" in json.loads((out / "typo" / "error.json").read_text())["error"]
    assert report["items"][0]["outputs"] == ["image_00.png", "grid.png"] and report["items"][0]["seconds"] > 0
    assert "2 done, 0 skipped, 2 failed" in capsys.readouterr().out
    # a rerun skips what finished and runs the failed items again
    before = (out / "a" / "record.json").read_bytes()
    assert main(["batch", str(plan), "--out", str(out), "--no-progress"]) == 1
    status = {e["id"]: e["status"] for e in json.loads((out / "batch.json").read_text())["items"]}
    assert status == {"a": "skipped", "bad": "failed", "typo": "failed", "inv": "skipped"}
    assert (out / "a" / "record.json").read_bytes() == before


@pytest.mark.parametrize("line, message", [
    ('{"id": "a", "command": "paint", "args": {}}', "command 'paint' is not one of"),
    ('{"id": "../x", "command": "edit", "args": {}}', "must be letters, digits"),
    ('{"id": "a", "command": "edit", "args": {"out": "elsewhere"}}', "out is set by batch"),
    ('{"id": "a", "command": "edit", "args": []}', "args must be an object"),
    ('not json', "not a JSON object"),
    ('{"id": "a", "command": "edit"}\n{"id": "a", "command": "tune"}', "already used on line 1"),
])
def test_batch_plan_errors_before_anything_runs(tmp_path, capsys, line, message):
    from minivid.cli import main

    plan = tmp_path / "plan.jsonl"
    plan.write_text(line + "\n")
    assert main(["batch", str(plan), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "out").exists()


def torchrun_batch(plan, out, tty: bool = False):
    """Run the batch under torchrun; tty=True: its stderr is a pseudo-terminal (progress bars on), read whole."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "minivid",
           "batch", str(plan), "--out", str(out), "--threads", "1"]
    if not tty:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    else:
        import fcntl
        import pty
        import struct
        import termios
        import threading

        master, slave = pty.openpty()
        # a terminal of 30 x 120 characters (a new pty has size 0 x 0, where tqdm draws an empty bar)
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
        chunks: list[bytes] = []

        def drain():
            while True:
                try:
                    data = os.read(master, 65536)
                except OSError:                   # EIO: every writer closed the terminal
                    return
                if not data:
                    return
                chunks.append(data)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        try:
            proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=slave, text=True, timeout=TIMEOUT_S)
        finally:
            os.close(slave)
            reader.join(timeout=30)
            os.close(master)
        proc.stderr = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.distributed
def test_batch_under_torchrun_splits_runs_once_and_skips_on_rerun(tmp_path, batch_inputs):
    import json

    weights, clip = batch_inputs
    items = [generate_item(f"g{i}", weights, seed=i) for i in range(5)]
    items[3] = {"id": "t3", "command": "tune", "args": {"method": "ei2", "tiny": True, "video": str(clip),
                                                        "frames": 2, "steps": 1, "prompt": "a clip"}}
    plan = write_plan(tmp_path / "plan.jsonl", items)
    out = tmp_path / "out"
    proc = torchrun_batch(plan, out, tty=True)
    report = json.loads((out / "batch.json").read_text())
    assert report["world_size"] == 2
    assert [(e["id"], e["rank"], e["status"]) for e in report["items"]] == [
        ("g0", 0, "done"), ("g1", 1, "done"), ("g2", 0, "done"), ("t3", 1, "done"), ("g4", 0, "done")]
    assert [r["items"] for r in report["ranks"]] == [3, 2]
    assert [r["model_loads"] for r in report["ranks"]] == [1, 1]          # rank 0: 3 items, 1 load
    for e in report["items"]:
        rec = json.loads((out / e["id"] / "record.json").read_text())
        assert rec["outputs"] == e["outputs"] and e["outputs"]
    assert (out / "t3" / "tuned-000001.safetensors").is_file()           # its tuning ran alone on rank 1
    assert proc.stdout.count("batch: 5 done") == 1                       # rank 0 reports, once
    assert "5/5" in proc.stderr                                          # on a terminal, rank 0's bar counts rank 1's items
    assert "tuning" not in proc.stderr                                   # rank 1 (the tune item) shows no bars
    stamps = {e["id"]: (out / e["id"] / "record.json").stat().st_mtime_ns for e in report["items"]}
    proc = torchrun_batch(plan, out)
    report = json.loads((out / "batch.json").read_text())
    assert [e["status"] for e in report["items"]] == ["skipped"] * 5
    assert "batch (2 processes)" not in proc.stderr                      # stderr is no terminal: no bar
    assert {e["id"]: (out / e["id"] / "record.json").stat().st_mtime_ns for e in report["items"]} == stamps


@pytest.mark.distributed
def test_tune_command_under_torchrun_is_data_parallel(tmp_path, batch_inputs):
    """`torchrun -m minivid tune`: rank 0 writes the one job folder; the record and checkpoint say
    world size 2; the other rank leaves nothing behind."""
    import json

    _, clip = batch_inputs
    out = tmp_path / "tuned"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "minivid",
           "tune", "--method", "tcve", "--tiny", "--video", str(clip), "--frames", "2", "--steps", "2",
           "--prompt", "a clip", "--out", str(out), "--threads", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("wrote ") == 1
    rec = json.loads((out / "record.json").read_text())
    assert rec["results"]["world_size"] == 2 and len(rec["results"]["losses"]) == 2
    from minivid.tuning import checkpoint_meta

    assert checkpoint_meta(out)["world_size"] == 2
    assert not list(tmp_path.glob("minivid-rank*"))                        # rank 1's scratch folder is gone


def test_batch_items_get_their_own_copy_of_the_cached_weights(tmp_path, batch_inputs):
    """Two identical tune items on one weights file: one load, and the second item's model is not
    the first one's after tuning (EI² inflates and trains the UNet in place), so the losses agree."""
    import json

    from minivid.cli import main

    weights, clip = batch_inputs
    args = {"method": "ei2", "weights": str(weights), "video": str(clip), "frames": 2, "size": 32, "steps": 2,
            "lr": 1e-3, "prompt": "a clip"}
    plan = write_plan(tmp_path / "plan.jsonl", [{"id": i, "command": "tune", "args": args} for i in ("a", "b")])
    out = tmp_path / "out"
    assert main(["batch", str(plan), "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "batch.json").read_text())["ranks"][0]["model_loads"] == 1
    losses = [json.loads((out / i / "record.json").read_text())["results"]["losses"] for i in ("a", "b")]
    assert losses[0] == losses[1] and losses[0][0] != losses[0][1]
