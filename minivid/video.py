"""Video and image IO on the ffmpeg binary that imageio-ffmpeg ships (no PIL, no torchvision).

Frames in minivid are float tensors [F, 3, H, W] with values in [-1, 1] (RGB), the range the VAEs take.

- read:   `read_video` takes an mp4/webm/gif/… file, a single image, or a folder of png/jpg frames
          (ffmpeg decodes images too), with frame sampling (start, stride, num_frames).
- shape:  `fit` resizes/crops to a size the model accepts (short side, multiple of 64 or 8);
          `resize_center_crop` to an exact size; `side_by_side` for source|result videos.
- write:  `write_video` (H.264 mp4, yuv420p), `write_gif`, `save_grid` (PNG, pure numpy + zlib).
          Every writer goes through `minivid.outputs.write_file`: a temporary file with an unpredictable
          name created exclusively beside the target, checked (videos must decode to the frames sent)
          before it is renamed into place with the umask's mode; an existing file is replaced only
          when asked, never an input.

Errors name the file: a missing path raises FileNotFoundError; unreadable, corrupt or empty videos,
folders without images and frames too small for the model raise VideoError.
"""
from __future__ import annotations

import math
import os
import re
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Callable, Iterator, Literal, NamedTuple, Optional, Sequence, Union

import imageio_ffmpeg
import numpy as np
import torch
import torch.nn.functional as F_
from torch import Tensor

PathLike = Union[str, os.PathLike]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

__all__ = [
    "VideoError", "VideoInfo", "IMAGE_EXTENSIONS", "probe_video", "read_video", "read_image", "frame_indices",
    "sample_frames", "to_uint8", "from_uint8", "resize", "resize_center_crop", "fit", "fitted_size", "side_by_side",
    "write_video", "write_gif", "encode_png", "save_grid",
]


class VideoError(ValueError):
    """A video/image input that cannot be used (corrupt, empty, wrong size); the message names the file."""


class VideoInfo(NamedTuple):
    width: int
    height: int
    fps: float
    duration: float  # seconds; 0 when ffmpeg cannot tell


# ------------------------------------------------------------------------------------------ pixels

