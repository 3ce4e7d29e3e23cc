"""Original (ldm/sgm) names <-> diffusers names: one readable table per component.

minivid's modules carry the ORIGINAL checkpoint names, so an official single file loads
directly. A diffusers folder (unet/, vae/, text_encoder/ ...) names the same tensors
differently; this module renames them, in both directions, from one table per component:

    component    original (relative to the component prefix)        diffusers (file names)
    "unet"       input_blocks.1.0.in_layers.0           <->  down_blocks.0.resnets.0.norm1
    "vae"        encoder.mid.attn_1.q   (1x1 conv)      <->  encoder.mid_block.attentions.0.to_q (Linear)
    "text_sd1"   text_model.*  (HF names on both sides)  <->  text_model.*
    "text_sd2"   transformer.resblocks.3.attn           <->  text_model.encoder.layers.3.self_attn
                 (fused in_proj_weight [3D, D])              (q_proj, k_proj, v_proj [D, D] each)

Original keys are relative to the component prefix of the original file (`model.diffusion_model.`,
`first_stage_model.`, SD 1.x text `cond_stage_model.transformer.`, SD 2.x text `cond_stage_model.model.`;
see `minivid.weights.SD_PREFIXES`), i.e. the names of minivid's modules; diffusers keys are exactly
as stored in the diffusers files. The text encoder's start with `text_model.` in files written by
transformers < 5 (and by diffusers' converters, which is what this module writes); transformers 5
saves them without that level. Both text tables read both forms.

A table is a list of `Rule(original, diffusers, kind)` between MODULE paths; a tensor name
is renamed by its longest listed module prefix, so `input_blocks.1.1` <-> `down_blocks.0.attentions.0`
carries every tensor of that SpatialTransformer (whose inner names are the same on both sides).
A name matched by no rule is an error, never passed through. `kind` says how the tensors change:

    "same"     unchanged
    "conv1x1"  original 1x1 conv weight [C, C, 1, 1] <-> diffusers Linear weight [C, C]
    "qkv"      original fused in_proj_weight/in_proj_bias [3D, ...] <-> q_proj/k_proj/v_proj [D, ...]
    "transpose" original bare matrix [A, B] <-> diffusers Linear weight [B, A]

A rule whose `diffusers` (or `original`) side is None lists tensors that exist in one format
only; they are dropped on the way, and `original_only(...)` says which they are.

The tables are derived from the architecture, with its layout (number of levels, res-blocks
per level, which levels carry attention) as arguments, so they hold for tiny test models as
for the official sizes; left out, the layout is read from the keys. Adding a component (the
SVD UNet, temporal VAE, image encoder) is adding a table function to `TABLES`.

Facts checked against diffusers' own single-file converters (tests/test_diffusers_names.py):
- the SD 2.x text encoder of a diffusers folder has 23 layers: SD 2 conditions on the
  penultimate of OpenCLIP's 24 resblocks followed by ln_final, which is diffusers' last hidden
  state. The 24th resblock, `text_projection` and `logit_scale` have no diffusers counterpart.
  So a minivid SD 2 text model loaded from an original file holds 24 resblocks (runs 23),
  and one loaded from a diffusers folder holds 23 (runs all): both compute the same output.
- UNet proj_in/proj_out are 1x1 convs in SD 1.x and Linear in SD 2.x, on both sides
  (diffusers `use_linear_projection`), so the UNet table changes no shape.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, ClassVar, Collection, Literal, Mapping

import torch

from .files import WeightsError

__all__ = [
    "Rule", "UNetLayout", "VAELayout", "TextSD2Layout", "ComponentTable", "TABLES",
    "unet_rules", "unet_resblock", "unet_transformer", "UNET_HEAD", "vae_rules", "text_sd1_rules", "text_sd2_rules",
    "original_to_diffusers", "diffusers_to_original", "original_only", "diffusers_only", "layout_of",
    "Naming", "Kind", "key_indices", "pair_rules", "vae_attention_rules",
]

Naming = Literal["original", "diffusers"]
Kind = Literal["same", "conv1x1", "qkv", "transpose"]


@dataclass(frozen=True)
class Rule:
    """One module (or bare parameter) known under two names."""

    original: str | None   # path in the original file; None: diffusers-only
    diffusers: str | None  # path in the diffusers file; None: original-only
    kind: Kind = "same"
    alias: bool = False    # another diffusers spelling (older, or transformers 5's): read, never written


# ------------------------------------------------------------------------------------ UNet


@dataclass(frozen=True)
class UNetLayout:
    """What the names of an ldm UNetModel depend on (SD 1.x/2.x: the defaults)."""

    levels: int = 4                                # len(channel_mult)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels whose res-blocks are followed by a SpatialTransformer
    what: ClassVar[str] = "UNet"                   # in error messages (SVD's layout says "SVD UNet")

    @classmethod
    def from_keys(cls, keys: Collection[str], naming: Naming) -> "UNetLayout":
        """The layout of a UNet whose tensor names are `keys`, in `naming`; the same for sgm's VideoUNet,
        whose input/output blocks are numbered like ldm's."""
        if naming == "original":
            ops = key_indices(keys, r"input_blocks\.(\d+)\.0\.op\.")
            n_input = max(key_indices(keys, r"input_blocks\.(\d+)\."), default=-1) + 1
            levels = len(ops) + 1
            res, rem = divmod(n_input, levels)
            if n_input == 0 or rem or res < 2:
                raise WeightsError(f"cannot read the {cls.what} layout from these keys: {n_input} input_blocks and "
                                   f"{len(ops)} downsamplers do not make levels x (res blocks + 1).")
            res -= 1
            first = [1 + level * (res + 1) for level in range(levels)]
            att = tuple(lv for lv in range(levels)
                        if any(k.startswith(f"input_blocks.{first[lv] + j}.1.") for k in keys for j in range(res)))
            return cls(levels, res, att)
        levels = max(key_indices(keys, r"down_blocks\.(\d+)\."), default=-1) + 1
        res = max(key_indices(keys, r"down_blocks\.\d+\.resnets\.(\d+)\."), default=-1) + 1
        if levels == 0 or res == 0:
            raise WeightsError(f"cannot read the {cls.what} layout from these keys: no down_blocks.N.resnets.M found.")
        att = tuple(lv for lv in range(levels) if any(k.startswith(f"down_blocks.{lv}.attentions.") for k in keys))
        return cls(levels, res, att)


