"""The papers' automatic metrics, each as its source defines it (docs/eval.md cites them).

On embeddings (pure functions, any device):

- `clip_text_alignment(image_embeds [F, P], text_embed [P])`: mean over frames of
  cos(CLIP image embedding of frame i, CLIP text embedding of the prompt)  (EI², TCVE, LOVEU-TGVE;
  LOVEU-TGVE's script reports it as 100 · cos, CLIP's logit scale: `clip_score` in the results);
- `clip_frame_consistency(image_embeds, pairs)`: mean cos over frame pairs, "consecutive"
  (i, i+1) or "all" (every i != j, LOVEU-TGVE's script: the off-diagonal mean of the cosine matrix);
- `subject_consistency(features [F, D])`: VBench's, on DINO ViT-B/16 class tokens:
  1/(F-1) · Σ_{i>=1} ½ (max(0, cos(d_{i-1}, d_i)) + max(0, cos(d_0, d_i)));
- `aesthetic_quality(scores [F])`: VBench's, the mean LAION aesthetic score (1..10) / 10;
- `motion_smoothness`: VBench's, from AMT-S interpolating the odd frames (minivid.eval.amt);
- `imaging_quality`: VBench's, the mean MUSIQ (SPAQ) frame score / 100 (minivid.eval.musiq).

`Evaluator` runs the encoders with each metric's own preprocessing (minivid.eval.preprocess) on a
video's frames and returns every metric with its per-frame values.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

import torch
import torch.nn.functional as F

from minivid.eval.amt import (
    AMT, AMT_PRESETS, check_frame_size, correlation_bytes, interpolate_odd_frames, motion_smoothness_score,
)
from minivid.eval.catalog import METRICS, NEEDS_PROMPT, RUN_WHEN_PRESENT
from minivid.eval.encoders import AestheticPredictor, CLIPEncoder, DINOViT
from minivid.eval.musiq import MUSIQ, MUSIQ_PRESETS, imaging_quality, score_frames
from minivid.eval.preprocess import clip_preprocess_hf, clip_preprocess_vbench, dino_preprocess_vbench, to_uint8

__all__ = [
    "cosine_matrix", "clip_text_alignment", "clip_frame_consistency", "subject_consistency", "aesthetic_quality",
    "Evaluator", "METRICS", "CLIP_SCORE_SCALE", "RUN_WHEN_PRESENT", "NEEDS_PROMPT", "motion_smoothness_score",
    "imaging_quality", "pickscore",
]

Pairs = Literal["consecutive", "all"]
CLIP_SCORE_SCALE = 100.0     # CLIP's trained logit scale exp(logit_scale), capped at 100: LOVEU-TGVE's "CLIP score"

AMT_BATCH_BYTES = 2 * 1024 ** 3     # the Evaluator batches AMT pairs up to this much correlation memory


def _check_embeds(x: torch.Tensor, what: str, min_frames: int = 1) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{what} must be [F, D], got {getattr(x, 'shape', type(x))}")
    if x.shape[0] < min_frames:
        raise ValueError(f"{what}: needs at least {min_frames} frames, got {x.shape[0]}")


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[A, D], [B, D] -> [A, B] cosine similarities (float32 or wider)."""
    a, b = a.float() if a.dtype in (torch.float16, torch.bfloat16) else a, b.float() if b.dtype in (torch.float16, torch.bfloat16) else b
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def clip_text_alignment(image_embeds: torch.Tensor, text_embed: torch.Tensor) -> tuple[float, list[float]]:
    """Mean over frames of cos(image_i, text) -> (mean, per-frame cosines)."""
    _check_embeds(image_embeds, "image_embeds")
    text_embed = text_embed.reshape(1, -1)
    if text_embed.shape[1] != image_embeds.shape[1]:
        raise ValueError(f"text embedding has {text_embed.shape[1]} dims, image embeddings {image_embeds.shape[1]}")
    per_frame = cosine_matrix(image_embeds, text_embed)[:, 0]
    return per_frame.mean().item(), per_frame.tolist()


def clip_frame_consistency(image_embeds: torch.Tensor, pairs: Pairs = "consecutive") -> tuple[float, list[float]]:
    """Mean cos over frame pairs -> (mean, the pair values: consecutive (i, i+1) in order, or for
    "all" each unordered pair i < j in row-major order; the mean over ordered pairs i != j is the same)."""
    _check_embeds(image_embeds, "image_embeds", min_frames=2)
    sim = cosine_matrix(image_embeds, image_embeds)
    n = sim.shape[0]
    if pairs == "consecutive":
        values = sim.diagonal(offset=1)
    elif pairs == "all":
        i, j = torch.triu_indices(n, n, offset=1)
        values = sim[i, j]
    else:
        raise ValueError(f"pairs must be 'consecutive' or 'all', got {pairs!r}")
    return values.mean().item(), values.tolist()


