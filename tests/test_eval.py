"""minivid.eval: encoders equal transformers on tiny random configs (oracle built at random, exported in
the official layout, loaded by minivid's loaders), full-size layouts on the meta device, each
reference's preprocessing (Pillow / CLIPImageProcessor bit for bit; VBench's torchvision transforms
against a numpy restatement), the metric formulas on constructed inputs, `minivid eval` end to end
on tiny random encoder files, `minivid edit --eval`, and the error paths.
"""
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minivid.cli import main
from minivid.clip import CLIP_MEAN, CLIP_STD
from minivid.eval import (
    AestheticPredictor, DINOViT, EncoderError, Evaluator, OpenAICLIPModel, aesthetic_quality, build_clip,
    clip_frame_consistency, clip_preprocess_hf, clip_preprocess_vbench, clip_text_alignment, dino_preprocess_vbench,
    load_aesthetic, load_clip, load_dino, pil_resize, subject_consistency, to_uint8,
)
from minivid.eval.encoders import CLIP_PRESETS, DINO_PRESETS, OPENCLIP_PRESETS
from minivid.eval.metrics import METRICS, RUN_WHEN_PRESENT
from minivid.eval.preprocess import IMAGENET_MEAN, IMAGENET_STD
from minivid.tokenizer import CLIPTokenizer
from minivid.video import write_video

from _builders import max_err
from test_clip import manifest_group, openclip_visual_to_hf, randomize, shapes

TOL = 1e-5
PROMPTS = ["a photo of a cat", "an astronaut riding a horse on mars", ""]


def save_safetensors(sd, path):
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(path))
    return path


# ---------------------------------------------------------------- oracles

def hf_clip_config(text, vision):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=text.vocab_size, hidden_size=text.width, intermediate_size=text.mlp_width,
                         num_hidden_layers=text.layers, num_attention_heads=text.heads,
                         max_position_embeddings=text.context_length, hidden_act=text.act, layer_norm_eps=text.eps,
                         projection_dim=text.projection_dim),
        vision_config=dict(hidden_size=vision.width, intermediate_size=vision.mlp_width, num_hidden_layers=vision.layers,
                           num_attention_heads=vision.heads, image_size=vision.image_size, patch_size=vision.patch_size,
                           hidden_act=vision.act, layer_norm_eps=vision.eps, projection_dim=vision.projection_dim),
        projection_dim=text.projection_dim)


def hf_vit_config(cfg):
    from transformers import ViTConfig

    return ViTConfig(hidden_size=cfg.width, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                     intermediate_size=cfg.mlp_width, image_size=cfg.image_size, patch_size=cfg.patch_size,
                     hidden_act="gelu", layer_norm_eps=cfg.eps, qkv_bias=True)


# transformers ViTModel -> DINO's VisionTransformer names (written here from the two layouts)
VIT_TO_DINO = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^layers\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^layers\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^layers\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"^layers\.(\d+)\.mlp\.fc1\.", r"blocks.\1.mlp.fc1."),
    (r"^layers\.(\d+)\.mlp\.fc2\.", r"blocks.\1.mlp.fc2."),
    (r"^layernorm\.", "norm."),
]


def vit_to_dino(sd):
    out, qkv = {}, {}
    for key, value in sd.items():
        m = re.match(r"^layers\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$", key)
        if m:
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
            continue
        for pattern, repl in VIT_TO_DINO:
            if re.search(pattern, key):
                out[re.sub(pattern, repl, key)] = value
                break
        else:
            raise KeyError(key)
    for (i, leaf), parts in qkv.items():
        out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]])   # qkv = [q; k; v]
    return out