# ldm ResBlock leaves -> diffusers ResnetBlock2D leaves
UNET_RESNET = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
]


def pair_rules(original: str, diffusers: str, leaves: list[tuple[str, str]]) -> list[Rule]:
    """One "same" rule per (original leaf, diffusers leaf) under the modules `original` <-> `diffusers`."""
    return [Rule(f"{original}.{o}", f"{diffusers}.{d}") for o, d in leaves]


def unet_resblock(original: str, diffusers: str) -> list[Rule]:
    """An ldm ResBlock <-> a diffusers ResnetBlock2D."""
    return pair_rules(original, diffusers, UNET_RESNET)


def unet_transformer(original: str, diffusers: str) -> list[Rule]:
    """An ldm SpatialTransformer <-> a diffusers Transformer2DModel (same inner names)."""
    return [Rule(original, diffusers)]


UNET_HEAD = [
    Rule("time_embed.0", "time_embedding.linear_1"),
    Rule("time_embed.2", "time_embedding.linear_2"),
    Rule("input_blocks.0.0", "conv_in"),
    Rule("out.0", "conv_norm_out"),
    Rule("out.2", "conv_out"),
]


def unet_rules(
    layout: UNetLayout = UNetLayout(),
    resblock: Callable[[str, str], list[Rule]] = unet_resblock,
    transformer: Callable[[str, str], list[Rule]] = unet_transformer,
    head: list[Rule] = UNET_HEAD,
) -> list[Rule]:
    """The SD UNet: ldm `UNetModel` <-> diffusers `UNet2DConditionModel`.

    The block numbering is shared with SVD's UNet, which passes its own `resblock` /
    `transformer` rules and `head` (svd_names.svd_unet_rules).
    """
    L, R, att = layout.levels, layout.num_res_blocks, set(layout.attention_levels)
    rules = list(head)
    # encoder: input_blocks 1.. = per level R x (ResBlock [+ SpatialTransformer]), then a downsampler
    for level in range(L):
        first = 1 + level * (R + 1)
        for j in range(R):
            rules += resblock(f"input_blocks.{first + j}.0", f"down_blocks.{level}.resnets.{j}")
            if level in att:
                rules += transformer(f"input_blocks.{first + j}.1", f"down_blocks.{level}.attentions.{j}")
        if level < L - 1:
            rules.append(Rule(f"input_blocks.{first + R}.0.op", f"down_blocks.{level}.downsamplers.0.conv"))
    # middle: ResBlock, SpatialTransformer, ResBlock
    rules += resblock("middle_block.0", "mid_block.resnets.0")
    rules += transformer("middle_block.1", "mid_block.attentions.0")
    rules += resblock("middle_block.2", "mid_block.resnets.1")
    # decoder: up level u (u = 0 deepest) = R + 1 x (ResBlock [+ SpatialTransformer]), the last with an upsampler
    for up in range(L):
        level = L - 1 - up
        for j in range(R + 1):
            i = up * (R + 1) + j
            rules += resblock(f"output_blocks.{i}.0", f"up_blocks.{up}.resnets.{j}")
            if level in att:
                rules += transformer(f"output_blocks.{i}.1", f"up_blocks.{up}.attentions.{j}")
            if j == R and up < L - 1:
                slot = 2 if level in att else 1
                rules.append(Rule(f"output_blocks.{i}.{slot}.conv", f"up_blocks.{up}.upsamplers.0.conv"))
    return rules


