"""COVE pipeline: diffusion features (Eq. 4), feature injection (FLATTEN's layers, timestep matching),
CGA in inversion and sampling (Appendix E), the correspondence picture, the CLI and the demo, on the
tiny SD 2-style model."""
import json

import pytest
import torch
import torch.nn.functional as F

from minivid.attention import call_state, capture, capture_outputs, processors
from minivid.cli import main
from minivid.methods.cove import attention as cove_attention
from minivid.methods.cove.attention import spatio_temporal
from minivid.cli.cove import config_from_args, moving_shapes
from minivid.methods.cove.correspondence import Correspondence
from minivid.methods.cove.features import default_feature_layer, diffusion_features
from minivid.methods.cove.inject import FeatureBank, injection_layers, match_timesteps
from minivid.methods.cove.merge import attend, grouped_probs, match, merge_groups, merge_tokens
from minivid.methods.cove.pipeline import COVEConfig, edit_video
from minivid.methods.cove.visualize import QUERY_COLOR, RANK_COLORS, correspondence_picture, point_token
from minivid.models import StableDiffusion
from minivid.pipelines import sd as sd_pipelines
from minivid.samplers import add_noise
from minivid.unet import UNet, UNetConfig, Upsample
from minivid.video import write_video


@pytest.fixture(scope="module")
def tiny():
    return StableDiffusion.from_config("tiny_sd2", seed=0)


@pytest.fixture(scope="module")
def sd21_unet():
    """SD 2.1-base's UNet on the meta device: names and shapes, no memory."""
    with torch.device("meta"):
        return UNet(UNetConfig.preset("sd21_base"))


def clip(frames=3, size=32):
    return moving_shapes(frames, size)


# ---------------------------------------------------------------- diffusion features (Eq. 4)

def test_default_feature_layer_is_the_640_channel_64x64_decoder_output_of_sd21(sd21_unet, tiny):
    assert default_feature_layer(sd21_unet) == "output_blocks.8"
    block = sd21_unet.output_blocks[8]
    assert isinstance(block[-1], Upsample) and block[-1].conv.out_channels == 640   # ends on the latent grid
    assert len(sd21_unet.output_blocks) == 12 and not any(isinstance(m, Upsample) for m in sd21_unet.output_blocks[9])
    assert default_feature_layer(tiny.unet) == "output_blocks.5"


def test_features_are_the_layer_output_of_one_pass_on_noised_latents(tiny):
    z = torch.randn(3, 4, 8, 8)
    feats = diffusion_features(tiny, z, generator=torch.Generator().manual_seed(5))
    assert feats.shape == (3, 8, 8, 64)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(3, 8, 8), atol=1e-5)
    # by hand: the same noise, the whole UNet, the output of output_blocks.5
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(5))
    t = torch.full((3,), 261)
    with torch.no_grad(), capture_outputs(tiny.unet, "output_blocks.5") as store:
        tiny.unet(add_noise(z, noise, t, tiny.schedule), t, tiny.encode_prompt([""]).expand(3, -1, -1))
    ref = F.normalize(store["output_blocks.5"][0].permute(0, 2, 3, 1), dim=-1)
    assert torch.allclose(feats, ref, atol=1e-5)
    # frames are independent (the image model, one frame at a time) and chunking changes nothing
    chunked = diffusion_features(tiny, z, generator=torch.Generator().manual_seed(5), chunk=2)
    assert torch.allclose(chunked, feats, atol=1e-5)
    # another layer by name: the final decoder block
    final = diffusion_features(tiny, z, layer="output_blocks.8", generator=torch.Generator().manual_seed(5))
    assert final.shape == (3, 8, 8, 32)


def test_feature_errors(tiny):
    with pytest.raises(ValueError, match="no module matches"):
        diffusion_features(tiny, torch.randn(2, 4, 8, 8), layer="output_blocks.99")
    with pytest.raises(ValueError, match=r"\[F, C, h, w\]"):
        diffusion_features(tiny, torch.randn(4, 8, 8))
    with pytest.raises(ValueError, match="t must be"):
        diffusion_features(tiny, torch.randn(2, 4, 8, 8), t=1000)


# ---------------------------------------------------------------- feature injection

