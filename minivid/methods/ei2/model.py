"""EI²'s inflated model (§4.1): SD 1.4's UNet on video latents, with FFAM and STAM in every
transformer block.

Inflation. The paper turns every spatial convolution into a "pseudo 3-D" one, "which allows video
data and latent to be processed in the same way as a batch of images". minivid runs the
unmodified UNet on the frames as one batch [(B·F), C, H, W] (frames contiguous per video, frame
index fastest): every 2-D convolution, GroupNorm, ResBlock and the cross-attention then act per
frame, and the frame count reaches the layers that mix frames (FFAM, STAM) through
`call_state(unet, frames=F)`. `EI2Model` wraps this for [B, C, F, H, W] latents.

Every BasicTransformerBlock changes in two places (Fig. 2c):
- its spatial self-attention `attn1` becomes FFAM (Eq. 10): `FFAMProcessor(r)` set on the
  existing layer, so SD's pre-trained W_q, W_k, W_v, W_L stay;
- a STAM (Eq. 9) is inserted after attn1's residual, before the cross-attention
  (FFAM → STAM → CA, the default); App. B.1's alternative, FFAM → CA → STAM, puts it after the
  cross-attention's residual (before the feed-forward).
The block is changed by swapping the class of the existing instance (the Tune-A-Video pattern of
`minivid.methods.tuneavideo`), so every original tensor keeps its name and the new ones appear
as `...transformer_blocks.0.stam.*`.

    unet = sd.unet
    inflate(unet, EI2Config(r=2))                        # in place, for good (what tuning needs)
    model = EI2Model(unet)                               # or EI2Model(unet, EI2Config(...)) to inflate here
    eps = model(latents, t, context)                     # latents [B, 4, F, h, w], context [B, 77, 768]

    with inflated(unet, EI2Config(r=2)) as model:        # scoped: the plain image UNet comes back on exit
        ...                                              # (`deflate(unet)` undoes a permanent inflation)
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import torch
import torch.nn as nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm

from minivid.attention import SPATIAL_SELF, Attention, attention_layers, call_state, name_layers, sdpa, set_processor
from minivid.methods.ei2.blocks import STAM, FFAMProcessor

__all__ = [
    "ORDERS", "EI2Config", "STAMBlockMixin", "stam_block_class", "inflate", "deflate", "inflated", "set_stam_order",
    "EI2Model",
    "trainable_patterns", "BUFFER_PATTERNS", "power_iteration",
]

Order = Literal["ffam-stam-ca", "ffam-ca-stam"]
ORDERS = ("ffam-stam-ca", "ffam-ca-stam")

# the power-iteration vectors of STAM's spectral norms: state a tuned model carries (minivid.tuning.select_buffers)
BUFFER_PATTERNS = ("*.stam.*._u", "*.stam.*._v")


@dataclass(frozen=True)
class EI2Config:
    """How the UNet is inflated.

    r: FFAM's pooling ratio for the other frames (§5.2: 2 or 4). order: where STAM sits
    ("ffam-stam-ca", the paper's; "ffam-ca-stam", App. B.1). ffam / stam: switch either change off
    (ablations; with both off the model is SD run per frame). ffam_backend: "auto" (Triton on CUDA,
    PyTorch elsewhere), "reference" or "triton". n_power_iterations: STAM's spectral-norm
    power-iteration steps per tuning step.
    """

    r: int = 2
    order: Order = "ffam-stam-ca"
    ffam: bool = True
    stam: bool = True
    ffam_backend: str = "auto"
    n_power_iterations: int = 1

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"EI2Config: order must be one of {ORDERS}, got {self.order!r}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"EI2Config: r must be a positive integer, got {self.r!r}")
        if self.ffam_backend not in ("auto", "reference", "triton"):
            raise ValueError(f"EI2Config: ffam_backend must be auto, reference or triton, got {self.ffam_backend!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EI2Config":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------- the block with STAM

class STAMBlockMixin:
    """A transformer block with STAM after its self-attention (or after its cross-attention).

    Mixed into a BasicTransformerBlock class by `stam_block_class`; instances are made by swapping
    the class of existing blocks (`inflate_block`), so the original submodules keep their names and
    weights and the new parameters appear as `stam.*`. `forward` is the base block's three residual
    lines with STAM between them, as in Fig. 2c:

        x = x + attn1(norm1(x))          FFAM (attn1 with FFAMProcessor)
        x = stam(x)                      order "ffam-stam-ca"
        x = x + attn2(norm2(x), text)    cross-attention, per frame
        x = stam(x)                      order "ffam-ca-stam"
        x = x + ff(norm3(x))
    """

    base: type                      # the block class this mixin extends
    stam: STAM
    stam_order: Order

    def forward(self, x: torch.Tensor, context: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), hw=hw)                                   # [(B·F), N, C]
        if self.stam_order == "ffam-stam-ca":
            x = self.stam(x)
        x = x + self.attn2(self.norm2(x), context, hw=hw)
        if self.stam_order == "ffam-ca-stam":
            x = self.stam(x)
        return x + self.ff(self.norm3(x))

    @classmethod
    def inflate_block(cls, block: nn.Module, order: Order = "ffam-stam-ca", n_power_iterations: int = 1) -> nn.Module:
        """Turn an existing block into this class in place. STAM takes attn1's width and head layout
        (SD 1.4: 8 heads), device and dtype."""
        if not isinstance(block, cls.base) or isinstance(block, STAMBlockMixin):
            raise TypeError(f"{cls.__name__} inflates a plain {cls.base.__name__}, got {type(block).__name__}")
        if order not in ORDERS:
            raise ValueError(f"STAM order must be one of {ORDERS}, got {order!r}")
        a = block.attn1
        w = a.to_q.weight
        stam = STAM(a.to_q.in_features, a.heads, a.dim_head, a.upcast, n_power_iterations)
        block.__class__ = cls
        block.stam = stam.to(device=w.device, dtype=w.dtype).train(block.training)
        block.stam_order = order
        return block


@functools.cache
def stam_block_class(base: type) -> type:
    """`class STAM<Base>(STAMBlockMixin, base)` for a transformer-block class `base` with
    norm1/attn1/norm2/attn2/norm3/ff and forward(x, context, hw)."""
    cls = type(f"STAM{base.__name__}", (STAMBlockMixin, base), {"__module__": __name__, "base": base})
    globals()[cls.__name__] = cls                          # importable by name, so pickling works
    return cls


# ---------------------------------------------------------------- inflation

def inflate(unet: nn.Module, config: EI2Config | None = None, seed: int | None = 0,
            block_type: type | None = None) -> list[str]:
    """Make an SD UNet EI²'s video model, in place; returns the names of the blocks that got a STAM.

    FFAM: `FFAMProcessor(config.r)` on every `*attn1` layer. STAM: every `block_type` block (default
    minivid.unet.BasicTransformerBlock) becomes a `STAMBlockMixin` block. The new STAM weights are
    drawn under `seed` (None: from the global generator), so an inflation is reproducible. Layers are
    renamed afterwards (`name_layers`) so STAM's attention shares the UNet's call state (frames=F).
    """
    config = config or EI2Config()
    if block_type is None:
        from minivid.unet import BasicTransformerBlock as block_type
    if any(isinstance(m, STAMBlockMixin) for m in unet.modules()):
        raise ValueError(f"inflate: {type(unet).__name__} already has STAM blocks (inflated twice?)")
    names: list[str] = []
    if config.stam:
        cls = stam_block_class(block_type)
        rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
        with rng:
            if seed is not None:
                torch.manual_seed(seed)
            for name, m in unet.named_modules():
                if type(m) is block_type:
                    cls.inflate_block(m, config.order, config.n_power_iterations)
                    names.append(name)
        if not names:
            raise ValueError(f"inflate: no {block_type.__name__} in {type(unet).__name__}")
    name_layers(unet)
    if config.ffam:
        set_processor(unet, SPATIAL_SELF, FFAMProcessor(config.r, config.ffam_backend))
    return names


def deflate(unet: nn.Module) -> list[str]:
    """Undo `inflate`, in place: every STAM block becomes its plain image block again (its `stam`
    removed) and every FFAM layer gets the default processor back; returns the names of the blocks
    that lost their STAM. The image model's weights are untouched (tuned W_Q stay tuned)."""
    names = []
    for name, m in unet.named_modules():
        if isinstance(m, STAMBlockMixin):
            names.append(name)
    for name in names:
        m = unet.get_submodule(name)
        base = type(m).base
        del m.stam
        del m.stam_order
        m.__class__ = base
    for m in unet.modules():
        if isinstance(m, Attention) and isinstance(m.processor, FFAMProcessor):
            m.processor = sdpa
    name_layers(unet)
    return names


@contextlib.contextmanager
def inflated(unet: nn.Module, config: EI2Config | None = None, seed: int | None = 0,
             block_type: type | None = None) -> Iterator[EI2Model]:
    """EI²'s inflation as a scope: `inflate(unet, config, seed)` on entry, the plain image UNet back
    on exit (its STAMs dropped, its attn1 processors as they were before entry). Yields the
    `EI2Model` on the inflated UNet. For a model to tune and keep, use the permanent `inflate` /
    `EI2Model(unet, config)`; this form is for trying EI²'s blocks in an experiment on a model that
    must stay an image model afterwards.

        with inflated(sd.unet, EI2Config(r=1)) as model:
            eps = model(latents, t, context)          # latents [B, 4, F, h, w]
    """
    if any(isinstance(m, STAMBlockMixin) for m in unet.modules()):
        raise ValueError(f"inflated: {type(unet).__name__} is already inflated")
    saved = {n: m.processor for n, m in attention_layers(unet).items()}
    model = EI2Model(unet, config or EI2Config(), seed, block_type)
    try:
        yield model
    finally:
        deflate(unet)
        for n, m in attention_layers(unet).items():
            if n in saved:
                m.processor = saved[n]


def set_stam_order(unet: nn.Module, order: Order) -> int:
    """Move STAM to `order` in every inflated block (the tensors do not depend on it); returns the count."""
    if order not in ORDERS:
        raise ValueError(f"STAM order must be one of {ORDERS}, got {order!r}")
    blocks = [m for m in unet.modules() if isinstance(m, STAMBlockMixin)]
    for m in blocks:
        m.stam_order = order
    return len(blocks)


def trainable_patterns(config: EI2Config | None = None) -> list[str]:
    """Globs of the tuned parameters (§5): W_Q of FFAM (attn1.to_q) and of the cross-attention
    (attn2.to_q), and every STAM parameter (W_q, W_k, W̄_v, W̄_L, b)."""
    config = config or EI2Config()
    patterns = ["*attn1.to_q.*", "*attn2.to_q.*"]
    return patterns + (["*.stam.*"] if config.stam else [])


@torch.no_grad()
def power_iteration(model: nn.Module) -> int:
    """One power-iteration refresh of every spectral-norm parametrisation in `model` (STAM's W̄_v,
    W̄_L), then switch those parametrisations to eval mode; returns how many were refreshed.

    Called once per tuning step before the forward: the forward then divides by the refreshed
    estimate without changing it, so a recomputation under gradient checkpointing sees the same
    W̄ as the forward did. It runs outside autocast, so the float32 vectors stay float32.
    This equals torch's training-mode behaviour (power iteration in the forward, u and v treated as
    constants by autograd), done once per step instead of once per forward.
    """
    n = 0
    for m in model.modules():
        if not parametrize.is_parametrized(m):
            continue
        for name, plist in m.parametrizations.items():
            if not any(isinstance(p, _SpectralNorm) for p in plist):
                continue
            device = plist.original.device.type
            with torch.autocast(device, enabled=False):
                plist.train()
                getattr(m, name)                      # the parametrisation's training-mode forward iterates
                plist.eval()
            n += 1
    return n


# ---------------------------------------------------------------- video latents

class EI2Model(nn.Module):
    """The inflated UNet on video latents: x [B, C, F, H, W], t scalar or [B], context [B, M, D]
    (or [B·F, M, D], one per frame) -> [B, C, F, H, W].

    It reshapes to the frame batch [(B·F), C, H, W] (frame index fastest), repeats t and the
    context per frame (cross-attention per frame) and calls the UNet inside
    `call_state(unet, frames=F)`. With `config`, the UNet is inflated here; without, it is used as
    it is (already inflated, or a plain UNet for comparison).
    """

    def __init__(self, unet: nn.Module, config: EI2Config | None = None, seed: int | None = 0,
                 block_type: type | None = None):
        super().__init__()
        self.unet = unet
        self.config = config
        self.stam_blocks = inflate(unet, config, seed, block_type) if config is not None else []

    def forward(self, x: torch.Tensor, t: torch.Tensor | float | int, context: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"EI2Model: x must be video latents [B, C, F, H, W], got shape {tuple(x.shape)}")
        B, C, F, H, W = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(B * F, C, H, W)                # [(B·F), C, H, W]
        t = torch.as_tensor(t, device=x.device)
        t = t.reshape(-1).expand(B).repeat_interleave(F) if t.numel() in (1, B) else t
        if context.shape[0] == B:
            context = context.repeat_interleave(F, dim=0)                          # [(B·F), M, D]
        with call_state(self.unet, frames=F):
            out = self.unet(frames, t, context)                                    # [(B·F), C, H, W]
        return out.reshape(B, F, *out.shape[1:]).permute(0, 2, 1, 3, 4)