def features(out):
    """transformers 5 returns a ModelOutput from get_*_features (the projection in pooler_output)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# ---------------------------------------------------------------- encoder parity

def test_openai_clip_matches_transformers(tmp_path):
    from transformers import CLIPModel

    text, vision = CLIP_PRESETS["tiny_openai"]
    oracle = randomize(CLIPModel(hf_clip_config(text, vision)))
    sd = dict(oracle.state_dict())
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]       # older exports carry these buffers
    sd["vision_model.embeddings.position_ids"] = torch.arange(vision.grid ** 2 + 1)[None]
    enc = load_clip(save_safetensors(sd, tmp_path / "clip.safetensors"))
    assert enc.kind == "openai" and enc.preset == "tiny_openai" and isinstance(enc.model, OpenAICLIPModel)
    ids = CLIPTokenizer(pad="end")(PROMPTS)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert max_err(enc.encode_text(ids), features(oracle.get_text_features(input_ids=ids))) <= TOL
        assert max_err(enc.encode_image(pixels), features(oracle.get_image_features(pixel_values=pixels))) <= TOL
        assert enc.model.logit_scale.item() == oracle.logit_scale.item()
    (tmp_path / "snapshot").mkdir()                                # a Hub snapshot folder works too
    save_safetensors(oracle.state_dict(), tmp_path / "snapshot" / "model.safetensors")
    assert load_clip(tmp_path / "snapshot").preset == "tiny_openai"


def test_openclip_matches_transformers(tmp_path):
    """minivid's OpenCLIP model written in OpenCLIP's layout; transformers' CLIPModel gets the same
    tensors through diffusers' OpenCLIP text converter and test_clip's visual mapping."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPModel, CLIPTextModelWithProjection

    ours = randomize(build_clip("tiny_openclip").model)
    path = save_safetensors(ours.state_dict(), tmp_path / "open_clip_model.safetensors")
    enc = load_clip(path)
    assert enc.kind == "openclip" and enc.preset == "tiny_openclip"
    text, vision = OPENCLIP_PRESETS["tiny_openclip"]
    cfg = hf_clip_config(text, vision)
    oracle = CLIPModel(cfg).eval()
    sd = {k: v for k, v in enc.model.state_dict().items()}
    prefix = "conditioner.embedders.1.model."
    hf = convert_open_clip_checkpoint(CLIPTextModelWithProjection(cfg.text_config), {prefix + k: v for k, v in sd.items()
                                      if not k.startswith("visual.")}, prefix=prefix)
    hf.update(openclip_visual_to_hf({k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}))
    hf["logit_scale"] = sd["logit_scale"]
    oracle.load_state_dict(hf, strict=True)
    ids = CLIPTokenizer(pad="zero")(PROMPTS)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert max_err(enc.encode_text(ids), features(oracle.get_text_features(input_ids=ids))) <= TOL
        assert max_err(enc.encode_image(pixels), features(oracle.get_image_features(pixel_values=pixels))) <= TOL


def test_dino_matches_transformers_vit(tmp_path):
    from transformers import ViTModel

    cfg = DINO_PRESETS["tiny_dino"]
    oracle = randomize(ViTModel(hf_vit_config(cfg), add_pooling_layer=False))
    path = tmp_path / "dino.pth"
    torch.save(vit_to_dino(oracle.state_dict()), path)
    ours = load_dino(path)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert max_err(ours(pixels), oracle(pixel_values=pixels).last_hidden_state[:, 0]) <= TOL


def test_dino_attention_processor_is_swappable():
    from minivid.attention import explicit

    model = DINOViT("tiny_dino").eval()
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        ref = model(x)
        for block in model.blocks:
            block.attn.processor = explicit
        assert max_err(model(x), ref) <= TOL


def test_dino_position_resize_is_dinos():
    """Another grid than the trained one: DINO's interpolate_pos_encoding, restated here from its
    definition (bicubic with scale factors (n + 0.1) / G, not to a size as transformers' ViT does)."""
    model = DINOViT("tiny_dino")
    G, D = model.cfg.grid, model.cfg.width
    assert model.positions(32, 32) is model.pos_embed
    pos = model.positions(32, 56)                                    # grid 4 x 7
    grid = model.pos_embed[:, 1:].reshape(1, G, G, D).permute(0, 3, 1, 2)
    want = F.interpolate(grid, scale_factor=(4.1 / G, 7.1 / G), mode="bicubic", align_corners=False)
    want = torch.cat([model.pos_embed[:, :1], want.permute(0, 2, 3, 1).reshape(1, 28, D)], dim=1)
    assert torch.equal(pos, want)
    by_size = F.interpolate(grid, size=(4, 7), mode="bicubic", align_corners=False)
    assert (pos[:, 1:] - by_size.permute(0, 2, 3, 1).reshape(1, 28, D)).abs().max() > 1e-3   # the rule matters
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 56)).shape == (2, D)


