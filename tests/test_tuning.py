"""The shared tuning engine (EI², TCVE): freezing, resume, NaN handling, checkpointing."""
import pytest
import torch
import torch.nn as nn

from minivid.tuning import (
    TuneConfig, TuningError, gradient_checkpointing, latest_checkpoint, load_trainable,
    select_parameters, tune,
)


def toy():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4))


def regression_loss(model):
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(2))
    y = x.flip(-1)

    def loss_fn(step, gen):
        noise = torch.randn(16, 4, generator=gen) * 0.01
        return ((model(x + noise) - y) ** 2).mean()
    return loss_fn


def test_only_trainable_move_and_loss_drops(tmp_path):
    m = toy()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    train = select_parameters(m, ["2.*"])
    res = tune(m, train, regression_loss(m), TuneConfig(steps=30, lr=1e-2, progress=False, checkpoint_every=10), tmp_path)
    after = m.state_dict()
    assert torch.equal(before["0.weight"], after["0.weight"]) and torch.equal(before["0.bias"], after["0.bias"])
    assert not torch.equal(before["2.weight"], after["2.weight"])
    assert res.losses[-1] < res.losses[0]
    assert latest_checkpoint(tmp_path).name == "tuned-000030.safetensors"


def test_resume_equals_uninterrupted_run(tmp_path):
    a = toy()
    tune(a, select_parameters(a, ["*"]), regression_loss(a), TuneConfig(steps=6, lr=1e-2, progress=False, checkpoint_every=3), tmp_path / "a")
    b = toy()
    tune(b, select_parameters(b, ["*"]), regression_loss(b), TuneConfig(steps=3, lr=1e-2, progress=False, checkpoint_every=3), tmp_path / "b")
    c = toy()  # a fresh process would start from the initial weights and resume from the checkpoint
    res = tune(c, select_parameters(c, ["*"]), regression_loss(c), TuneConfig(steps=6, lr=1e-2, progress=False, checkpoint_every=3, seed=0), tmp_path / "b")
    assert res.start_step == 3
    # same per-step noise and restored AdamW moments: the resumed run is the straight run
    for k in a.state_dict():
        assert torch.allclose(a.state_dict()[k], c.state_dict()[k], atol=1e-7, rtol=0)


def test_nan_loss_stops_and_keeps_last_good(tmp_path):
    m = toy()
    train = select_parameters(m, ["*"])
    base = regression_loss(m)

    def loss_fn(step, gen):
        loss = base(step, gen)
        return loss * float("nan") if step == 4 else loss

    with pytest.raises(TuningError, match="step 5/10"):
        tune(m, train, loss_fn, TuneConfig(steps=10, lr=1e-2, progress=False, checkpoint_every=100), tmp_path)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None
    fresh = toy()
    assert load_trainable(ckpt, fresh) == 4
    for k, v in fresh.state_dict().items():
        assert torch.isfinite(v).all() and torch.equal(v, m.state_dict()[k])


def test_bad_patterns_and_checkpoints(tmp_path):
    m = toy()
    with pytest.raises(ValueError, match="matches no parameter"):
        select_parameters(m, ["nope.*"])
    with pytest.raises(FileNotFoundError):
        load_trainable(tmp_path / "missing.safetensors", m)
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(TuningError, match="not a readable"):
        load_trainable(tmp_path / "bad.safetensors", m)
    other = nn.Linear(3, 3)
    from minivid.tuning import save_trainable
    save_trainable(tmp_path / "other.safetensors", dict(other.named_parameters()), 1)
    with pytest.raises(TuningError, match="other shapes"):
        load_trainable(tmp_path / "other.safetensors", nn.Linear(3, 5))


def test_gradient_checkpointing_same_grads():
    m = toy()
    x = torch.randn(5, 4)
    m(x).square().sum().backward()
    ref = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    with gradient_checkpointing(m, "0") as names:
        assert names == ["0"]
        m(x).square().sum().backward()
    assert "forward" not in m[0].__dict__
    for p, g in zip(m.parameters(), ref):
        assert torch.allclose(p.grad, g, atol=1e-6)


def test_buffers_are_checkpointed_with_the_trainable_tensors(tmp_path):
    """Spectral-norm power-iteration vectors change in training without gradients: a reloaded
    model must get them back, or it normalises with another estimate."""
    def make():
        torch.manual_seed(3)
        m = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(4, 4)))
        return m

    m = make()
    x = torch.randn(8, 4)
    train = select_parameters(m, ["*"])
    from minivid.tuning import select_buffers
    bufs = select_buffers(m, ["*parametrizations.weight.0._*"])
    assert set(bufs) == {"0.parametrizations.weight.0._u", "0.parametrizations.weight.0._v"}
    tune(m, train, lambda step, gen: m(x).square().mean(), TuneConfig(steps=3, lr=1e-2, progress=False), tmp_path, buffers=bufs)
    fresh = make()
    load_trainable(latest_checkpoint(tmp_path), fresh)
    m.eval(), fresh.eval()
    assert torch.equal(fresh(x), m(x))
    assert torch.equal(fresh[0].parametrizations.weight[0]._u, m[0].parametrizations.weight[0]._u)
