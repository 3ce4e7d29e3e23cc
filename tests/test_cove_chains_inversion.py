"""COVE, two documented findings (docs/cove.md): chained trajectories (Eq. 9) freeze under sub-token
motion, and the inversion's ε timestep (Eq. 3 vs diffusers/FLATTEN) is a COVEConfig option."""
import math

import pytest
import torch

from minivid.kernels.correspondence import window_topk
from minivid.methods.cove.correspondence import correspondence
from minivid.methods.cove.pipeline import COVEConfig, edit_video, injection_schedule, inversion_unet_timesteps
from minivid.models import StableDiffusion

# ---------------------------------------------------------------- Eq. 9: chains freeze under sub-token motion


def translating_features(frames: int, size: int, speed: float, dim: int = 256, seed: int = 0) -> torch.Tensor:
    """[F, size, size, dim] unit features of a smooth texture moving `speed` tokens per frame along w.

    Random Fourier features of the continuous position: the cosine between two tokens is a smooth,
    decreasing function of their distance (a Gaussian kernel of width ~2 tokens), so the most similar
    token of frame i+1 to token p of frame i is the grid token nearest to p's true position there.
    """
    g = torch.Generator().manual_seed(seed)
    omega = torch.randn(dim, 2, generator=g) * 0.5                          # rad / token
    phase = torch.rand(dim, generator=g) * 2 * math.pi
    h, w = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij")
    out = []
    for i in range(frames):
        pos = torch.stack([h, w - speed * i], dim=-1)                        # texture coordinate under token (h, w)
        out.append(torch.cos(pos @ omega.double().T + phase.double()))
    return torch.nn.functional.normalize(torch.stack(out).float(), dim=-1)


def chained_columns(features: torch.Tensor, target: int) -> torch.Tensor:
    """Column in frame `target` of the top-1 chained match of every token of frame 0: [H, W]."""
    corr = correspondence(features, window=9, k=1, backend="reference")
    H, W = corr.hw
    return (corr.idx[0, :, target, 0] % W).reshape(H, W)


@pytest.mark.parametrize("speed", [0.3, -0.4])
def test_chains_freeze_when_motion_is_under_half_a_token_per_frame(speed):
    """Each hop of Eq. 9 rounds to the grid: a sub-half-token step rounds to zero, so the chain never
    leaves its start although the texture moved 7·|speed| >= 2 tokens; the direct search finds it."""
    F, size = 8, 24
    feats = translating_features(F, size, speed)
    start = torch.arange(size).expand(size, size)
    interior = slice(6, size - 6)
    chained = chained_columns(feats, F - 1)[interior, interior]
    assert (chained == start[interior, interior]).float().mean() >= 0.95          # frozen at the start
    # the same token searched directly in frame 7: moved by round(7·speed) tokens
    idx, _ = window_topk(feats[:1], feats[F - 1:], window=9, k=1, backend="reference")
    direct = (idx[0, :, :, 0] % size)[interior, interior]
    moved = round((F - 1) * speed)
    assert abs(moved) >= 2
    assert (direct == start[interior, interior] + moved).float().mean() >= 0.95


def test_chains_move_a_whole_token_per_hop_above_half_a_token():
    """The counterpart: at 0.6 token/frame every hop rounds up, the chain runs ahead of the texture
    (7 tokens after 7 frames for a true 4.2)."""
    F, size = 8, 28
    feats = translating_features(F, size, 0.6)
    start = torch.arange(size).expand(size, size)
    interior = slice(2, size - 10)
    chained = chained_columns(feats, F - 1)[interior, interior]
    assert (chained == start[interior, interior] + (F - 1)).float().mean() >= 0.95


# ---------------------------------------------------------------- the inversion's ε timestep (Eq. 3)

def test_inversion_unet_timesteps_and_the_91_vs_81_endpoints():
    target, source = inversion_unet_timesteps(100), inversion_unet_timesteps(100, "source")
    assert target[:2] == [1, 11] and target[-1] == 991                       # the inversion ends at t = 991 ...
    assert source[:3] == [0, 1, 11] and source[-1] == 981                    # Eq. 3: ε at the level a step starts from
    sampling = COVEConfig()
    assert sorted(injection_schedule(sampling))[-1] == 981                   # ... the 50-step sampling starts at 981
    assert all(s == t for s, t in injection_schedule(COVEConfig(inversion_eps_at="source")).items())
    # steps where the source variant does not visit the sampling timestep: nearest visited, ties lower
    cfg = COVEConfig(inversion_steps=4, steps=3, inject_steps=3, inversion_eps_at="source")
    assert inversion_unet_timesteps(4, "source") == [0, 1, 251, 501]
    assert injection_schedule(cfg) == {667: 501, 334: 251, 1: 1}


def test_eq3_inversion_calls_the_unet_at_the_source_level():
    tiny = StableDiffusion.from_config("tiny_sd2", seed=0)
    seen = []
    handle = tiny.unet.register_forward_pre_hook(lambda m, args: seen.append(int(torch.as_tensor(args[1]).flatten()[0])))
    try:                                                  # the demo clip, wherever the COVE CLI glue lives
        from minivid.cli.cove import moving_shapes
    except ImportError:
        from minivid.methods.cove.cli import moving_shapes
    frames = moving_shapes(3, 32)
    try:
        results = {}
        for eps_at in ("target", "source"):
            seen.clear()
            cfg = COVEConfig(inversion_steps=4, steps=2, inject_steps=1, inversion_eps_at=eps_at)
            results[eps_at] = edit_video(tiny, frames, "a green disc", "a red disc", cfg, progress=False)
            # the feature pass (t = 261), four inversion calls, two sampling calls (501, 1)
            assert seen == [261] + inversion_unet_timesteps(4, eps_at) + [501, 1]
            assert results[eps_at].stats["injected_tensors"] > 0               # the features of t = 501 were found
    finally:
        handle.remove()
    assert not torch.allclose(results["target"].inversion.noise, results["source"].inversion.noise)
    with pytest.raises(ValueError, match="inversion_eps_at"):
        COVEConfig(inversion_eps_at="eq3")
