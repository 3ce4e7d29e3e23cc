"""Video IO: round trips through ffmpeg (mp4, gif, image folders), the PNG encoder, geometry helpers and
every documented error path. Every test makes its own small media in tmp_path."""
import os
import struct
import zlib

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from minivid import video as V


def smooth_clip(F=8, H=48, W=64):
    """Smooth moving colour gradients in [-1, 1], [F, 3, H, W]."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    return torch.stack([torch.stack([torch.sin(2 * xx + 0.3 * f), torch.cos(2 * yy - 0.2 * f), 0.8 * xx * yy])
                        for f in range(F)]).clamp(-1, 1)


def quantised(frames):
    return V.from_uint8(V.to_uint8(frames))


def decode_png(data: bytes) -> np.ndarray:
    """Minimal PNG reader for what encode_png writes (8-bit RGB, filter 0), independent of ffmpeg."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos: pos + 4])
        tag, body = data[pos + 4: pos + 8], data[pos + 8: pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length: pos + 12 + length])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF
        if tag == b"IHDR":
            size = struct.unpack(">IIBBBBB", body)
        elif tag == b"IDAT":
            idat += body
        pos += 12 + length
    W, H, depth, colour = size[:4]
    assert (depth, colour) == (8, 2)
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(H, 1 + 3 * W)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(H, W, 3)


# ------------------------------------------------------------------------------------------ mp4

def test_mp4_round_trip(tmp_path):
    frames = smooth_clip()
    path = V.write_video(tmp_path / "clip.mp4", frames, fps=8)
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4"]  # the temporary file was renamed, none left over
    back = V.read_video(path)
    assert back.shape == (8, 3, 48, 64) and back.dtype == torch.float32
    assert back.min() >= -1 and back.max() <= 1
    # yuv420p stores colour at half resolution (error ≈ half the per-pixel colour gradient, here up to
    # ~8 of 255 levels per pixel) and CRF 18 adds a little; lossless CRF 0 still shows mean 2.3 levels.
    err = (back - quantised(frames)).abs()
    assert err.mean() < 0.04 and err.max() < 0.2
    info = V.probe_video(path)
    assert (info.width, info.height, info.fps) == (64, 48, 8.0)


def test_frame_sampling(tmp_path):
    path = V.write_video(tmp_path / "clip.mp4", smooth_clip(F=10))
    every = V.read_video(path)
    assert every.shape[0] == 10
    picked = V.read_video(path, num_frames=3, stride=2, start=1)
    assert torch.equal(picked, every[1:7:2])
    assert torch.equal(V.read_video(path, stride=3), every[::3])
    assert torch.equal(V.sample_frames(every, num_frames=2, stride=4, start=1), every[[1, 5]])
    with pytest.raises(V.VideoError, match=r"clip\.mp4.*10 frames.*stride=4 gives 3"):
        V.read_video(path, num_frames=4, stride=4)
    with pytest.raises(V.VideoError, match="clip.mp4"):
        V.read_video(path, start=10)


def test_odd_sizes_are_padded_or_cropped(tmp_path):
    frames = smooth_clip(F=2, H=33, W=47)
    padded = V.read_video(V.write_video(tmp_path / "pad.mp4", frames))
    cropped = V.read_video(V.write_video(tmp_path / "crop.mp4", frames, odd="crop"))
    assert padded.shape[-2:] == (34, 48) and cropped.shape[-2:] == (32, 46)


def test_writers_never_replace_existing_files(tmp_path):
    target = tmp_path / "input.mp4"
    target.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="input.mp4"):
        V.write_video(target, smooth_clip(F=2))
    with pytest.raises(FileExistsError):
        V.save_grid(target, smooth_clip(F=2))
    assert target.read_bytes() == b"precious"
    V.write_video(target, smooth_clip(F=2), overwrite=True)
    assert V.read_video(target).shape[0] == 2
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        V.write_video(tmp_path / "no_such_dir" / "x.mp4", smooth_clip(F=2))
    with pytest.raises(ValueError, match=r"\[F, 3, H, W\]"):
        V.write_video(tmp_path / "bad.mp4", torch.zeros(3, 8, 8))
    assert sorted(os.listdir(tmp_path)) == ["input.mp4"]


def test_gif_round_trip(tmp_path):
    frames = smooth_clip(F=4)
    back = V.read_video(V.write_gif(tmp_path / "clip.gif", frames))
    assert back.shape == (4, 3, 48, 64)
    # 256-colour palette with error-diffusion dithering: right on average, noisy per pixel.
    assert (back - quantised(frames)).abs().mean() < 0.1


def test_webm_is_read(tmp_path):
    frames = smooth_clip(F=3, H=32, W=32)
    path = tmp_path / "clip.webm"
    writer = imageio_ffmpeg.write_frames(str(path), (32, 32), codec="libvpx", fps=8, macro_block_size=1,
                                         bitrate="2M", ffmpeg_log_level="error")
    writer.send(None)
    for frame in V.to_uint8(frames):
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    back = V.read_video(path)
    assert back.shape == (3, 3, 32, 32)
    assert (back - quantised(frames)).abs().mean() < 0.1  # VP8 at 2 Mbit/s, yuv420p


