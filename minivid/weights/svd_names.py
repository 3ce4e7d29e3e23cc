"""Stable Video Diffusion: original (sgm) names <-> diffusers names, one table per component.

Same structure and rules as diffusers_names.py (a `Rule` maps a module path, a tensor is renamed
by its longest listed prefix, an unlisted name is an error); importing this module registers
three tables in `diffusers_names.TABLES`, so `original_to_diffusers("svd_unet", ...)` works:

    component            original (relative to the prefix)                   diffusers
    "svd_unet"           model.diffusion_model.                                unet/ (UNetSpatioTemporalConditionModel)
      input_blocks.1.0.{in_layers.0, ..., skip_connection}              <->  down_blocks.0.resnets.0.spatial_res_block.{norm1, ...}
      input_blocks.1.0.time_stack.{in_layers.0, emb_layers.1, ...}      <->  down_blocks.0.resnets.0.temporal_res_block.{norm1, time_emb_proj, ...}
      input_blocks.1.0.time_mixer                                       <->  down_blocks.0.resnets.0.time_mixer
      input_blocks.1.1.time_stack.0 (VideoTransformerBlock)             <->  down_blocks.0.attentions.0.temporal_transformer_blocks.0
      input_blocks.1.1.time_pos_embed.{0, 2}                            <->  down_blocks.0.attentions.0.time_pos_embed.{linear_1, linear_2}
      label_emb.0.{0, 2}                                                <->  add_embedding.{linear_1, linear_2}
    "svd_vae"            first_stage_model.                                    vae/ (AutoencoderKLTemporalDecoder)
      decoder.up.0.block.0.{norm1, ..., time_stack.in_layers.0, ...}    <->  decoder.up_blocks.3.resnets.0.{spatial_res_block.norm1, ..., temporal_res_block.norm1, ...}
      decoder.up.0.block.0.mix_factor                                   <->  decoder.up_blocks.3.resnets.0.time_mixer.mix_factor
      decoder.conv_out.time_mix_conv                                    <->  decoder.time_conv_out
      (none)                                                            <->  quant_conv   diffusers-only, must be the identity
    "svd_image_encoder"  conditioner.embedders.0.open_clip.model.              image_encoder/ (transformers CLIPVisionModelWithProjection)
      visual.transformer.resblocks.N.attn (fused in_proj)               <->  vision_model.encoder.layers.N.self_attn.{q,k,v}_proj
      visual.proj [1280, 1024] (x @ proj)                               <->  visual_projection.weight [1024, 1280]
      token_embedding, positional_embedding, ln_final, text_projection, logit_scale: original-only
      (the OpenCLIP text tower's leftovers, unused by SVD)

The tables take the layout (levels, res blocks, attention levels, layers) as arguments or read
it from the keys, so they hold for tiny test models as for the official sizes.

Two facts the tables cannot express, handled by functions here:
- diffusers' AutoencoderKLTemporalDecoder has a `quant_conv` (1x1, 2·z -> 2·z) that sgm's
  first stage lacks. A diffusers folder converted from an official file carries the identity
  there; `check_identity_quant_conv` refuses any other value (it would change every latent),
  and `identity_quant_conv` writes it.
- The official single file also holds `conditioner.embedders.3.encoder.*`: a second, SD-style
  VAE (`AutoencoderKLModeOnly`, with quant convs and a decoder) that sgm's conditioner uses to
  encode the conditioning frame. diffusers encodes it with the first-stage encoder instead.
  `conditioning_encoder_difference` measures how far that copy is from the first-stage encoder
  (with its quant_conv folded into conv_out), so a loader can say whether both paths agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Collection, Mapping

import torch

from .diffusers_names import (OPENCLIP_LAYER, TABLES, UNET_HEAD, UNET_RESNET, VAE_RESNET, ComponentTable, Naming, Rule,
                              UNetLayout, key_indices, pair_rules, unet_rules, vae_attention_rules)
from .files import WeightsError

__all__ = [
    "SVD_PREFIXES", "SVD_KNOWN_EXTRAS", "SVDUNetLayout", "SVDVAELayout", "ImageEncoderLayout",
    "svd_unet_rules", "svd_vae_rules", "svd_image_encoder_rules", "SVD_TABLES",
    "check_identity_quant_conv", "identity_quant_conv", "conditioning_encoder_difference",
]

# Component prefixes of svd.safetensors / svd_xt.safetensors (sgm DiffusionEngine attribute names).
SVD_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "image_encoder": "conditioner.embedders.0.open_clip.model.",
}

# Tensors of the official files that minivid's model does not hold, and why (full names, fnmatch).
SVD_KNOWN_EXTRAS = {
    "conditioner.embedders.3.encoder.*": (
        "sgm's conditioning-frame encoder (AutoencoderKLModeOnly: an SD-style VAE with quant convs and "
        "an unused decoder); minivid, like diffusers, encodes the conditioning frame with the first-stage "
        "encoder; the loader compares the two (conditioning_encoder_difference)"),
}


# ------------------------------------------------------------------------------------ UNet


@dataclass(frozen=True)
class SVDUNetLayout(UNetLayout):
    """What the names of sgm's VideoUNet depend on (SVD: the defaults); its blocks are numbered like
    ldm's UNetModel's, so `from_keys` is UNetLayout's."""

    what: ClassVar[str] = "SVD UNet"