def test_injection_layers_are_flattens_in_ldm_names(sd21_unet):
    unet = sd21_unet
    resnets, attentions = injection_layers(unet)
    assert resnets == ["output_blocks.3.0.out_layers", "output_blocks.4.0.out_layers", "output_blocks.6.0.out_layers"]
    assert attentions == [f"output_blocks.{n}.1.transformer_blocks.0.attn1" for n in (4, 5, 6, 7, 8, 9)]
    # grids at 512 px: 16x16 (blocks 3-5), 32x32 (6-8), 64x64 (9)
    assert unet.output_blocks[4][1].proj_in.in_features == 1280 and unet.output_blocks[9][1].proj_in.in_features == 320


def test_timesteps_match_exactly_for_100_inversion_and_50_sampling_steps():
    m = match_timesteps(100, 50, 40)
    assert list(m) == list(range(981, 200, -20)) and all(k == v for k, v in m.items())
    assert match_timesteps(100, 50, 0) == {}
    odd = match_timesteps(7, 3, 3)                       # inversion visits 1, 143, ..., 853; sampling 667, 334, 1
    assert odd == {667: 711, 334: 285, 1: 1}
    with pytest.raises(ValueError, match="inject_steps"):
        match_timesteps(10, 5, 6)


def test_bank_injects_what_it_recorded_into_both_guidance_halves(tiny):
    unet = tiny.unet
    resnets, attentions = injection_layers(unet)
    assert resnets == ["output_blocks.0.0.out_layers", "output_blocks.1.0.out_layers", "output_blocks.3.0.out_layers"]
    bank = FeatureBank(resnets, attentions, {500: 400}, dtype=None)
    Fr, ctx = 2, tiny.encode_prompt(["a"])
    x1, x2 = torch.randn(Fr, 4, 8, 8), torch.randn(2 * Fr, 4, 8, 8)
    with torch.no_grad():
        with bank.recording(unet), call_state(unet, frames=Fr):
            with bank.at(300):
                unet(x1, torch.tensor(300), ctx.expand(Fr, -1, -1))            # not wanted: nothing kept
            assert bank.nbytes == 0
            with bank.at(400):
                unet(x1, torch.tensor(400), ctx.expand(Fr, -1, -1))
        assert bank.steps == [400] and set(bank.features[400]) == set(resnets) and set(bank.qk[400]) == set(attentions)
        saved = bank.features[400][resnets[0]]
        assert saved.shape[0] == Fr and bank.nbytes == sum(
            x.numel() * 4 for x in [*bank.features[400].values(), *[y for p in bank.qk[400].values() for y in p]])
        # capture q/k inside the injection (its processor wraps the capture) and the resnet output after
        # the injection's hook (hooks run in the order they are registered)
        with capture(unet, attentions[0], kinds=("q", "k")) as qk, bank.injecting(unet), call_state(unet, frames=Fr):
            with capture_outputs(unet, resnets[0]) as outs:
                with bank.at(500):
                    unet(x2, torch.tensor(500), ctx.expand(2 * Fr, -1, -1))
            with bank.at(300):                                                  # not scheduled: untouched
                out_free = unet(x2, torch.tensor(300), ctx.expand(2 * Fr, -1, -1))
        assert torch.equal(outs[resnets[0]][0], saved.repeat(2, 1, 1, 1))
        q_saved, k_saved = bank.qk[400][attentions[0]]
        assert torch.equal(qk[attentions[0]]["q"][0], q_saved.repeat(2, 1, 1, 1))
        assert torch.equal(qk[attentions[0]]["k"][0], k_saved.repeat(2, 1, 1, 1))
        assert bank.injected == len(resnets) + 2 * len(attentions)
        assert torch.equal(out_free, unet(x2, torch.tensor(300), ctx.expand(2 * Fr, -1, -1)))


def test_bank_stores_in_the_requested_dtype_and_refuses_a_missing_step(tiny):
    resnets, attentions = injection_layers(tiny.unet)
    bank = FeatureBank(resnets, attentions, {500: 400})
    with torch.no_grad(), bank.recording(tiny.unet), bank.at(400), call_state(tiny.unet, frames=1):
        tiny.unet(torch.randn(1, 4, 8, 8), torch.tensor(400), tiny.encode_prompt([""]))
    assert all(x.dtype == torch.float16 and x.device.type == "cpu" for x in bank.features[400].values())
    empty = FeatureBank(resnets, attentions, {500: 400})
    with torch.no_grad(), empty.injecting(tiny.unet), empty.at(500), pytest.raises(RuntimeError, match="nothing saved"):
        tiny.unet(torch.randn(1, 4, 8, 8), torch.tensor(500), tiny.encode_prompt([""]))


