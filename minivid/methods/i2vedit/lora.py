"""I2VEdit's motion LoRA (§4.1, "Motion LoRA"; LoRA as Eq. 2, W₀ + ΔW = W₀ + BA).

"To capture the coarse motion of x_i^src, we fine-tune the video model by adding LoRAs to the temporal
attention layers". The authors' code (utils/lora.py, `inject_trainable_lora_extended` with
`TemporalBasicTransformerBlock`) puts one on every Linear under attn1, attn2, ff and ff_in of each
temporal transformer block — in minivid the `time_stack.<d>` entries of the SpatialVideoTransformers:

    y = W x + scale · dropout(up(down(x)))      down: r × in ~ N(0, std 1/r),  up: out × r = 0

rank r = 32, dropout 0.1 on the branch output, scale 1. At SVD size that is 16 blocks × 12 Linears =
192 layers and 17,821,696 parameters.

The LoRA is attached with forward hooks on the UNet's own Linears: nothing is copied or renamed, the
UNet's state dict keeps its official keys (strict loading still works) and attention globs still match.
The LoRA tensors live in the `MotionLoRA` module returned by `attach_motion_lora`, under the dotted name
of the Linear they adapt:

    input_blocks.1.1.time_stack.0.attn1.to_q.lora_down.weight     [r, in]
    input_blocks.1.1.time_stack.0.attn1.to_q.lora_up.weight       [out, r]

These are the names of the safetensors files (`save` and the tuning checkpoints). `export_official` /
`import_official` read and write the authors' format: `torch.save` of a flat list [up₀, down₀, up₁,
down₁, …] of fp32 tensors in diffusers' module order (down_blocks, up_blocks, mid_block; per block
ff_in.net.0.proj, ff_in.net.2, attn1 to_q/to_k/to_v/to_out.0, attn2 likewise, ff.net.0.proj, ff.net.2).
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from minivid.unet_video import VideoTransformerBlock

__all__ = [
    "DEFAULT_RANK", "DEFAULT_DROPOUT", "DEFAULT_TARGETS", "LoRAError", "LoRABranch", "MotionLoRA",
    "attach_motion_lora", "motion_lora_targets", "official_order", "read_lora_file", "FORMAT",
]

DEFAULT_RANK = 32                                   # config/customize_train.yaml lora_rank
DEFAULT_DROPOUT = 0.1                               # lora_unet_dropout
DEFAULT_TARGETS = ("ff_in", "attn1", "attn2", "ff")  # utils/lora.py _find_modules_v2, TemporalBasicTransformerBlock
FORMAT = "minivid-i2vedit-motion-lora"
_GROUP_ORDER = {"input_blocks": 0, "output_blocks": 1, "middle_block": 2}   # diffusers: down, up, mid


class LoRAError(ValueError):
    """A LoRA that does not fit the model it is loaded into (other rank, other model, damaged file)."""


# ---------------------------------------------------------------- which Linears

def motion_lora_targets(unet: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS) -> dict[str, nn.Linear]:
    """{dotted name: Linear} of every Linear under `targets` of each temporal transformer block, in the
    UNet's module order (input_blocks, middle_block, output_blocks; per block ff_in, attn1, attn2, ff)."""
    bad = [t for t in targets if t not in DEFAULT_TARGETS]
    if bad or not targets:
        raise ValueError(f"motion LoRA targets must be a non-empty subset of {DEFAULT_TARGETS}, got {tuple(targets)}")
    found: dict[str, nn.Linear] = {}
    for block_name, block in unet.named_modules():
        if not isinstance(block, VideoTransformerBlock):
            continue
        for part in DEFAULT_TARGETS:                  # diffusers' TemporalBasicTransformerBlock order
            if part not in targets:
                continue
            for sub, m in getattr(block, part).named_modules():
                if isinstance(m, nn.Linear):
                    found[f"{block_name}.{part}.{sub}"] = m
    if not found:
        raise ValueError(f"{type(unet).__name__} has no temporal transformer blocks (time_stack) to put a motion LoRA on")
    return found