# sgm time_stack (openaimodel ResBlock, dims=3) leaves -> diffusers TemporalResnetBlock leaves
TEMPORAL_RESNET = [(f"time_stack.{o}", f"temporal_res_block.{d}") for o, d in UNET_RESNET if o != "skip_connection"]


def _video_resblock(original: str, diffusers: str) -> list[Rule]:
    """sgm VideoResBlock <-> diffusers SpatioTemporalResBlock."""
    spatial = [(o, f"spatial_res_block.{d}") for o, d in UNET_RESNET]
    return pair_rules(original, diffusers, spatial + TEMPORAL_RESNET + [("time_mixer", "time_mixer")])


def _video_transformer(original: str, diffusers: str) -> list[Rule]:
    """sgm SpatialVideoTransformer <-> diffusers TransformerSpatioTemporalModel (inner block names agree)."""
    leaves = [("norm", "norm"), ("proj_in", "proj_in"), ("transformer_blocks", "transformer_blocks"),
              ("proj_out", "proj_out"), ("time_stack", "temporal_transformer_blocks"),
              ("time_pos_embed.0", "time_pos_embed.linear_1"), ("time_pos_embed.2", "time_pos_embed.linear_2"),
              ("time_mixer", "time_mixer")]
    return pair_rules(original, diffusers, leaves)


SVD_UNET_HEAD = [
    *UNET_HEAD[:2],
    Rule("label_emb.0.0", "add_embedding.linear_1"),
    Rule("label_emb.0.2", "add_embedding.linear_2"),
    *UNET_HEAD[2:],
]


def svd_unet_rules(layout: SVDUNetLayout = SVDUNetLayout()) -> list[Rule]:
    """SVD's UNet: sgm `VideoUNet` <-> diffusers `UNetSpatioTemporalConditionModel`
    (SD's block numbering with video ResBlocks and spatio-temporal transformers)."""
    return unet_rules(layout, _video_resblock, _video_transformer, SVD_UNET_HEAD)


# ------------------------------------------------------------------------------------ VAE


@dataclass(frozen=True)
class SVDVAELayout:
    """What the names of SVD's first stage depend on (SVD: the defaults)."""

    levels: int = 4
    num_res_blocks: int = 2

    @classmethod
    def from_keys(cls, keys: Collection[str], naming: Naming) -> "SVDVAELayout":
        down = r"encoder\.down\.(\d+)\." if naming == "original" else r"encoder\.down_blocks\.(\d+)\."
        block = r"encoder\.down\.\d+\.block\.(\d+)\." if naming == "original" else r"encoder\.down_blocks\.\d+\.resnets\.(\d+)\."
        levels = max(key_indices(keys, down), default=-1) + 1
        res = max(key_indices(keys, block), default=-1) + 1
        if levels == 0 or res == 0:
            raise WeightsError("cannot read the SVD VAE layout from these keys: no encoder down blocks found.")
        return cls(levels, res)