def test_aesthetic_head_loads_with_weights_only_and_scores(tmp_path):
    head = torch.nn.Linear(24, 1)
    path = tmp_path / "aesthetic.pth"
    torch.save(head.state_dict(), path)
    ours = load_aesthetic(path)
    x = torch.randn(5, 24)
    with torch.no_grad():
        assert max_err(ours(x), head(x / x.norm(dim=-1, keepdim=True))[:, 0]) <= TOL
    with pytest.raises(ValueError, match=r"\[B, 24\]"):
        ours(torch.randn(2, 768))


# ---------------------------------------------------------------- full size on the meta device

def test_full_size_clip_vit_l14_layout():
    from transformers import CLIPConfig, CLIPModel

    with torch.device("meta"):
        ours = build_clip("openai_vit_l14").model
        # openai/clip-vit-large-patch14's config
        theirs = CLIPModel(CLIPConfig(
            text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                             projection_dim=768),
            vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               image_size=224, patch_size=14, projection_dim=768), projection_dim=768))
    assert shapes(ours) == shapes(theirs)
    assert sum(p.numel() for p in ours.parameters()) == 427_616_513


def test_full_size_openclip_vit_h14_layout():
    """Text tower = SD 2.x's (its manifest), visual = SVD's image encoder (its manifest)."""
    with torch.device("meta"):
        ours = build_clip("openclip_vit_h14").model
    want = manifest_group("sd-v2-1", "cond_stage_model.model.")
    want.update({k: v for k, v in manifest_group("svd", "conditioner.embedders.0.open_clip.model.").items()
                 if k.startswith("visual.")})
    assert shapes(ours) == want
    assert sum(p.numel() for p in ours.parameters()) == 986_109_441


def test_full_size_dino_vitb16_layout():
    from transformers import ViTModel

    with torch.device("meta"):
        ours = DINOViT("dino_vitb16")
        theirs = ViTModel(hf_vit_config(DINO_PRESETS["dino_vitb16"]), add_pooling_layer=False)
    assert shapes(ours) == {k: list(v.shape) for k, v in vit_to_dino(theirs.state_dict()).items()}
    assert sum(p.numel() for p in ours.parameters()) == 85_798_656
    assert shapes(AestheticPredictor()) == {"weight": [1, 768], "bias": [1]}


# ---------------------------------------------------------------- preprocessing

def u8(shape, seed=0):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("hw,size", [((67, 91), (224, 304)), ((480, 854), (224, 398)), ((300, 300), (224, 224)),
                                     ((100, 150), (224, 336)), ((17, 9), (40, 21)), ((224, 260), (224, 224))])
def test_pil_resize_is_pillow_bicubic_bit_for_bit(hw, size):
    from PIL import Image

    img = u8((2, 3, *hw))
    ours = pil_resize(img, size)
    for i in range(2):
        ref = np.asarray(Image.fromarray(img[i].permute(1, 2, 0).numpy()).resize(size[::-1], Image.BICUBIC))
        assert np.array_equal(ours[i].permute(1, 2, 0).numpy(), ref)


@pytest.mark.parametrize("hw", [(480, 854), (257, 131), (225, 227), (512, 512), (224, 224)])
def test_clip_preprocess_hf_is_clip_image_processor(hw):
    from PIL import Image
    from transformers import CLIPImageProcessorPil

    img = u8((2, 3, *hw), seed=1)
    ref = CLIPImageProcessorPil()(images=[Image.fromarray(i.permute(1, 2, 0).numpy()) for i in img],
                                  return_tensors="pt")["pixel_values"]
    assert max_err(clip_preprocess_hf(img), ref) <= 1e-6