def official_order(names: Sequence[str]) -> list[str]:
    """The layer names in the authors' list order: diffusers' module order (down_blocks, up_blocks,
    mid_block). sgm's input_blocks / output_blocks number the same blocks in the same order as diffusers'
    down_blocks / up_blocks, so a stable sort by group keeps each group's order."""
    return sorted(names, key=lambda n: _GROUP_ORDER[n.split(".", 1)[0]])


# ---------------------------------------------------------------- the module

class LoRABranch(nn.Module):
    """down (r × in, N(0, std 1/r)), up (out × r, zeros) and dropout on the branch output."""

    def __init__(self, in_features: int, out_features: int, rank: int, dropout: float,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.lora_down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_up = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout)
        with torch.no_grad():
            if self.lora_down.weight.device.type == "meta":
                self.lora_down.weight.normal_(0.0, 1.0 / rank)
            else:
                w = torch.randn(self.lora_down.weight.shape, generator=generator, dtype=torch.float32)
                self.lora_down.weight.copy_(w / rank)
            self.lora_up.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype))))

    def delta(self) -> torch.Tensor:
        """up · down: the [out, in] update of the base weight (scale 1), in float32."""
        return self.lora_up.weight.float() @ self.lora_down.weight.float()


def _container(root: nn.Module, path: list[str]) -> nn.Module:
    for part in path:
        if part not in root._modules:
            root.add_module(part, nn.Module())
        root = root._modules[part]
    return root