def _vae_video_resblock(original: str, diffusers: str) -> list[Rule]:
    """sgm temporal_ae VideoResBlock <-> diffusers SpatioTemporalResBlock (no time embedding)."""
    spatial = [(o, f"spatial_res_block.{d}") for o, d in VAE_RESNET]
    temporal = [(f"time_stack.{o}", f"temporal_res_block.{d}") for o, d in UNET_RESNET
                if o not in ("skip_connection", "emb_layers.1")]
    return pair_rules(original, diffusers, spatial + temporal + [("mix_factor", "time_mixer.mix_factor")])


def svd_vae_rules(layout: SVDVAELayout = SVDVAELayout()) -> list[Rule]:
    """SVD's first stage: sgm AutoencodingEngine (Encoder + VideoDecoder) <-> diffusers AutoencoderKLTemporalDecoder."""
    L, R = layout.levels, layout.num_res_blocks
    rules = [
        Rule(None, "quant_conv"),  # diffusers-only; the identity (check_identity_quant_conv)
        Rule("encoder.conv_in", "encoder.conv_in"),
        Rule("encoder.norm_out", "encoder.conv_norm_out"),
        Rule("encoder.conv_out", "encoder.conv_out"),
        Rule("decoder.conv_in", "decoder.conv_in"),
        Rule("decoder.norm_out", "decoder.conv_norm_out"),
        Rule("decoder.conv_out", "decoder.conv_out"),
        Rule("decoder.conv_out.time_mix_conv", "decoder.time_conv_out"),
    ]
    rules += pair_rules("encoder.mid.block_1", "encoder.mid_block.resnets.0", VAE_RESNET)
    rules += vae_attention_rules("encoder.mid.attn_1", "encoder.mid_block.attentions.0")
    rules += pair_rules("encoder.mid.block_2", "encoder.mid_block.resnets.1", VAE_RESNET)
    rules += _vae_video_resblock("decoder.mid.block_1", "decoder.mid_block.resnets.0")
    rules += vae_attention_rules("decoder.mid.attn_1", "decoder.mid_block.attentions.0")
    rules += _vae_video_resblock("decoder.mid.block_2", "decoder.mid_block.resnets.1")
    for i in range(L):
        for j in range(R):
            rules += pair_rules(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", VAE_RESNET)
        if i < L - 1:
            rules.append(Rule(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"))
    for i in range(L):  # decoder.up is indexed from the highest resolution, diffusers' up_blocks from the lowest
        u = L - 1 - i
        for j in range(R + 1):
            rules += _vae_video_resblock(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{u}.resnets.{j}")
        if i > 0:
            rules.append(Rule(f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{u}.upsamplers.0.conv"))
    return rules


def check_identity_quant_conv(state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse a diffusers SVD VAE whose `quant_conv` is not the identity (sgm has no such layer)."""
    w, b = state_dict.get("quant_conv.weight"), state_dict.get("quant_conv.bias")
    if w is None or b is None:
        raise WeightsError(f"{source}: the SVD VAE state dict has no quant_conv.weight/bias; diffusers' "
                           f"AutoencoderKLTemporalDecoder always carries one (the identity).")
    n = w.shape[0]
    eye = torch.eye(n, dtype=torch.float32)[:, :, None, None]
    if tuple(w.shape) != (n, n, 1, 1) or not torch.equal(w.float(), eye) or not torch.equal(b.float(), torch.zeros(n)):
        dev = (w.float() - eye).abs().max().item() if tuple(w.shape) == (n, n, 1, 1) else float("nan")
        raise WeightsError(
            f"{source}: the SVD VAE's quant_conv is not the identity (max |W - I| = {dev:.3g}, max |b| = "
            f"{b.float().abs().max().item():.3g}). The original SVD first stage has no quant_conv, so this VAE "
            f"is not SVD's: minivid refuses to drop a layer that changes the latents.")


def identity_quant_conv(latent_channels: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The diffusers-only `quant_conv` of an SVD VAE, as the identity: {'quant_conv.weight', 'quant_conv.bias'}."""
    n = 2 * latent_channels
    return {"quant_conv.weight": torch.eye(n, dtype=dtype)[:, :, None, None].contiguous(),
            "quant_conv.bias": torch.zeros(n, dtype=dtype)}


def conditioning_encoder_difference(first_stage: Mapping[str, torch.Tensor],
                                    cond_vae: Mapping[str, torch.Tensor]) -> float:
    """Largest relative difference between sgm's conditioning-frame encoder and the first-stage encoder.

    first_stage: the `first_stage_model.` state dict (prefix stripped); cond_vae: the
    `conditioner.embedders.3.encoder.` one. The copy's quant_conv (1x1, [2z, 2z]) is folded into its
    encoder.conv_out (W' = Q·W, b' = Q·b + q) before comparing, since the first stage has none.
    Returns max |a − b| / max |b| over all encoder tensors (inf if the names or shapes differ).
    """
    ours = {k: v for k, v in first_stage.items() if k.startswith("encoder.")}
    theirs = {k: v.float() for k, v in cond_vae.items() if k.startswith("encoder.")}
    if set(ours) != set(theirs) or "quant_conv.weight" not in cond_vae:
        return float("inf")
    q = cond_vae["quant_conv.weight"].float()[:, :, 0, 0]
    theirs["encoder.conv_out.weight"] = torch.einsum("oi,ichw->ochw", q, theirs["encoder.conv_out.weight"])
    theirs["encoder.conv_out.bias"] = q @ theirs["encoder.conv_out.bias"] + cond_vae["quant_conv.bias"].float()
    worst = 0.0
    for k, v in ours.items():
        if tuple(v.shape) != tuple(theirs[k].shape):
            return float("inf")
        scale = max(v.float().abs().max().item(), 1e-12)
        worst = max(worst, (v.float() - theirs[k]).abs().max().item() / scale)
    return worst


# ------------------------------------------------------------------------------------ image encoder


@dataclass(frozen=True)
class ImageEncoderLayout:
    """The OpenCLIP ViT of SVD's conditioner (ViT-H/14: 32 layers)."""

    layers: int = 32

    @classmethod
    def from_keys(cls, keys: Collection[str], naming: Naming) -> "ImageEncoderLayout":
        rx = r"visual\.transformer\.resblocks\.(\d+)\." if naming == "original" else r"vision_model\.encoder\.layers\.(\d+)\."
        n = max(key_indices(keys, rx), default=-1) + 1
        if n == 0:
            raise WeightsError("cannot read the image encoder layout from these keys: no transformer layers found.")
        return cls(n)


def svd_image_encoder_rules(layout: ImageEncoderLayout = ImageEncoderLayout()) -> list[Rule]:
    """SVD's image encoder: OpenCLIP model (`visual.*` + text leftovers) <-> transformers CLIPVisionModelWithProjection."""
    rules = [
        Rule("visual.conv1", "vision_model.embeddings.patch_embedding"),
        Rule("visual.class_embedding", "vision_model.embeddings.class_embedding"),
        Rule("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
        Rule("visual.ln_pre", "vision_model.pre_layrnorm"),
        Rule("visual.ln_post", "vision_model.post_layernorm"),
        Rule("visual.proj", "visual_projection", "transpose"),
        # original-only: the OpenCLIP text tower's leftovers (sgm deletes its transformer blocks)
        Rule("token_embedding", None),
        Rule("positional_embedding", None),
        Rule("ln_final", None),
        Rule("text_projection", None),
        Rule("logit_scale", None),
        # diffusers-only: the position-id buffer older transformers versions saved
        Rule(None, "vision_model.embeddings.position_ids"),
    ]
    for i in range(layout.layers):
        rules += [Rule(f"visual.transformer.resblocks.{i}.{o}", f"vision_model.encoder.layers.{i}.{d}", kind)
                  for o, d, kind in OPENCLIP_LAYER]
    return rules


# ------------------------------------------------------------------------------------ registry

SVD_TABLES: dict[str, ComponentTable] = {
    "svd_unet": ComponentTable(svd_unet_rules, SVDUNetLayout.from_keys),
    "svd_vae": ComponentTable(svd_vae_rules, SVDVAELayout.from_keys),
    "svd_image_encoder": ComponentTable(svd_image_encoder_rules, ImageEncoderLayout.from_keys),
}
TABLES.update(SVD_TABLES)