def np_interp_axis(x, out, axis, mode):
    """torch's interpolate (align_corners=False, no antialias) along one axis, restated in numpy: source
    coordinate (i + 0.5) · in/out - 0.5 with a float32 scale, stored as float32, as torch does for
    float32 images (that rounding moves a coordinate by up to ~1e-4 px: ~0.02 levels on a noise image); bilinear clamps
    it at 0; bicubic (a = -0.75) clamps its four taps to the image; the weighted sum in float64."""
    f32 = np.float32
    n = x.shape[axis]
    x = np.moveaxis(x, axis, -1)
    src = (np.float64(f32(n) / f32(out)) * (np.arange(out) + 0.5) - 0.5).astype(f32)  # float scale, double product
    if mode == "bilinear":
        src = np.maximum(src, f32(0))
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n - 1)
        t = (src - i0.astype(f32)).astype(np.float64)
        y = x[..., i0] * (1 - t) + x[..., i1] * t
    else:
        a = -0.75
        i = np.floor(src).astype(int)
        t = (src - i.astype(f32)).astype(np.float64)

        def w(d):
            d = np.abs(d)
            return np.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1, np.where(d < 2, a * (d ** 3 - 5 * d ** 2 + 8 * d - 4), 0))
        y = sum(x[..., np.clip(i + k, 0, n - 1)] * w(t - k) for k in (-1, 0, 1, 2))
    return np.moveaxis(y, -1, axis)


def np_vbench(img, size, mode, crop):
    """VBench's transforms on a uint8 video, restated: Resize(size) (shorter side) in float, clamp for
    bicubic, round to uint8, CenterCrop with round((H - size) / 2) offsets if `crop`, /255, normalise.
    Also returns where the float value lies within 1e-3 of a rounding boundary (x.5): there float32
    (torch) and float64 (here) may round to neighbouring levels."""
    x = img.numpy().astype(np.float64)
    H, W = x.shape[-2:]
    h, w = (size, int(size * W / H)) if H <= W else (int(size * H / W), size)
    near = np.zeros(x.shape, dtype=bool)
    if (h, w) != (H, W):
        x = np_interp_axis(np_interp_axis(x, h, 2, mode), w, 3, mode)
        x = np.clip(x, 0, 255) if mode == "bicubic" else x
        near = np.abs(x - np.floor(x) - 0.5) < 1e-3
        x = np.round(x)
    if crop:
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        x, near = (a[..., top:top + size, left:left + size] for a in (x, near))
    mean, std = (CLIP_MEAN, CLIP_STD) if crop else (IMAGENET_MEAN, IMAGENET_STD)
    return (x / 255 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None], near


def close_up_to_rounding(ours, ref, std):
    """Equal (float32 vs float64) wherever the value is not at a rounding boundary; there, one 8-bit level apart at most."""
    ref, near = ref
    diff = np.abs(ours.numpy().astype(np.float64) - ref)
    assert diff[~near].max() <= 1e-5
    assert diff.max() <= 1 / 255 / min(std) + 1e-5
    assert near.mean() < 0.01


@pytest.mark.parametrize("hw", [(480, 854), (300, 200), (224, 227), (224, 224)])
def test_vbench_clip_and_dino_transforms(hw):
    img = u8((2, 3, *hw), seed=2)
    clip = clip_preprocess_vbench(img)
    dino = dino_preprocess_vbench(img)
    assert clip.shape == (2, 3, 224, 224) and clip.dtype == torch.float32
    h, w = (224, int(224 * hw[1] / hw[0])) if hw[0] <= hw[1] else (int(224 * hw[0] / hw[1]), 224)
    assert dino.shape == (2, 3, h, w)                                 # no crop: DINO sees the whole frame
    close_up_to_rounding(clip, np_vbench(img, 224, "bicubic", crop=True), CLIP_STD)
    close_up_to_rounding(dino, np_vbench(img, 224, "bilinear", crop=False), IMAGENET_STD)


def test_centre_crop_offsets_differ_between_references():
    """224 x 227 needs no resize: transformers crops columns 1..224 (floor), torchvision 2..225 (round)."""
    img = u8((1, 3, 224, 227), seed=3)
    x = img.float() / 255
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert torch.allclose(clip_preprocess_hf(img), ((x - mean) / std)[..., 1:225], atol=1e-6)
    assert torch.allclose(clip_preprocess_vbench(img), ((x - mean) / std)[..., 2:226], atol=1e-6)


def test_to_uint8_inverts_reading():
    from minivid.video import from_uint8

    img = u8((2, 3, 8, 8))
    assert torch.equal(to_uint8(from_uint8(img.permute(0, 2, 3, 1).numpy())), img)
    assert to_uint8(img) is img
    with pytest.raises(ValueError, match=r"\[F, 3, H, W\]"):
        to_uint8(torch.zeros(3, 8, 8))