# ---------------------------------------------------------------- the pipeline

def test_without_cga_and_injection_it_is_inversion_then_sampling_with_dense_attention(tiny):
    frames = clip(3)
    cfg = COVEConfig(inversion_steps=3, steps=3, inject_steps=0, mode="dense_only", guidance=5.0)
    out = edit_video(tiny, frames, "a green disc", "a red disc", cfg, progress=False)
    with processors(tiny.unet, "*attn1", spatio_temporal):
        ref = sd_pipelines.edit_video(tiny, frames, "a green disc", "a red disc", steps=3, guidance=5.0, progress=False)
    assert torch.allclose(out.inversion.noise, ref.inversion.noise, atol=1e-5)
    assert torch.allclose(out.latents, ref.latents, atol=1e-5)
    assert out.images.shape == frames.shape and out.stats["bank_bytes"] == 0 and out.stats["injected_tensors"] == 0


def test_cga_runs_in_inversion_and_sampling_and_features_are_injected(tiny, monkeypatch):
    calls = []
    real = cove_attention.correspondence_attention
    monkeypatch.setattr(cove_attention, "correspondence_attention", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    frames = clip(3)
    cfg = COVEConfig(inversion_steps=4, steps=2, inject_steps=1, guidance=7.5)
    out = edit_video(tiny, frames, "a green disc", "a red disc", cfg, progress=False)
    # tiny_sd2 at 32 px: the 8x8 feature grid is the latent grid; its attn1 layers are input_blocks.1-2 and
    # output_blocks.6-8, two transformer blocks each = 10 CGA calls per UNet call
    assert out.correspondence.hw == (8, 8) and out.correspondence.idx.shape == (3, 64, 3, 3)
    assert calls == [3] * 10 * 4 + [6] * 10 * 2            # 4 inversion calls (batch F), 2 sampling calls (batch 2F)
    resnets, attentions = injection_layers(tiny.unet)
    assert out.stats["bank_steps"] == 1 and out.stats["injected_tensors"] == len(resnets) + 2 * len(attentions)
    assert out.stats["injection"]["sampling_to_inversion_timestep"] == {"501": 501}
    assert out.stats["bank_bytes"] > 0
    calls.clear()
    no_inv = edit_video(tiny, frames, "a green disc", "a red disc", COVEConfig(
        inversion_steps=4, steps=2, inject_steps=1, cga_in_inversion=False), progress=False)
    assert calls == [6] * 10 * 2
    assert not torch.allclose(no_inv.inversion.noise, out.inversion.noise)


def test_pipeline_errors(tiny):
    with pytest.raises(ValueError, match="F >= 2"):
        edit_video(tiny, clip(1), "a", "b", COVEConfig(steps=1, inversion_steps=1, inject_steps=0))
    for bad in (dict(inject_steps=60), dict(window=4), dict(mode="parallel"), dict(feature_prompt="x"),
                dict(store_dtype="int8"), dict(steps=0)):
        with pytest.raises(ValueError, match="COVEConfig"):
            COVEConfig(**bad)


# ---------------------------------------------------------------- merging as grouped attention

@pytest.mark.parametrize("proportional", [True, False])
def test_grouped_probs_equal_attention_to_merged_tokens(proportional):
    M, S, h, d = 5, 10, 2, 4
    k, v, q = torch.randn(M, S, h, d), torch.randn(M, S, h, d), torch.randn(M, h, d)
    (km, vm), size = merge_tokens(k.mean(2), (k, v), 0.5)
    ref = attend(q, km, vm, 0.5, size, proportional=proportional)
    logits = torch.einsum("mhd,mshd->mhs", q, k) * 0.5
    group = merge_groups(match(k.mean(2), 0.5))[:, None].expand(M, h, S)
    probs = grouped_probs(logits, group, proportional)
    assert torch.allclose(torch.einsum("mhs,mshd->mhd", probs, v), ref, atol=1e-5)


# ---------------------------------------------------------------- correspondence picture

def test_correspondence_picture_marks_the_point_and_its_matches():
    Fr, h, w = 3, 4, 4
    idx = torch.zeros(Fr, h * w, Fr, 2, dtype=torch.long)
    n = point_token((0.3, 0.6), (h, w))
    assert n == 1 * w + 2
    idx[0, n, 1] = torch.tensor([5, 15])
    idx[0, n, 2] = torch.tensor([0, 10])
    pic = correspondence_picture(torch.zeros(Fr, 3, 32, 32), Correspondence(idx, torch.ones(Fr, h * w, Fr, 2), (h, w)),
                                 point=(0.3, 0.6))
    centre = lambda t: pic[..., (t // w) * 8 + 4, (t % w) * 8 + 4]  # noqa: E731
    assert torch.equal(centre(n)[0], torch.tensor(QUERY_COLOR))
    assert torch.equal(centre(5)[1], torch.tensor(RANK_COLORS[0])) and torch.equal(centre(15)[1], torch.tensor(RANK_COLORS[1]))
    assert torch.equal(centre(0)[2], torch.tensor(RANK_COLORS[0])) and torch.equal(centre(10)[2], torch.tensor(RANK_COLORS[1]))
    assert torch.equal(pic[1, :, 30, 2], torch.zeros(3))                     # elsewhere untouched
    with pytest.raises(ValueError, match="relative"):
        point_token((1.5, 0.0), (h, w))


# ---------------------------------------------------------------- command line

def test_edit_cli_end_to_end_on_the_tiny_model(tmp_path):
    video = tmp_path / "in.mp4"
    write_video(video, clip(4, 32), fps=4)
    out = tmp_path / "out"
    code = main(["edit", "--method", "cove", "--tiny", "--video", str(video), "--frames", "3",
                 "--source-prompt", "a red disc", "--prompt", "a green disc", "--steps", "2",
                 "--cove-inversion-steps", "4", "--cove-merge-ratio", "0.5", "--cove-point", "0.25,0.3",
                 "--out", str(out)])
    assert code == 0
    for name in ("edited.mp4", "grid.png", "side_by_side.mp4", "correspondence.png", "record.json"):
        assert (out / name).stat().st_size > 0
    record = json.loads((out / "record.json").read_text())
    res = record["results"]
    assert res["cove"]["steps"] == 2 and res["cove"]["inversion_steps"] == 4 and res["cove"]["inject_steps"] == 2
    assert res["cove"]["window"] == 9 and res["cove"]["k"] == 3 and res["cove"]["feature_t"] == 261
    assert res["frames"] == 3 and res["feature_grid"] == [8, 8] and res["correspondence"]["point"] == [0.25, 0.3]
    assert res["bank_megabytes"] > 0 and res["bank_steps"] == 2
    assert set(res["stage_seconds"]) == {"encode", "features", "correspondence", "inversion", "sampling", "decode"}
    assert record["peak_memory_bytes"]["cpu_rss"] > 0 and record["timings_s"]["edit"] > 0
    assert record["settings"]["cove_point"] == [0.25, 0.3]              # parsed (and checked) by the option type


def test_cli_options_and_errors(tmp_path, capsys):
    import argparse

    args = argparse.Namespace(steps=25, guidance=None, cove_window=5, cove_k=None)
    cfg = config_from_args(args)
    assert cfg.steps == 25 and cfg.inject_steps == 20 and cfg.window == 5 and cfg.k == 3 and cfg.inversion_steps == 100
    video = tmp_path / "in.mp4"
    write_video(video, clip(3, 32), fps=4)
    base = ["edit", "--method", "cove", "--video", str(video), "--prompt", "x", "--out", str(tmp_path / "o")]
    assert main(base) == 1 and "--tiny" in capsys.readouterr().err
    # option types refuse these while parsing (argparse's usage error, exit 2)
    assert main(base + ["--tiny", "--cove-point", "middle"]) == 2 and "cove-point" in capsys.readouterr().err
    assert main(base + ["--tiny", "--cove-window", "4"]) == 2 and "window" in capsys.readouterr().err


def test_demo_runs_and_says_the_model_is_random(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--method", "cove", "--steps", "2", "--frames", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "RANDOM weights" in text and "no real edits" in text
    record = json.loads((out / "record.json").read_text())
    assert record["results"]["cove"]["inversion_steps"] == 2 and record["results"]["feature_grid"] == [12, 12]
    assert (out / "correspondence.png").exists() and (out / "side_by_side.mp4").exists()