# ------------------------------------------------------------------------------------ VAE


@dataclass(frozen=True)
class VAELayout:
    """What the names of an ldm AutoencoderKL depend on (SD: the defaults)."""

    levels: int = 4          # len(ch_mult)
    num_res_blocks: int = 2  # per encoder level; the decoder has one more

    @classmethod
    def from_keys(cls, keys: Collection[str], naming: Naming) -> "VAELayout":
        if naming == "original":
            levels = max(key_indices(keys, r"encoder\.down\.(\d+)\."), default=-1) + 1
            res = max(key_indices(keys, r"encoder\.down\.\d+\.block\.(\d+)\."), default=-1) + 1
        else:
            levels = max(key_indices(keys, r"encoder\.down_blocks\.(\d+)\."), default=-1) + 1
            res = max(key_indices(keys, r"encoder\.down_blocks\.\d+\.resnets\.(\d+)\."), default=-1) + 1
        if levels == 0 or res == 0:
            raise WeightsError("cannot read the VAE layout from these keys: no encoder down blocks found.")
        return cls(levels, res)


VAE_RESNET = [("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
              ("nin_shortcut", "conv_shortcut")]


def vae_attention_rules(original: str, diffusers: str) -> list[Rule]:
    """ldm AttnBlock (1x1 convs) <-> diffusers Attention (Linear); older diffusers files say query/key/value/proj_attn."""
    rules = [
        Rule(f"{original}.norm", f"{diffusers}.group_norm"),
        Rule(f"{original}.q", f"{diffusers}.to_q", "conv1x1"),
        Rule(f"{original}.k", f"{diffusers}.to_k", "conv1x1"),
        Rule(f"{original}.v", f"{diffusers}.to_v", "conv1x1"),
        Rule(f"{original}.proj_out", f"{diffusers}.to_out.0", "conv1x1"),
    ]
    old = [("q", "query"), ("k", "key"), ("v", "value"), ("proj_out", "proj_attn")]
    return rules + [Rule(f"{original}.{o}", f"{diffusers}.{d}", "conv1x1", alias=True) for o, d in old]


def vae_rules(layout: VAELayout = VAELayout()) -> list[Rule]:
    """The SD VAE: ldm `AutoencoderKL` <-> diffusers `AutoencoderKL`."""
    L, R = layout.levels, layout.num_res_blocks
    rules = [Rule("quant_conv", "quant_conv"), Rule("post_quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        rules += [
            Rule(f"{part}.conv_in", f"{part}.conv_in"),
            Rule(f"{part}.norm_out", f"{part}.conv_norm_out"),
            Rule(f"{part}.conv_out", f"{part}.conv_out"),
        ]
        rules += pair_rules(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", VAE_RESNET)
        rules += vae_attention_rules(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0")
        rules += pair_rules(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", VAE_RESNET)
    for i in range(L):
        for j in range(R):
            rules += pair_rules(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", VAE_RESNET)
        if i < L - 1:
            rules.append(Rule(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"))
    # the decoder's `up` list is indexed from the highest resolution; diffusers' up_blocks from the lowest
    for i in range(L):
        u = L - 1 - i
        for j in range(R + 1):
            rules += pair_rules(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{u}.resnets.{j}", VAE_RESNET)
        if i > 0:
            rules.append(Rule(f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{u}.upsamplers.0.conv"))
    return rules


# ------------------------------------------------------------------------------------ text encoders


def _without_text_model_level(rules: list[Rule]) -> list[Rule]:
    """`rules` plus, for every diffusers name under `text_model.`, the same name without that level
    (transformers 5's CLIPTextModel files), read as an alias."""
    prefix = "text_model."
    return rules + [Rule(r.original, r.diffusers.removeprefix(prefix), r.kind, alias=True)
                    for r in rules if r.diffusers is not None and r.diffusers.startswith(prefix)]


HF_TEXT_PARTS = ("embeddings", "encoder", "final_layer_norm")


def text_sd1_rules(layout: None = None) -> list[Rule]:
    """SD 1.x CLIP ViT-L/14 text: Hugging Face names on both sides (the file's prefix
    `cond_stage_model.transformer.` stripped); the table still refuses any other name."""
    return _without_text_model_level([Rule(f"text_model.{part}", f"text_model.{part}") for part in HF_TEXT_PARTS])


@dataclass(frozen=True)
class TextSD2Layout:
    """SD 2.x OpenCLIP ViT-H/14 text encoder.

    `layers`: transformer layers SD 2 runs (23: all but the last of the 24 resblocks stored in
    the original file, "penultimate"); the diffusers model holds exactly these. Original
    resblocks with an index >= layers have no diffusers counterpart.
    """

    layers: int = 23

    @classmethod
    def from_keys(cls, keys: Collection[str], naming: Naming) -> "TextSD2Layout":
        if naming == "diffusers":
            n = max(key_indices(keys, r"(?:text_model\.)?encoder\.layers\.(\d+)\."), default=-1) + 1
            return cls(n) if n else cls()
        return cls()


OPENCLIP_LAYER = [
    ("ln_1", "layer_norm1", "same"),
    ("attn", "self_attn", "qkv"),
    ("ln_2", "layer_norm2", "same"),
    ("mlp.c_fc", "mlp.fc1", "same"),
    ("mlp.c_proj", "mlp.fc2", "same"),
]


def text_sd2_rules(layout: TextSD2Layout = TextSD2Layout()) -> list[Rule]:
    """SD 2.x text: OpenCLIP names (fused in_proj) <-> Hugging Face CLIPTextModel names (q/k/v)."""
    rules = [
        Rule("token_embedding", "text_model.embeddings.token_embedding"),
        Rule("positional_embedding", "text_model.embeddings.position_embedding.weight"),
        Rule("ln_final", "text_model.final_layer_norm"),
        # original-only: the 24th resblock (SD 2 stops at the penultimate), the CLIP contrastive head
        Rule("text_projection", None),
        Rule("logit_scale", None),
        # diffusers-only: the position-id buffer older transformers versions saved
        Rule(None, "text_model.embeddings.position_ids"),
    ]
    for i in range(layout.layers):
        rules += [Rule(f"transformer.resblocks.{i}.{o}", f"text_model.encoder.layers.{i}.{d}", kind)
                  for o, d, kind in OPENCLIP_LAYER]
    return _without_text_model_level(rules)


# ------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class ComponentTable:
    """A component's rename table: `rules(layout)`, and how to read the layout from keys."""

    rules: Callable[..., list[Rule]]
    layout: Callable[[Collection[str], Naming], object] | None = None  # None: the table needs no layout
    extra_original: Callable[[Collection[str], object], list[str]] | None = None


def _text_sd2_extra(keys: Collection[str], layout: TextSD2Layout) -> list[str]:
    """Original resblocks beyond the layers SD 2 runs: original-only."""
    stored = max(key_indices(keys, r"transformer\.resblocks\.(\d+)\."), default=-1) + 1
    if 0 < stored < layout.layers:
        raise WeightsError(
            f"this SD 2 text state dict stores {stored} resblocks but the layout says SD 2 runs {layout.layers}; "
            f"for a model of another depth pass layout=TextSD2Layout(layers=N) with N = the layers it runs.")
    return [k for k in keys if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k)) and int(m[1]) >= layout.layers]


TABLES: dict[str, ComponentTable] = {
    "unet": ComponentTable(unet_rules, UNetLayout.from_keys),
    "vae": ComponentTable(vae_rules, VAELayout.from_keys),
    "text_sd1": ComponentTable(text_sd1_rules),
    "text_sd2": ComponentTable(text_sd2_rules, TextSD2Layout.from_keys, _text_sd2_extra),
    # SVD ("svd_unet", "svd_vae", "svd_image_encoder") adds its tables here.
}


def _table(component: str) -> ComponentTable:
    if component not in TABLES:
        raise WeightsError(f"no rename table for component {component!r}; known: {', '.join(TABLES)}.")
    return TABLES[component]


def layout_of(component: str, keys: Collection[str], naming: Naming):
    """The layout a component's table needs, read from its keys (None for tables without one)."""
    table = _table(component)
    return table.layout(keys, naming) if table.layout else None


def _rules(component: str, keys: Collection[str], naming: Naming, layout) -> list[Rule]:
    table = _table(component)
    if table.layout is None:
        return table.rules()
    return table.rules(layout if layout is not None else table.layout(keys, naming))


def key_indices(keys: Collection[str], pattern: str) -> set[int]:
    """The integers that group 1 of `pattern` matches at the start of `keys` (block numbers, layer numbers)."""
    rx = re.compile(pattern)
    return {int(m[1]) for k in keys if (m := rx.match(k))}


def _lookup(table: Mapping[str, Rule], key: str) -> tuple[Rule | None, str, str]:
    """Longest listed module path that `key` starts with: (rule, matched path, rest of the key)."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        path = ".".join(parts[:n])
        if path in table:
            return table[path], path, key[len(path):]
    return None, "", key


def _convert(state_dict: Mapping[str, torch.Tensor], rules: list[Rule], to: Naming,
             component: str, drop: Collection[str] = ()) -> dict[str, torch.Tensor]:
    src: Naming = "original" if to == "diffusers" else "diffusers"
    table = {getattr(r, src): r for r in rules if getattr(r, src) is not None and not (r.alias and src == "original")}
    out: dict[str, torch.Tensor] = {}
    unmatched: list[str] = []
    parts: dict[str, dict[str, torch.Tensor]] = {}  # fused original name -> {"q": .., "k": .., "v": ..}
    for key, t in state_dict.items():
        if key in drop:
            continue
        rule, _, rest = _lookup(table, key)
        if rule is None:
            unmatched.append(key)
            continue
        target = getattr(rule, to)
        if target is None:
            continue  # a tensor the other format does not have (listed in the table)
        if rule.kind == "conv1x1" and rest == ".weight":
            t = t.reshape(t.shape[:2]) if to == "diffusers" else t.reshape(*t.shape, 1, 1)
        elif rule.kind == "transpose" and to == "diffusers" and rest == "":
            t, rest = t.t().contiguous(), ".weight"
        elif rule.kind == "transpose" and to == "original" and rest == ".weight":
            t, rest = t.t().contiguous(), ""
        elif rule.kind == "qkv" and to == "diffusers" and rest in (".in_proj_weight", ".in_proj_bias"):
            leaf = rest.removeprefix(".in_proj_")
            for name, chunk in zip("qkv", t.chunk(3, dim=0)):
                out[f"{target}.{name}_proj.{leaf}"] = chunk.clone()  # own storage: safetensors refuses shared views
            continue
        elif rule.kind == "qkv" and to == "original" and (m := re.fullmatch(r"\.([qkv])_proj\.(weight|bias)", rest)):
            parts.setdefault(f"{target}.in_proj_{m[2]}", {})[m[1]] = t
            continue
        out[target + rest] = t
    for name, qkv in parts.items():
        if set(qkv) != {"q", "k", "v"}:
            unmatched.append(f"{name} (only {'/'.join(sorted(qkv))} of q/k/v present)")
            continue
        out[name] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    if unmatched:
        raise WeightsError(
            f"{len(unmatched)} tensor names of the {component} state dict are not in its {src}-names table "
            f"(first {min(10, len(unmatched))}: {', '.join(unmatched[:10])}). Expected {src} names relative to the "
            f"component (e.g. for the SD UNet 'input_blocks.1.0.in_layers.0.weight' / "
            f"'down_blocks.0.resnets.0.norm1.weight'); a different model or an unstripped prefix gives this error.")
    return out


def original_to_diffusers(component: str, state_dict: Mapping[str, torch.Tensor], layout=None) -> dict[str, torch.Tensor]:
    """Rename (and reshape) a component's original-format state dict to diffusers names.

    component: "unet", "vae", "text_sd1", "text_sd2" (and any table added to TABLES).
    Original-only tensors (SD 2's 24th text resblock, text_projection, logit_scale) are dropped.
    """
    keys = list(state_dict)
    table = _table(component)
    layout = layout if layout is not None or table.layout is None else table.layout(keys, "original")
    drop = table.extra_original(keys, layout) if table.extra_original else ()
    return _convert(state_dict, _rules(component, keys, "original", layout), "diffusers", component, drop)


def diffusers_to_original(component: str, state_dict: Mapping[str, torch.Tensor], layout=None) -> dict[str, torch.Tensor]:
    """Rename (and reshape) a component's diffusers state dict to original names (relative to the component prefix)."""
    keys = list(state_dict)
    return _convert(state_dict, _rules(component, keys, "diffusers", layout), "original", component)


def original_only(component: str, original_keys: Collection[str], layout=None) -> list[str]:
    """Names of the original state dict that the diffusers format does not have (dropped by conversion)."""
    table = _table(component)
    layout = layout if layout is not None or table.layout is None else table.layout(original_keys, "original")
    rules = _rules(component, original_keys, "original", layout)
    index = {r.original: r for r in rules if r.original is not None and not r.alias}
    extra = set(table.extra_original(original_keys, layout)) if table.extra_original else set()
    return sorted(k for k in original_keys if k in extra or (_lookup(index, k)[0] or Rule(k, k)).diffusers is None)


def diffusers_only(component: str, diffusers_keys: Collection[str], layout=None) -> list[str]:
    """Names of a diffusers state dict that the original format does not have (dropped by conversion)."""
    rules = _rules(component, diffusers_keys, "diffusers", layout)
    index = {r.diffusers: r for r in rules if r.diffusers is not None}
    return sorted(k for k in diffusers_keys if (_lookup(index, k)[0] or Rule(k, k)).original is None)