# ---------------------------------------------------------------- metric formulas

def test_consistency_of_identical_frames_is_one():
    e = torch.randn(1, 16).expand(5, 16)
    assert clip_frame_consistency(e, "consecutive")[0] == pytest.approx(1.0, abs=1e-6)
    assert clip_frame_consistency(e, "all")[0] == pytest.approx(1.0, abs=1e-6)
    assert subject_consistency(e)[0] == pytest.approx(1.0, abs=1e-6)


def test_frame_consistency_pairs():
    basis = torch.eye(4)
    e = torch.stack([basis[0], basis[0] + basis[1], basis[1], basis[2]])
    value, pairs = clip_frame_consistency(e, "consecutive")
    s = 2 ** -0.5
    assert pairs == pytest.approx([s, s, 0.0]) and value == pytest.approx(2 * s / 3)
    x = torch.randn(6, 8)
    sim = F.normalize(x, dim=-1) @ F.normalize(x, dim=-1).T
    off_diagonal = (sim.sum() - sim.diagonal().sum()) / (6 * 5)      # LOVEU-TGVE's script: off-diagonal mean
    assert clip_frame_consistency(x, "all")[0] == pytest.approx(off_diagonal.item(), abs=1e-6)
    assert len(clip_frame_consistency(x, "all")[1]) == 15
    with pytest.raises(ValueError, match="at least 2"):
        clip_frame_consistency(x[:1])
    with pytest.raises(ValueError, match="pairs"):
        clip_frame_consistency(x, "random")


def test_subject_consistency_is_vbench_formula():
    """Frames e, -e, e: frame 1 has cos -1 to both neighbours (clamped to 0); frame 2 has cos -1 to
    frame 1 (0) and 1 to frame 0 -> terms (0 + 0)/2, (0 + 1)/2 -> 0.25."""
    e = torch.randn(1, 8)
    value, terms = subject_consistency(torch.cat([e, -e, e]))
    assert terms == pytest.approx([0.0, 0.5], abs=1e-6) and value == pytest.approx(0.25, abs=1e-6)
    x = torch.randn(5, 8)
    n = F.normalize(x, dim=-1)
    want = sum((max(0.0, float(n[i] @ n[i - 1])) + max(0.0, float(n[i] @ n[0]))) / 2 for i in range(1, 5)) / 4
    assert subject_consistency(x)[0] == pytest.approx(want, abs=1e-6)


def test_text_alignment_and_aesthetic_quality():
    t = torch.randn(8)
    image = torch.stack([2 * t, -t, t + 0.0])
    value, per_frame = clip_text_alignment(image, t)
    assert per_frame == pytest.approx([1.0, -1.0, 1.0], abs=1e-6) and value == pytest.approx(1 / 3, abs=1e-6)
    with pytest.raises(ValueError, match="dims"):
        clip_text_alignment(image, torch.randn(4))
    assert aesthetic_quality(torch.tensor([5.0, 7.0]))[0] == pytest.approx(0.6)


def test_evaluator_on_tiny_encoders_matches_the_parts():
    """The Evaluator's numbers are the formulas on each encoder's output with its own preprocessing."""
    from minivid.eval.loading import tiny_evaluator

    ev = tiny_evaluator()
    frames = u8((4, 3, 40, 56), seed=4)
    out = ev(frames, "a red car")
    with torch.no_grad():
        image = ev.clip.encode_image(clip_preprocess_hf(frames, 32))
        text = ev.clip.encode_text(CLIPTokenizer(pad="end")(["a red car"]))[0]
        dino = ev.dino(dino_preprocess_vbench(frames, 32))
        scores = ev.aesthetic(ev.aesthetic_clip.encode_image(clip_preprocess_vbench(frames, 32)))
    assert out["clip_text_alignment"]["value"] == pytest.approx(clip_text_alignment(image, text)[0], abs=1e-6)
    assert out["clip_frame_consistency"]["value"] == pytest.approx(clip_frame_consistency(image)[0], abs=1e-6)
    assert out["clip_frame_consistency"]["all_pairs"] == pytest.approx(clip_frame_consistency(image, "all")[0], abs=1e-6)
    assert out["subject_consistency"]["value"] == pytest.approx(subject_consistency(dino)[0], abs=1e-6)
    assert out["aesthetic_quality"]["value"] == pytest.approx(aesthetic_quality(scores)[0], abs=1e-6)
    assert set(ev(frames)) == {"clip_frame_consistency", "subject_consistency", "aesthetic_quality"}   # no prompt
    with pytest.raises(ValueError, match="768-dim"):
        Evaluator(clip=ev.clip, aesthetic=AestheticPredictor(), aesthetic_clip=ev.clip)
    with pytest.raises(ValueError, match="ViT-L/14"):                 # OpenCLIP is not the predictor's input
        Evaluator(aesthetic=ev.aesthetic, aesthetic_clip=build_clip("tiny_openclip"))