class MotionLoRA(nn.Module):
    """The LoRA branches of one UNet, attached by forward hooks (see the module docstring).

    `named_parameters()` gives the documented names. `scale` multiplies every branch; `disabled()` runs
    the UNet without the LoRA for the duration of a block; `merge()` folds scale·up·down into the base
    weights (for fast inference; eval mode: dropout is off), `unmerge()` takes it out again; `detach()`
    removes the hooks, leaving the UNet as it was. Dropout follows this module's train/eval mode.
    """

    def __init__(self, unet: nn.Module, rank: int = DEFAULT_RANK, dropout: float = DEFAULT_DROPOUT,
                 scale: float = 1.0, targets: Sequence[str] = DEFAULT_TARGETS, dtype: torch.dtype = torch.float32,
                 generator: torch.Generator | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"motion LoRA rank must be at least 1, got {rank}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"motion LoRA dropout must be in [0, 1], got {dropout}")
        if getattr(unet, "_motion_lora", None) is not None:
            raise ValueError("a motion LoRA is already attached to this UNet; detach() it first")
        self.rank, self.dropout_p, self.scale, self.targets = int(rank), float(dropout), float(scale), tuple(targets)
        self.enabled = True
        self.merged = False
        self._base: dict[str, torch.Tensor] = {}        # base weights while merged (see merge)
        layers = motion_lora_targets(unet, self.targets)
        too_small = {n: min(m.in_features, m.out_features) for n, m in layers.items() if rank > min(m.in_features, m.out_features)}
        if too_small:
            first = next(iter(too_small))
            raise ValueError(f"motion LoRA rank {rank} exceeds the width of {len(too_small)} layers "
                             f"(first: {first}, {too_small[first]})")
        object.__setattr__(self, "_unet", unet)        # not a submodule: the UNet's tensors stay its own
        object.__setattr__(self, "_layers", layers)
        self.names = list(layers)
        self._branches: dict[str, LoRABranch] = {}
        for name, linear in layers.items():
            branch = LoRABranch(linear.in_features, linear.out_features, rank, dropout,
                                linear.weight.device, dtype, generator)
            *path, leaf = name.split(".")
            _container(self, path).add_module(leaf, branch)
            self._branches[name] = branch
        self._handles = [linear.register_forward_hook(self._hook(name)) for name, linear in layers.items()]
        object.__setattr__(unet, "_motion_lora", self)
        self.eval()

    # ------------------------------------------------------------ the hooks

    def _hook(self, name: str):
        branch = self._branches[name]

        def hook(_module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            if not self.enabled or self.merged:
                return None
            return out + self.scale * branch(args[0]).to(out.dtype)

        return hook

    @property
    def unet(self) -> nn.Module:
        return self._unet

    def branch(self, name: str) -> LoRABranch:
        return self._branches[name]

    def layers(self) -> dict[str, nn.Linear]:
        """{name: the UNet Linear it adapts}"""
        return dict(self._layers)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @contextlib.contextmanager
    def disabled(self) -> Iterator["MotionLoRA"]:
        """Run the UNet without the LoRA inside the block (a merged LoRA is taken out and put back)."""
        was_enabled, was_merged = self.enabled, self.merged
        if was_merged:
            self.unmerge()
        self.enabled = False
        try:
            yield self
        finally:
            self.enabled = was_enabled
            if was_merged:
                self.merge()

    @torch.no_grad()
    def merge(self) -> "MotionLoRA":
        """W ← W + scale·up·down on every target (the hooks then do nothing). The base weights are kept
        (a copy in their own dtype) and the merged ones are computed from them in float32, so merging
        never reads a merged weight: `unmerge` restores the base bitwise and any number of
        unmerge/merge cycles (`disabled()` does one) neither drifts the base nor the merged weights,
        in bf16/fp16 as in fp32. The copy costs the targets' weight bytes while merged."""
        if not self.merged:
            self._base = {}
            for name, linear in self._layers.items():
                w = linear.weight
                base = w.detach().clone()
                self._base[name] = base
                w.copy_((base.float() + self.scale * self._branches[name].delta().to(w.device)).to(w.dtype))
            self.merged = True
        return self

    @torch.no_grad()
    def unmerge(self) -> "MotionLoRA":
        """W ← the base weights kept by `merge` (bitwise; no subtraction, so no rounding)."""
        if self.merged:
            for name, linear in self._layers.items():
                linear.weight.copy_(self._base[name])
            self._base = {}
            self.merged = False
        return self

    def detach(self) -> nn.Module:
        """Remove the LoRA from the UNet (unmerging it first); returns the UNet."""
        self.unmerge()
        for h in self._handles:
            h.remove()
        self._handles = []
        unet = self._unet
        object.__setattr__(unet, "_motion_lora", None)
        return unet

    # ------------------------------------------------------------ files

    def describe(self) -> dict[str, Any]:
        """What a saved file records (and what loading checks)."""
        return {"format": FORMAT, "rank": self.rank, "dropout": self.dropout_p, "scale": self.scale,
                "targets": list(self.targets), "layers": len(self.names), "parameters": self.num_parameters()}

    def tensors(self) -> dict[str, torch.Tensor]:
        """{documented name: tensor} (detached, on their device)."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def save(self, path: str | os.PathLike, meta: dict | None = None) -> pathlib.Path:
        """Write the LoRA as safetensors under the documented names (atomically: temp file, rename)."""
        from safetensors.torch import save_file

        from minivid.outputs import write_file

        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        info = {"lora": json.dumps(self.describe()), "meta": json.dumps(meta or {}, default=str)}
        tensors = {k: v.contiguous().cpu() for k, v in self.tensors().items()}
        return write_file(path, lambda tmp: save_file(tensors, tmp, metadata=info))

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str = "tensors") -> "MotionLoRA":
        """Copy `tensors` (documented names) in; every name must be present with this LoRA's shapes.
        Raises LoRAError naming the file, the keys and what was expected."""
        own = self.state_dict()
        missing = [k for k in own if k not in tensors]
        unexpected = [k for k in tensors if k not in own]
        if missing or unexpected:
            raise LoRAError(
                f"{source}: not a motion LoRA of this model: {len(missing)} of its {len(own)} tensors missing "
                f"(first: {missing[:2]}), {len(unexpected)} unexpected (first: {unexpected[:2]}); expected "
                f"{len(self.names)} layers under the temporal transformer blocks ({', '.join(self.targets)})")
        down = {k: tuple(v.shape) for k, v in tensors.items() if k.endswith("lora_down.weight")}
        ranks = sorted({s[0] for s in down.values()})
        if ranks != [self.rank]:
            raise LoRAError(f"{source}: a LoRA of rank {', '.join(map(str, ranks))}; this one has rank {self.rank} "
                            f"(attach it with rank={ranks[0]})")
        bad = [k for k, v in own.items() if tuple(tensors[k].shape) != tuple(v.shape)]
        if bad:
            raise LoRAError(f"{source}: {len(bad)} tensors have other shapes than this model's LoRA (first: {bad[0]} "
                            f"{tuple(tensors[bad[0]].shape)}, expected {tuple(own[bad[0]].shape)}): a LoRA of another model")
        was_merged = self.merged
        self.unmerge()
        for k, v in own.items():
            v.copy_(tensors[k].to(v.dtype))
        if was_merged:
            self.merge()
        return self

    def load(self, path: str | os.PathLike) -> "MotionLoRA":
        """Load a file written by `save`, a `minivid tune --method i2vedit` checkpoint, or the authors'
        `torch.save` list (.pt / .pth / .bin)."""
        path = pathlib.Path(path)
        if path.suffix in (".pt", ".pth", ".bin"):
            return self.import_official(path)
        return self.load_tensors(read_lora_file(path), str(path))

    # ------------------------------------------------------------ the authors' format

    def official_names(self) -> list[str]:
        return official_order(self.names)

    def export_official(self, path: str | os.PathLike | None = None) -> list[torch.Tensor]:
        """The authors' format: [up₀, down₀, up₁, down₁, …] fp32 on the CPU in diffusers' module order
        (utils/lora.py `save_lora_weight`); written with torch.save when `path` is given (atomically)."""
        weights: list[torch.Tensor] = []
        for name in self.official_names():
            b = self._branches[name]
            weights += [b.lora_up.weight.detach().to("cpu", torch.float32).clone(),
                        b.lora_down.weight.detach().to("cpu", torch.float32).clone()]
        if path is not None:
            path = pathlib.Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            from minivid.outputs import write_file

            write_file(path, lambda tmp: torch.save(weights, tmp))
        return weights

    @torch.no_grad()
    def import_official(self, weights: str | os.PathLike | Sequence) -> "MotionLoRA":
        """Load the authors' list (a path, read with weights_only=True, or the list itself): flat
        [up, down, up, down, …] as they save it, or a list of (up, down) pairs."""
        source = "official LoRA list"
        if isinstance(weights, (str, os.PathLike)):
            source = str(weights)
            try:
                weights = torch.load(weights, map_location="cpu", weights_only=True)
            except Exception as e:  # unpickling raises several types
                raise LoRAError(f"{source}: not a readable torch.save file of LoRA tensors ({e})") from e
        if not isinstance(weights, (list, tuple)):
            raise LoRAError(f"{source}: expected a list of tensors [up, down, up, down, …], got {type(weights).__name__}")
        flat: list = []
        for w in weights:
            flat += list(w) if isinstance(w, (list, tuple)) else [w]
        names = self.official_names()
        if len(flat) != 2 * len(names) or not all(torch.is_tensor(t) and t.ndim == 2 for t in flat):
            raise LoRAError(f"{source}: {len(flat)} entries; a motion LoRA of this model has {len(names)} layers, "
                            f"i.e. {2 * len(names)} 2-D tensors (up, down per layer): a LoRA of another model")
        tensors = {}
        for i, name in enumerate(names):
            tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"] = flat[2 * i], flat[2 * i + 1]
        return self.load_tensors(tensors, source)


def attach_motion_lora(unet: nn.Module, rank: int = DEFAULT_RANK, dropout: float = DEFAULT_DROPOUT,
                       scale: float = 1.0, targets: Sequence[str] = DEFAULT_TARGETS, seed: int | None = 0,
                       dtype: torch.dtype = torch.float32) -> MotionLoRA:
    """Attach a fresh motion LoRA (down ~ N(0, std 1/r) drawn from `seed`, up = 0) to a VideoUNet.
    Its output equals the base UNet's until `up` is trained. Returns the MotionLoRA (eval mode)."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return MotionLoRA(unet, rank, dropout, scale, targets, dtype, generator)


def read_lora_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a motion LoRA safetensors file (a `save` file or a tuning checkpoint)."""
    from safetensors.torch import load_file

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"motion LoRA {path} does not exist")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for damaged files
        raise LoRAError(f"{path}: not a readable safetensors file ({e})") from e