def subject_consistency(features: torch.Tensor) -> tuple[float, list[float]]:
    """VBench's subject consistency of one video -> (value, per-frame terms for frames 1..F-1)."""
    _check_embeds(features, "features", min_frames=2)
    sim = cosine_matrix(features, features)
    idx = torch.arange(1, sim.shape[0])
    previous = sim[idx, idx - 1].clamp(min=0.0)
    first = sim[idx, 0].clamp(min=0.0)
    terms = (previous + first) / 2
    return terms.mean().item(), terms.tolist()


def aesthetic_quality(scores: torch.Tensor) -> tuple[float, list[float]]:
    """VBench's aesthetic quality: mean over frames of the LAION score / 10 -> (value, per-frame scores 1..10)."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1 or not len(scores):
        raise ValueError(f"scores must be [F] with F >= 1, got {getattr(scores, 'shape', type(scores))}")
    return (scores.float() / 10).mean().item(), scores.float().tolist()


def pickscore(image_embeds: torch.Tensor, text_embed: torch.Tensor, logit_scale: float) -> tuple[float, list[float]]:
    """PickScore of a video: mean over frames of exp(logit_scale) · cos(image_i, text), the
    PickScore_v1 model's embeddings (Kirstain et al., arXiv:2305.01569; LOVEU-TGVE's `pick_score`) -> (mean, per frame)."""
    _check_embeds(image_embeds, "image_embeds")
    text_embed = text_embed.reshape(1, -1)
    if text_embed.shape[1] != image_embeds.shape[1]:
        raise ValueError(f"text embedding has {text_embed.shape[1]} dims, image embeddings {image_embeds.shape[1]}")
    per_frame = logit_scale * cosine_matrix(image_embeds, text_embed)[:, 0]
    return per_frame.mean().item(), per_frame.tolist()


# ---------------------------------------------------------------- running the encoders on a video

def _preset(presets: dict, cfg) -> str:
    return next((name for name, c in presets.items() if c == cfg), "custom")


def _batches(x: torch.Tensor, size: int) -> Iterable[torch.Tensor]:
    for i in range(0, len(x), size):
        yield x[i:i + size]


@dataclass
class Evaluator:
    """The encoders of the metrics to compute (None: that metric is not computed).

    `clip` feeds the CLIP text alignment and frame consistency (transformers' CLIPImageProcessor
    preprocessing); `aesthetic_clip` (CLIP ViT-L/14) feeds the aesthetic predictor with VBench's
    preprocessing; `dino` gives subject consistency with VBench's DINO preprocessing; `amt` (AMT-S)
    motion smoothness and `musiq` (MUSIQ, SPAQ) imaging quality, each as VBench runs them.
    """

    clip: CLIPEncoder | None = None
    dino: DINOViT | None = None
    aesthetic: AestheticPredictor | None = None
    aesthetic_clip: CLIPEncoder | None = None
    amt: AMT | None = None
    musiq: MUSIQ | None = None
    pickscore: CLIPEncoder | None = None
    batch_size: int = 16
    progress: bool = False
    metrics: tuple[str, ...] = field(default_factory=lambda: tuple(METRICS))

    def __post_init__(self) -> None:
        if self.aesthetic is not None:
            clip = self.aesthetic_clip
            if clip is None:
                raise ValueError("aesthetic quality needs a CLIP ViT-L/14 (aesthetic_clip) to embed the frames")
            if clip.kind != "openai" or clip.embed_dim != self.aesthetic.in_features:
                raise ValueError(f"the aesthetic predictor takes {self.aesthetic.in_features}-dim CLIP ViT-L/14 image "
                                 f"embeddings; the CLIP given ({clip.preset}) gives {clip.embed_dim}")

    def _device(self, module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
        p = next(module.parameters())
        return p.device, p.dtype

    @torch.no_grad()
    def _encode(self, fn, module: torch.nn.Module, pixels: torch.Tensor, label: str) -> torch.Tensor:
        from tqdm.auto import tqdm

        device, dtype = self._device(module)
        out = [fn(b.to(device=device, dtype=dtype)).float().cpu()
               for b in tqdm(list(_batches(pixels, self.batch_size)), desc=label, disable=not self.progress, leave=False)]
        return torch.cat(out)

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor, prompt: str | None = None) -> dict[str, Any]:
        """frames [F, 3, H, W] (uint8, or float in [-1, 1]) -> {metric: {"value": ..., ...}} for every
        metric whose encoders are present (text alignment only with a prompt)."""
        u8 = to_uint8(frames)
        out: dict[str, Any] = {}
        run_amt = self.amt is not None and "motion_smoothness" in self.metrics and len(u8) >= 3
        if run_amt:                                                     # before any compute
            try:
                check_frame_size(self.amt.cfg, *u8.shape[-2:])
            except ValueError as e:
                raise ValueError(f"motion_smoothness: {e}; leave it out of the metrics") from None
        if self.clip is not None:
            clip = self.clip
            pixels = clip_preprocess_hf(u8, clip.image_size)
            image = self._encode(clip.encode_image, clip.model, pixels, "CLIP image")
            info = {"encoder": clip.preset, "preprocess": "clip_preprocess_hf"}
            if prompt is not None and "clip_text_alignment" in self.metrics:
                device, _ = self._device(clip.model)
                ids = clip.tokenizer()([prompt]).to(device)
                text = clip.encode_text(ids).float().cpu()
                value, per_frame = clip_text_alignment(image, text[0])
                out["clip_text_alignment"] = {"value": value, "clip_score": CLIP_SCORE_SCALE * value,
                                              "per_frame": per_frame, "prompt": prompt, **info}
            if "clip_frame_consistency" in self.metrics and len(u8) >= 2:
                value, per_pair = clip_frame_consistency(image, "consecutive")
                value_all, _ = clip_frame_consistency(image, "all")
                out["clip_frame_consistency"] = {"value": value, "pairs": "consecutive", "all_pairs": value_all,
                                                 "per_pair": per_pair, **info}
        if self.dino is not None and "subject_consistency" in self.metrics and len(u8) >= 2:
            size = self.dino.cfg.image_size
            feats = torch.cat([self._encode(self.dino, self.dino, dino_preprocess_vbench(chunk, size), "DINO")
                               for chunk in _batches(u8, self.batch_size)])
            value, terms = subject_consistency(feats)
            out["subject_consistency"] = {"value": value, "per_frame": terms, "encoder": "dino_vitb16",
                                          "preprocess": "dino_preprocess_vbench"}
        if self.aesthetic is not None and "aesthetic_quality" in self.metrics:
            clip = self.aesthetic_clip
            pixels = clip_preprocess_vbench(u8, clip.image_size)
            image = self._encode(clip.encode_image, clip.model, pixels, "CLIP image (aesthetic)")
            device, dtype = self._device(self.aesthetic)
            scores = self.aesthetic(image.to(device=device, dtype=dtype)).float().cpu()
            value, per_frame = aesthetic_quality(scores)
            out["aesthetic_quality"] = {"value": value, "per_frame_score": per_frame, "encoder": clip.preset,
                                        "preprocess": "clip_preprocess_vbench"}
        if run_amt:
            dtype_size = next(self.amt.parameters()).element_size()
            pairs = max(1, min(self.batch_size // 8,                    # at most ~2 GB of correlation at once
                               int(AMT_BATCH_BYTES // correlation_bytes(self.amt.cfg, *u8.shape[-2:], dtype_size))))
            interpolated = interpolate_odd_frames(self.amt, u8, batch_size=pairs,
                                                  progress=self.progress)
            value, mae = motion_smoothness_score(u8, interpolated)
            out["motion_smoothness"] = {"value": value, "per_frame_mae": mae, "frames_interpolated": len(mae),
                                        "encoder": _preset(AMT_PRESETS, self.amt.cfg)}
        if self.musiq is not None and "imaging_quality" in self.metrics:
            value, per_frame = imaging_quality(score_frames(self.musiq, u8, batch_size=max(1, self.batch_size // 2)))
            out["imaging_quality"] = {"value": value, "per_frame_score": per_frame,
                                      "encoder": _preset(MUSIQ_PRESETS, self.musiq.cfg),
                                      "preprocess": "vbench_imaging_quality_preprocess (longer side <= 512)"}
        if self.pickscore is not None and prompt is not None and "pickscore" in self.metrics:
            model = self.pickscore            # PickScore_v1 with CLIP-ViT-H-14-laion2B's processor (= CLIP's)
            pixels = clip_preprocess_hf(u8, model.image_size)
            image = self._encode(model.encode_image, model.model, pixels, "PickScore image")
            device, _ = self._device(model.model)
            text = model.encode_text(model.tokenizer()([prompt]).to(device)).float().cpu()
            value, per_frame = pickscore(image, text[0], model.logit_scale)
            out["pickscore"] = {"value": value, "per_frame": per_frame, "logit_scale": model.logit_scale,
                                "prompt": prompt, "encoder": model.preset, "preprocess": "clip_preprocess_hf"}
        return out