# ---------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-encoders")
    assert main(["eval", "--write-tiny", str(folder)]) == 0
    from minivid.eval.loading import TINY_FILES

    return {k: folder / v for k, v in TINY_FILES.items()}


def eval_args(video, files, *rest):
    return ["eval", str(video), "--clip", str(files["clip"]), "--dino", str(files["dino"]),
            "--aesthetic", str(files["aesthetic"]), "--quiet", *rest]


def test_eval_cli_end_to_end_on_tiny_encoder_files(tmp_path, tiny_files, capsys):
    g = torch.Generator().manual_seed(5)
    moving = torch.rand(5, 3, 48, 64, generator=g) * 2 - 1
    still = moving[:1].expand(5, -1, -1, -1)
    write_video(tmp_path / "moving.mp4", moving, fps=4)
    (tmp_path / "still").mkdir()
    for i in range(5):                                        # a folder of identical PNG frames: lossless
        from minivid.video import save_grid
        save_grid(tmp_path / "still" / f"{i}.png", still[:1])
    out = tmp_path / "m.json"
    assert main(eval_args(tmp_path / "moving.mp4", tiny_files, "--prompt", "a red car", "--source",
                          str(tmp_path / "still"), "--json", str(out))) == 0
    text = capsys.readouterr().out
    for name in ("clip_text_alignment", "clip_frame_consistency", "subject_consistency", "aesthetic_quality", "source"):
        assert name in text
    res = json.loads(out.read_text())
    assert res["frames"] == 5 and res["size"] == [48, 64] and res["prompt"] == "a red car"
    m, s = res["metrics"], res["source"]["metrics"]
    assert set(m) == set(s) == {"clip_text_alignment", "clip_frame_consistency", "subject_consistency", "aesthetic_quality"}
    for key in ("clip_frame_consistency", "subject_consistency"):            # identical frames: exactly consistent
        assert s[key]["value"] == pytest.approx(1.0, abs=1e-5)
        assert m[key]["value"] < 1.0 - 1e-4
    assert len(m["clip_text_alignment"]["per_frame"]) == 5 and len(m["subject_consistency"]["per_frame"]) == 4
    assert m["clip_text_alignment"]["encoder"] == "tiny_openai"

    # the same numbers from the library on the same files
    from minivid.eval.loading import load_evaluator
    from minivid.video import read_video
    ev = load_evaluator(tiny_files, ("clip_text_alignment", "clip_frame_consistency", "subject_consistency",
                                     "aesthetic_quality"))
    direct = ev(read_video(tmp_path / "moving.mp4"), "a red car")
    for key in m:
        assert m[key]["value"] == pytest.approx(direct[key]["value"], abs=1e-7)

    # OpenCLIP layout through --clip, CLIP metrics only
    assert main(["eval", str(tmp_path / "moving.mp4"), "--clip", str(tiny_files["openclip"]), "--prompt", "x",
                 "--metrics", "clip_text_alignment,clip_frame_consistency", "--json", str(tmp_path / "o.json")]) == 0
    assert json.loads((tmp_path / "o.json").read_text())["metrics"]["clip_text_alignment"]["encoder"] == "tiny_openclip"


def test_eval_cli_tiny_flag(tmp_path, capsys):
    write_video(tmp_path / "v.mp4", torch.rand(3, 3, 32, 32) * 2 - 1, fps=4)
    assert main(["eval", str(tmp_path / "v.mp4", ), "--tiny", "--prompt", "x", "--json", str(tmp_path / "t.json")]) == 0
    assert "numbers mean nothing" in capsys.readouterr().out
    assert json.loads((tmp_path / "t.json").read_text())["tiny"] is True