def to_uint8(frames: Tensor) -> np.ndarray:
    """[F, 3, H, W] in [-1, 1] -> uint8 [F, H, W, 3] (rounded, clamped)."""
    x = ((frames.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def from_uint8(frames: np.ndarray) -> Tensor:
    """uint8 [F, H, W, 3] -> float32 [F, 3, H, W] in [-1, 1] (exact inverse of to_uint8 on its image)."""
    arr = np.ascontiguousarray(frames)
    arr = arr if arr.flags.writeable else arr.copy()  # ffmpeg's frame buffers are read-only
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _check_frames(frames: Tensor, what: str) -> None:
    if not isinstance(frames, Tensor) or frames.ndim != 4 or frames.shape[1] != 3:
        shape = tuple(frames.shape) if isinstance(frames, Tensor) else type(frames).__name__
        raise ValueError(f"{what}: expected frames [F, 3, H, W], got {shape}")
    if frames.shape[0] == 0:
        raise ValueError(f"{what}: no frames to write")


# ------------------------------------------------------------------------------------------ reading

def _natural_key(name: str) -> list:
    """frame_2.png sorts before frame_10.png."""
    return [int(s) if s.isdigit() else s.lower() for s in re.split(r"(\d+)", name)]


def _ffmpeg_error(path: Path, err: Exception) -> VideoError:
    text = str(err)
    if "does not contain any stream" in text or "Output file is empty" in text:
        return VideoError(f"{path}: contains no video frames")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith(" ")]
    reason = lines[-1] if lines else type(err).__name__
    return VideoError(f"{path}: cannot be decoded as a video or image (corrupt or unsupported file): {reason}")


def _decode(path: Path) -> tuple[dict, Iterator[np.ndarray]]:
    """Start ffmpeg on `path`; returns its metadata and an iterator of uint8 [H, W, 3] frames."""
    from minivid.checks import input_path

    input_path(path, folder_ok=False)          # missing, a loop, a FIFO or a folder: said plainly, before ffmpeg
    gen = imageio_ffmpeg.read_frames(str(path))
    try:
        meta = next(gen)
    except (OSError, RuntimeError, StopIteration) as err:
        gen.close()
        raise _ffmpeg_error(path, err) from None
    w, h = meta["size"]

    def frames() -> Iterator[np.ndarray]:
        try:
            for raw in gen:
                yield np.frombuffer(raw, dtype=np.uint8).reshape(h, w, 3)
        except (OSError, RuntimeError) as err:
            raise _ffmpeg_error(path, err) from None
        finally:
            gen.close()

    return meta, frames()


def probe_video(path: PathLike) -> VideoInfo:
    """Size, frame rate and duration of a video or image file, from ffmpeg's header (no decoding)."""
    path = Path(path)
    meta, frames = _decode(path)
    frames.close()
    w, h = meta["size"]
    return VideoInfo(w, h, float(meta.get("fps") or 0.0), float(meta.get("duration") or 0.0))


def frame_indices(total: int, num_frames: Optional[int] = None, stride: int = 1, start: int = 0,
                  source: str = "video") -> list[int]:
    """Indices start, start+stride, … (num_frames of them, or up to the end); errors name `source`."""
    if stride < 1 or start < 0 or (num_frames is not None and num_frames < 1):
        raise ValueError(f"need stride >= 1, start >= 0, num_frames >= 1; got {stride}, {start}, {num_frames}")
    if total == 0:
        raise VideoError(f"{source}: contains no video frames")
    available = len(range(start, total, stride))
    if available == 0 or (num_frames is not None and available < num_frames):
        raise VideoError(f"{source}: has {total} frames; start={start}, stride={stride} gives {available}"
                         f", fewer than the {num_frames or 1} requested")
    return list(range(start, total, stride))[: num_frames or available]


def time_grid(fps: float, sample_fps: float, start_t: float = 0.0, end_t: Optional[float] = None,
              total: Optional[int] = None) -> list[int]:
    """Frame indices of a video at `fps` sampled at `sample_fps` over [start_t, end_t) seconds, as the I2VEdit
    authors' loader (Vicky0522/I2VEdit i2vedit/data.py `read_video_iter`, lines 176–186): end_t is capped at
    (or, when None, set to) the duration total/fps; np.linspace(int(start_t·fps), int(end_t·fps),
    int((end_t − start_t)·sample_fps), endpoint=False).astype(int)."""
    if fps <= 0 or sample_fps <= 0:
        raise ValueError(f"time_grid: fps and sample_fps must be positive, got {fps} and {sample_fps}")
    if total is not None:
        end_t = total / fps if end_t is None else min(total / fps, end_t)
    if end_t is None or not 0 <= start_t < end_t:
        raise ValueError(f"time_grid: need 0 <= start_t < end_t, got {start_t} and {end_t}")
    s, e, n = int(start_t * fps), int(end_t * fps), int((end_t - start_t) * sample_fps)
    return np.linspace(s, e, n, endpoint=False).astype(int).tolist() if n > 0 else []


def sample_frames(frames: Tensor, num_frames: Optional[int] = None, stride: int = 1, start: int = 0) -> Tensor:
    """frames[start::stride][:num_frames] with the same checks as `read_video`."""
    return frames[frame_indices(frames.shape[0], num_frames, stride, start, source="frames")]


def _list_images(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise VideoError(f"{folder}: folder contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    return sorted(files, key=lambda p: _natural_key(p.name))


def _read_image_u8(path: Path) -> np.ndarray:
    _, frames = _decode(path)
    first = next(frames, None)
    frames.close()
    if first is None:
        raise VideoError(f"{path}: contains no image")
    return first


def read_video(path: PathLike, num_frames: Optional[int] = None, stride: int = 1, start: int = 0) -> Tensor:
    """Read frames start, start+stride, … (num_frames of them, or to the end) -> [F, 3, H, W] in [-1, 1].

    `path` is a video file (anything ffmpeg reads: mp4, webm, gif, mov …), a single image (one frame),
    or a folder of images sorted naturally by name (frame_2 before frame_10; all the same size).
    Only the selected frames are kept (folders: only they are decoded).
    """
    from minivid.checks import input_path

    path = input_path(path)
    if path.is_dir():
        files = _list_images(path)
        chosen = [files[i] for i in frame_indices(len(files), num_frames, stride, start, source=str(path))]
        images = [_read_image_u8(p) for p in chosen]
        for p, im in zip(chosen, images):
            if im.shape != images[0].shape:
                raise VideoError(f"{p}: size {im.shape[1]}x{im.shape[0]} differs from {chosen[0].name}"
                                 f" ({images[0].shape[1]}x{images[0].shape[0]}); frames must share one size")
        return from_uint8(np.stack(images))

    _, frames = _decode(path)
    kept, total = [], 0
    try:
        for i, frame in enumerate(frames):
            total = i + 1
            if i >= start and (i - start) % stride == 0:
                kept.append(frame)
                if num_frames is not None and len(kept) == num_frames:
                    break
    finally:
        frames.close()
    if num_frames is None or len(kept) < num_frames:
        frame_indices(total, num_frames, stride, start, source=str(path))  # raises with the counts
    return from_uint8(np.stack(kept))


def read_image(path: PathLike) -> Tensor:
    """One image (png, jpg, … or the first frame of a video) -> [3, H, W] in [-1, 1]."""
    path = Path(path)
    return from_uint8(_read_image_u8(path)[None])[0]


# ------------------------------------------------------------------------------------------ geometry

def resize(frames: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of [F, 3, H, W] to size (H', W'), antialiased when shrinking."""
    out = F_.interpolate(frames.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return out.clamp(-1, 1).to(frames.dtype)


def _center_crop(frames: Tensor, h: int, w: int) -> Tensor:
    H, W = frames.shape[-2:]
    top, left = (H - h) // 2, (W - w) // 2
    return frames[..., top: top + h, left: left + w]


def resize_center_crop(frames: Tensor, size: tuple[int, int]) -> Tensor:
    """Scale so the frames cover size (H', W') keeping the aspect ratio, then crop the centre to it."""
    H, W = frames.shape[-2:]
    h, w = size
    scale = max(h / H, w / W)
    new = (max(h, round(H * scale)), max(w, round(W * scale)))
    return _center_crop(resize(frames, new) if new != (H, W) else frames, h, w)


def fitted_size(height: int, width: int, size: Optional[int], multiple: int) -> tuple[int, int]:
    """The (H, W) `fit` gives frames of height×width: the short side resized to `size`, each side
    cropped down to a multiple of `multiple`."""
    H, W = height, width
    if size is not None:
        scale = size / min(H, W)
        H, W = (size, max(size, round(W * scale))) if H <= W else (max(size, round(H * scale)), size)
    return H // multiple * multiple, W // multiple * multiple


def fit(frames: Tensor, size: Optional[int] = 512, multiple: int = 64, min_side: Optional[int] = None,
        source: str = "frames") -> Tensor:
    """Bring frames to a size the model accepts, keeping the aspect ratio.

    The shorter side is resized to `size` (None keeps the native resolution), then each side is
    centre-cropped down to a multiple of `multiple` (64 for SD/SVD at full size, 8 for tiny models: the
    VAE downsamples by 8 and the UNet by up to 8 more). Frames whose shorter side is below `min_side`
    (default: `multiple`) are refused rather than blown up from a few pixels.
    """
    H, W = frames.shape[-2:]
    min_side = multiple if min_side is None else min_side
    if min(H, W) < min_side:
        raise VideoError(f"{source}: frames are {W}x{H}, smaller than the minimum side of {min_side} px")
    if size is not None:
        scale = size / min(H, W)
        H2, W2 = (size, max(size, round(W * scale))) if H <= W else (max(size, round(H * scale)), size)
        frames = resize(frames, (H2, W2)) if (H2, W2) != (H, W) else frames
        H, W = H2, W2
    h, w = H // multiple * multiple, W // multiple * multiple
    if h == 0 or w == 0:
        raise VideoError(f"{source}: frames of {W}x{H} cannot be cropped to a multiple of {multiple}")
    return _center_crop(frames, h, w)


def side_by_side(a: Tensor, b: Tensor) -> Tensor:
    """[F, 3, H, Wa] | [F, 3, H, Wb] -> [F, 3, H, Wa + Wb]; b is resized to a's height if needed."""
    _check_frames(a, "side_by_side (left)")
    _check_frames(b, "side_by_side (right)")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"side_by_side needs equal frame counts, got {a.shape[0]} and {b.shape[0]}")
    if b.shape[-2] != a.shape[-2]:
        H = a.shape[-2]
        b = resize(b, (H, max(1, round(b.shape[-1] * H / b.shape[-2]))))
    return torch.cat([a, b.to(a.device, a.dtype)], dim=-1)


# ------------------------------------------------------------------------------------------ writing

def _atomic_write(path: PathLike, write: Callable[[str], None], overwrite: bool, inputs: Sequence[PathLike] = (),
                  verify: Optional[Callable[[str], None]] = None) -> Path:
    """write(tmp) through `minivid.outputs.write_file`: a fresh temporary file beside `path` (same
    extension, so ffmpeg picks the format), checked (not empty; `verify`), renamed onto `path`.
    Nothing is left behind on failure and what was at `path` stays as it was."""
    from minivid.outputs import write_file

    return write_file(path, write, inputs=inputs, overwrite=overwrite, verify=verify)


def _verify_video(path: PathLike, frames: int, width: int, height: int) -> Callable[[str], None]:
    """A check that the file ffmpeg wrote decodes to `frames` frames of width×height."""
    from minivid.outputs import WriteError

    def verify(tmp: str) -> None:
        try:
            meta, decoded = _decode(Path(tmp))
            count = sum(1 for _ in decoded)
        except (VideoError, OSError) as e:
            raise WriteError(5, f"{path}: the encoded video does not decode ({e}); nothing was replaced") from None
        if tuple(meta["size"]) != (width, height) or count != frames:
            raise WriteError(5, f"{path}: the encoder wrote {count} frame(s) of {meta['size'][0]}x{meta['size'][1]}, "
                                f"expected {frames} of {width}x{height}; nothing was replaced")
    return verify


def _even(frames: np.ndarray, odd: Literal["pad", "crop"]) -> np.ndarray:
    """yuv420p needs even width and height: pad by repeating the last row/column, or crop it."""
    F, H, W, _ = frames.shape
    if H % 2 == 0 and W % 2 == 0:
        return frames
    if odd == "crop":
        return frames[:, : H - H % 2, : W - W % 2]
    if odd == "pad":
        return np.pad(frames, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)), mode="edge")
    raise ValueError(f"odd must be 'pad' or 'crop', got {odd!r}")


def _encode(tmp: str, frames: np.ndarray, fps: float, **kwargs) -> None:
    F, H, W, _ = frames.shape
    writer = imageio_ffmpeg.write_frames(tmp, (W, H), fps=fps, macro_block_size=1, quality=None,
                                         ffmpeg_log_level="error", **kwargs)
    writer.send(None)
    try:
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
    finally:
        writer.close()


MAX_VIDEO_SIDE = 16384          # libx264 (and so the mp4s minivid writes) takes at most 16384 px a side
MIN_FPS = 0.01                  # ffmpeg's frame-rate arithmetic fails far below this


def check_video_size(path: PathLike, width: int, height: int, fps: float = 8) -> None:
    """VideoError (before any encoding) for a video ffmpeg cannot write: a side above MAX_VIDEO_SIDE or a
    frame rate outside [MIN_FPS, 1000]."""
    if max(width, height) > MAX_VIDEO_SIDE:
        raise VideoError(f"{path}: a {width}x{height} video cannot be encoded (H.264 takes at most "
                         f"{MAX_VIDEO_SIDE} px a side); use a smaller --size or a less elongated source")
    if not (MIN_FPS <= fps <= 1000):
        raise VideoError(f"{path}: frame rate {fps:g} cannot be encoded; use --fps in [{MIN_FPS}, 1000]")


def write_video(path: PathLike, frames: Tensor, fps: float = 8, crf: int = 18,
                odd: Literal["pad", "crop"] = "pad", overwrite: bool = False, inputs: Sequence[PathLike] = ()) -> Path:
    """Write [F, 3, H, W] in [-1, 1] as H.264 (libx264, yuv420p, CRF `crf`: 18 ≈ visually lossless).

    yuv420p requires even sizes: an odd side is padded by one repeated row/column (odd="pad") or cropped
    by one (odd="crop"). Written atomically and checked (the file must decode to the frames sent) before it
    replaces anything; an existing file is replaced only with overwrite=True, never one of `inputs`.
    """
    _check_frames(frames, str(path))
    data = _even(to_uint8(frames), odd)
    F, H, W, _ = data.shape
    check_video_size(path, W, H, fps)
    return _atomic_write(path, lambda tmp: _encode(
        tmp, data, fps, codec="libx264", pix_fmt_out="yuv420p", output_params=["-crf", str(crf)]), overwrite,
        inputs, verify=_verify_video(path, F, W, H))


def write_gif(path: PathLike, frames: Tensor, fps: float = 8, overwrite: bool = False,
              inputs: Sequence[PathLike] = ()) -> Path:
    """Write an animated GIF with one palette generated for the whole clip (ffmpeg palettegen/paletteuse)."""
    _check_frames(frames, str(path))
    data = to_uint8(frames)
    F, H, W, _ = data.shape
    check_video_size(path, W, H, fps)
    palette = ["-vf", "split[a][b];[a]palettegen[p];[b][p]paletteuse", "-loop", "0"]
    return _atomic_write(path, lambda tmp: _encode(
        tmp, data, fps, codec="gif", pix_fmt_out="pal8", output_params=palette), overwrite, inputs,
        verify=_verify_video(path, F, W, H))


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes (8-bit RGB, no filtering, zlib level 6): signature, IHDR, IDAT, IEND."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"encode_png needs uint8 [H, W, 3], got {image.dtype} {image.shape}")
    H, W, _ = image.shape
    rows = np.concatenate([np.zeros((H, 1), np.uint8), image.reshape(H, W * 3)], axis=1)  # filter 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0)  # 8 bits, colour type 2 (RGB)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + chunk(b"IEND", b""))


def save_grid(path: PathLike, frames: Tensor, cols: Optional[int] = None, overwrite: bool = False,
              inputs: Sequence[PathLike] = ()) -> Path:
    """Tile [F, 3, H, W] row by row into one PNG (cols default ⌈√F⌉; empty cells black), atomically."""
    _check_frames(frames, str(path))
    images = to_uint8(frames)
    F, H, W, _ = images.shape
    cols = cols or math.ceil(math.sqrt(F))
    rows = math.ceil(F / cols)
    grid = np.zeros((rows * H, cols * W, 3), np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * H: (r + 1) * H, c * W: (c + 1) * W] = im
    from minivid.outputs import write_bytes

    return write_bytes(path, encode_png(grid), overwrite=overwrite, inputs=inputs)