# ------------------------------------------------------------------------------------------ images, PNG

def test_png_grid_exact_pixels(tmp_path):
    colours = torch.tensor([[-1.0, 0.0, 1.0], [1.0, -1.0, 0.5], [0.2, 0.4, -0.6], [1.0, 1.0, 1.0], [-0.5, 0.9, 0.1]])
    frames = colours[:, :, None, None].expand(5, 3, 6, 10).clone()
    frames[:, :, 0, 0] = -1.0  # a marker pixel per cell
    path = V.save_grid(tmp_path / "grid.png", frames)  # 5 frames -> 3 columns, 2 rows
    grid = decode_png(path.read_bytes())
    assert grid.shape == (12, 30, 3)
    cells = V.to_uint8(frames)
    for i in range(5):
        r, c = divmod(i, 3)
        assert np.array_equal(grid[r * 6: (r + 1) * 6, c * 10: (c + 1) * 10], cells[i])
    assert (grid[6:, 20:] == 0).all()  # the empty sixth cell is black
    assert np.array_equal(V.to_uint8(V.read_image(path)[None])[0], grid)  # ffmpeg reads our PNG identically
    one_row = decode_png(V.save_grid(tmp_path / "row.png", frames, cols=5).read_bytes())
    assert one_row.shape == (6, 50, 3)


def test_folder_of_frames(tmp_path):
    frames = quantised(smooth_clip(F=12, H=16, W=24))
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames):  # frame_2 must come before frame_10
        V.save_grid(folder / f"frame_{i}.png", frame[None])
    (folder / "notes.txt").write_text("not an image")
    assert torch.equal(V.read_video(folder), frames)  # PNG is lossless
    assert torch.equal(V.read_video(folder, num_frames=3, stride=5, start=1), frames[[1, 6, 11]])
    jpg = tmp_path / "still.jpg"
    writer = imageio_ffmpeg.write_frames(str(jpg), (24, 16), codec="mjpeg", pix_fmt_out="yuvj444p",
                                         macro_block_size=1, quality=10, ffmpeg_log_level="error")
    writer.send(None)
    writer.send(np.ascontiguousarray(V.to_uint8(frames[:1])[0]))
    writer.close()
    assert (V.read_image(jpg) - frames[0]).abs().mean() < 0.05
    V.save_grid(folder / "frame_99.png", frames[:1, :, :8])
    with pytest.raises(V.VideoError, match="frame_99.png.*differs"):
        V.read_video(folder)


# ------------------------------------------------------------------------------------------ errors

def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        V.read_video(tmp_path / "missing.mp4")
    corrupt = tmp_path / "x.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(V.VideoError, match=r"x\.mp4.*cannot be decoded"):
        V.read_video(corrupt)
    empty = tmp_path / "empty.mp4"  # a valid container holding zero frames
    writer = imageio_ffmpeg.write_frames(str(empty), (16, 16), codec="libx264", macro_block_size=1,
                                         ffmpeg_log_level="quiet")
    writer.send(None)
    writer.close()
    with pytest.raises(V.VideoError, match=r"empty\.mp4.*no video frames"):
        V.read_video(empty)
    folder = tmp_path / "nothing"
    folder.mkdir()
    (folder / "readme.txt").write_text("no frames here")
    with pytest.raises(V.VideoError, match="nothing.*no images"):
        V.read_video(folder)


# ------------------------------------------------------------------------------------------ geometry

def test_fit_and_crop():
    frames = torch.rand(2, 3, 100, 160) * 2 - 1
    out = V.fit(frames, size=64, multiple=32)
    assert out.shape == (2, 3, 64, 96)  # short side 64, long side 102 -> cropped to 96
    portrait = V.fit(frames.transpose(-1, -2), size=64, multiple=32)
    assert portrait.shape == (2, 3, 96, 64)
    native = V.fit(frames, size=None, multiple=64)
    assert torch.equal(native, frames[..., 18:82, 16:144])  # centre crop to 64x128, no resampling
    assert V.fit(frames, size=None, multiple=4).shape[-2:] == (100, 160)
    with pytest.raises(V.VideoError, match="too small|smaller than"):
        V.fit(torch.zeros(1, 3, 40, 300), size=512, multiple=64)
    assert V.fit(torch.zeros(1, 3, 40, 300), size=16, multiple=8).shape[-2:] == (16, 120)
    crop = V.resize_center_crop(frames, (50, 50))
    assert crop.shape == (2, 3, 50, 50) and crop.min() >= -1 and crop.max() <= 1
    gradient = torch.linspace(-1, 1, 160).expand(1, 3, 100, 160)
    centre = V.resize_center_crop(gradient, (100, 100))
    assert torch.equal(centre, gradient[..., 30:130])  # same height: a pure centre crop


def test_side_by_side():
    a, b = torch.rand(3, 3, 32, 40), torch.rand(3, 3, 16, 16)
    sbs = V.side_by_side(a, b)
    assert sbs.shape == (3, 3, 32, 72) and torch.equal(sbs[..., :40], a)
    with pytest.raises(ValueError, match="equal frame counts"):
        V.side_by_side(a, b[:2])