def test_eval_cli_missing_weights_names_files_and_sources(tmp_path, monkeypatch, capsys):
    write_video(tmp_path / "v.mp4", torch.rand(3, 3, 32, 32) * 2 - 1, fps=4)
    monkeypatch.chdir(tmp_path)                                   # no weights/ here
    assert main(["eval", "v.mp4", "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "no metric can run" in err and "--tiny" in err     # none asked for: none present
    for name, source in (("weights/clip-vit-large-patch14.safetensors", "openai/clip-vit-large-patch14"),
                         ("weights/dino_vitbase16_pretrain.pth", "dl.fbaipublicfiles.com/dino"),
                         ("weights/sa_0_4_vit_l_14_linear.pth", "LAION-AI/aesthetic-predictor")):
        assert name in err and source in err
    assert main(["eval", "v.mp4", "--metrics", "subject_consistency"]) == 1
    err = capsys.readouterr().err
    assert "dino_vitbase16_pretrain.pth" in err and "clip-vit-large" not in err and "asked" in err


def test_eval_cli_errors(tmp_path, tiny_files, capsys):
    write_video(tmp_path / "v.mp4", torch.rand(3, 3, 32, 32) * 2 - 1, fps=4)
    video = tmp_path / "v.mp4"
    assert main(eval_args(video, {**tiny_files, "clip": tiny_files["dino"]})) == 1        # a DINO file as --clip
    assert "not a whole CLIP model" in capsys.readouterr().err
    assert main(eval_args(video, {**tiny_files, "dino": tiny_files["aesthetic"]})) == 1
    assert "not DINO ViT-B/16" in capsys.readouterr().err
    with pytest.raises(EncoderError, match=r"missing \(150\): cls_token"):      # listed against the official layout
        load_dino(tiny_files["aesthetic"])
    assert main(eval_args(video, {**tiny_files, "clip": tiny_files["openclip"]})) == 1    # aesthetic needs ViT-L/14
    assert "ViT-L/14" in capsys.readouterr().err
    assert main(eval_args(video, tiny_files, "--metrics", "fvd")) == 1
    assert "unknown fvd" in capsys.readouterr().err
    assert main(eval_args(video, tiny_files, "--json", str(video))) == 1                   # never onto an input
    assert "input" in capsys.readouterr().err and video.stat().st_size > 0
    assert main(eval_args(tmp_path / "missing.mp4", tiny_files)) == 1
    assert "no such file" in capsys.readouterr().err


def test_edit_eval_appends_metrics_to_the_record(tmp_path, tiny_files):
    video = tmp_path / "in.mp4"
    write_video(video, torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(6)) * 2 - 1, fps=4)
    out = tmp_path / "out"
    assert main(["edit", "--method", "cove", "--tiny", "--video", str(video), "--frames", "3", "--prompt", "a green disc",
                 "--steps", "1", "--cove-inversion-steps", "1", "--eval", "--out", str(out)]) == 0
    record = json.loads((out / "record.json").read_text())
    ev = record["results"]["eval"]
    assert ev["frames"] == 3 and ev["source"]["frames"] == 3 and ev["prompt"] == "a green disc" and ev["tiny"]
    # --tiny: every metric, PickScore included, but the two whose tiny networks need larger frames
    assert set(ev["metrics"]) == set(METRICS) - set(RUN_WHEN_PRESENT)
    assert record["timings_s"]["eval"] > 0 and record["results"]["cove"]["steps"] == 1


def test_edit_eval_checks_weights_before_editing(tmp_path, monkeypatch, capsys):
    video = tmp_path / "in.mp4"
    write_video(video, torch.rand(3, 3, 32, 32) * 2 - 1, fps=4)
    monkeypatch.chdir(tmp_path)
    assert main(["edit", "--method", "cove", "--weights", "nothing.ckpt", "--video", str(video), "--prompt", "x",
                 "--eval", "--eval-metrics", "subject_consistency", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "dino_vitbase16_pretrain.pth" in err and "--eval-metrics" in err
    assert not (tmp_path / "o" / "record.json").exists()
