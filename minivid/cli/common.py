"""What the jobs share: their options, loading the model they ask for, reading the source video,
and the outputs every edit writes. Used by the subcommands and by the methods' CLIs
(`minivid.cli.<method>`), so each of those keeps only what its paper adds.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:                     # torch loads when a job runs, not for `--help` (see minivid.cli)
    import torch

    from minivid.jobs import Job

log = logging.getLogger(__name__)


class _Dtypes(Mapping):
    """--dtype name -> torch dtype, resolved on lookup (importing this module does not import torch)."""
    NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

    def __getitem__(self, name: str):
        import torch

        return getattr(torch, self.NAMES[name])

    def __iter__(self):
        return iter(self.NAMES)

    def __len__(self) -> int:
        return len(self.NAMES)


DTYPES = _Dtypes()
DEFAULT_SIZE = 512
TINY_PRESETS = {"sd1": "tiny", "sd2": "tiny_sd2"}    # the tiny random model of each SD generation
BASE_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x"}


# ---------------------------------------------------------------- option types
# argparse calls these on the text of an option; an ArgumentTypeError becomes
# "minivid CMD: error: argument --NAME: <message>" (exit 2) before anything loads.

def _range_text(low, high, low_open: bool = False) -> str:
    if high is None:
        return f"{'>' if low_open else '≥'} {low}"
    return f"in {'(' if low_open else '['}{low}, {high}]"


def integer(low: int = 1, high: int | None = None, odd: bool = False, high_text: str | None = None):
    """An argparse type: an integer in [low, high] (high None: no bound); odd=True: odd only.
    `high_text`: how the message writes the upper bound (default: the number)."""
    rng = f"in [{low}, {high_text}]" if high_text else _range_text(low, high)

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be an integer {rng}, got {text!r}") from None
        if value < low or (high is not None and value > high) or (odd and value % 2 == 0):
            raise argparse.ArgumentTypeError(f"must be {'an odd' if odd else 'an'} integer {rng}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def number(low: float = 0.0, high: float | None = None, low_open: bool = False, high_open: bool = False):
    """An argparse type: a finite float in [low, high] (low_open/high_open: that end excluded)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be a number {_range_text(low, high, low_open)}, got {text!r}") from None
        rng = _range_text(low, high, low_open)
        if high_open and high is not None:
            rng = rng[:-1] + ")"
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number {rng}, got {text!r}")
        if value < low or (low_open and value == low) or (high is not None and (value > high or (high_open and value == high))):
            raise argparse.ArgumentTypeError(f"must be a number {rng}, got {value:g}")
        return value
    parse.__name__ = "number"
    return parse


def torch_device(text: str) -> str:
    """An argparse type: a torch device this torch can use (cpu; cuda[:i] with CUDA; mps on Apple);
    "auto" (the default of --device): cuda when this torch can use it, else cpu."""
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: this torch ({torch.__version__}) has no usable CUDA "
                                             f"(torch.cuda.is_available() is False); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available in this torch; use --device cpu")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: minivid runs on cpu, cuda or mps")
    return text


def relative_point(text: str) -> tuple[float, float]:
    """An argparse type: 'y,x' with both coordinates in [0, 1]."""
    try:
        y, x = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'y,x' with relative coordinates in [0, 1], got {text!r}") from None
    if not all(math.isfinite(v) and 0 <= v <= 1 for v in (y, x)):
        raise argparse.ArgumentTypeError(f"must be 'y,x' with relative coordinates in [0, 1], got {text!r}")
    return y, x


# the ranges every subcommand shares
SEED = integer(0, 2 ** 63 - 1, high_text="2^63 - 1")
THREADS = integer(1, 4096)
STEPS = integer(1, 1000)                 # DDIM over 1000 training timesteps: at most one step per timestep
FRAMES = integer(1, 100_000)
PIXELS = integer(8, 1 << 20)             # a side in pixels; the memory check refuses what cannot fit
FPS = number(0.01, 1000)                 # minivid.video.MIN_FPS: ffmpeg cannot encode slower
GUIDANCE = number(0, 100)
CHUNK = integer(1, 100_000)


# ---------------------------------------------------------------- options

def add_run_arguments(p: argparse.ArgumentParser, device: str | None = None) -> None:
    """--device, --seed, --out, --threads, --quiet: what every job takes. `device`: the default device
    (default "auto": cuda when available, else cpu; resolved when the options are parsed, so that
    building the parser for `--help` does not import torch)."""
    dev = device or "auto"
    p.add_argument("--device", type=torch_device, default=dev,
                   help="torch device (default " + ("cuda when available, else cpu" if dev == "auto" else dev) + ")")
    p.add_argument("--seed", type=SEED, default=0, help="random seed, an integer ≥ 0 (default 0)")
    p.add_argument("--out", help="output folder (default outputs/<job>-<time>/); must be writable and apart from the inputs")
    p.add_argument("--threads", type=THREADS,
                   help="CPU threads for torch, ≥ 1 (default: 1 for a tiny model on the CPU, else torch's choice)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (they are also off when stderr is not a terminal)")


# ---------------------------------------------------------------- the run policies (one place each)

def show_progress(args: argparse.Namespace) -> bool:
    """The one progress policy of every command: tqdm bars on stderr, one per stage that takes more than
    about a second, unless --quiet (batch: also spelled --no-progress) or stderr is not a terminal.
    `minivid.cli.main` stores the answer in `args.progress`; every job passes that to its long loops."""
    import sys

    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def runs_tiny(args: argparse.Namespace) -> bool:
    """A job on a tiny random model: --tiny, or a demo (the demos build only tiny models)."""
    return bool(getattr(args, "tiny", False)) or getattr(args, "command", None) == "demo"


def default_threads(args: argparse.Namespace) -> int | None:
    """The one thread policy of every command: --threads N when given; else 1 for a tiny model on the CPU
    (its small operators gain nothing from threads, and on a busy CPU OpenMP threads spin-waiting on each
    other make it 5-10x slower: `generate --tiny` 43-84 s vs 8.4 s, a 5-step COVE edit 33 s vs 7.7 s);
    else None: torch's own choice."""
    if getattr(args, "threads", None):
        return int(args.threads)
    device = str(getattr(args, "device", None) or "cpu")
    if runs_tiny(args) and device.split(":")[0] == "cpu":
        return 1
    return None


@contextlib.contextmanager
def torch_threads(args: argparse.Namespace) -> Iterator[int | None]:
    """Run the block with `default_threads(args)` torch threads (the previous count restored after)."""
    n = default_threads(args)
    if n is None:
        yield None
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def add_model_arguments(p: argparse.ArgumentParser, weights_help: str = "official checkpoint file or diffusers folder") -> None:
    p.add_argument("--weights", help=weights_help + " (omit with --tiny)")
    p.add_argument("--tiny", action="store_true", help="use a tiny random model instead of weights (a demo of the machinery: it makes no real images)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="compute dtype (default fp32)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="load weights holding NaN/Inf anyway (for inspection; by default they are refused)")
    add_run_arguments(p)


def add_video_arguments(p: argparse.ArgumentParser, images: bool = False) -> None:
    """--video (required) and how it is read. images=True: a single image file is accepted too
    (one frame), and `--image` is the same option."""
    if images:
        p.add_argument("--video", "--image", dest="video", required=True,
                       help="input video (mp4/gif/webm), folder of frames, or a single image (png/jpg/...)")
    else:
        p.add_argument("--video", required=True, help="input video (mp4/gif/webm) or a folder of frames")
    p.add_argument("--frames", type=FRAMES, default=8, help="number of frames to read, ≥ 1 (default 8)")
    p.add_argument("--stride", type=integer(1, 10_000), default=1, help="take every n-th frame, ≥ 1 (default 1)")
    p.add_argument("--size", type=PIXELS, default=None,
                   help=f"frames are resized (short side) and centre-cropped to a multiple of 8 (default {DEFAULT_SIZE}, "
                        f"with --tiny the tiny model's size)")
    p.add_argument("--fps", type=FPS, default=8, help="frame rate of the written videos, in [0.01, 1000] (default 8)")


# ---------------------------------------------------------------- the model

# `minivid batch` turns this on ({}): a weights file loads once per process and every job gets its
# own copy (jobs change models in place: EI² inflates the UNet, tuning trains it). Keys name the
# file, dtype and device; MODEL_LOADS counts the loads from disk.
MODEL_CACHE: dict | None = None
MODEL_LOADS = {"count": 0}


def cached_model(key: tuple, load):
    """`load()`, or while MODEL_CACHE is on, a copy of what the first `load()` for `key` gave."""
    import copy

    if MODEL_CACHE is None:
        MODEL_LOADS["count"] += 1
        return load()
    if key not in MODEL_CACHE:
        MODEL_LOADS["count"] += 1
        MODEL_CACHE[key] = load()
    model = MODEL_CACHE[key]
    shared = {id(v): v for v in vars(model).values() if type(v).__name__.endswith("Tokenizer")}   # read-only
    return copy.deepcopy(model, memo=shared)


def require_weights(args: argparse.Namespace) -> None:
    """Exactly one of --weights and --tiny."""
    if not args.weights and not args.tiny:
        raise ValueError("give --weights PATH (an official checkpoint or a diffusers folder; see weights/README.md) or --tiny")
    if args.weights and args.tiny:
        raise ValueError(f"--tiny and --weights {args.weights}: give one (--tiny builds a tiny random model and "
                         f"would ignore the file)")


def load_sd(args: argparse.Namespace, method: str | None = None, base: str = "sd1", tiny_seed: int | None = None):
    """The StableDiffusion the options ask for: --weights PATH (--prediction where the parser has it),
    or with --tiny the tiny random model of `base`'s generation ("sd1" | "sd2"), seeded by `tiny_seed`
    (a tuned checkpoint's) or --seed. `method`: its name, to warn when the weights are not its base."""
    from minivid.models import StableDiffusion

    require_weights(args)
    dtype = DTYPES[args.dtype]
    if args.weights:
        prediction = getattr(args, "prediction", None)
        allow_nonfinite = getattr(args, "allow_nonfinite", False)
        sd = cached_model(("sd", str(Path(args.weights).resolve()), str(dtype), str(args.device), prediction,
                           allow_nonfinite),
                          lambda: StableDiffusion.load(args.weights, device=args.device, dtype=dtype,
                                                       prediction=prediction, allow_nonfinite=allow_nonfinite))
        if method and sd.kind != base:
            log.warning("%s is built on %s; %s is an %s model", method, BASE_NAMES[base], args.weights,
                        BASE_NAMES.get(sd.kind, sd.kind))
        record_ran(model=f"{sd.kind} ({args.weights})", prediction=sd.prediction, dtype=args.dtype,
                   device=str(args.device))
        return sd
    seed = args.seed if tiny_seed is None else tiny_seed
    log.warning("--tiny: a tiny %s-style model with RANDOM weights (seed %d); its outputs are not meaningful",
                BASE_NAMES[base], seed)
    sd = StableDiffusion.from_config(TINY_PRESETS[base], device=args.device, dtype=dtype, seed=seed)
    record_ran(model=TINY_PRESETS[base], tiny_seed=seed, prediction=sd.prediction, dtype=args.dtype,
               device=str(args.device))
    return sd


def record_ran(**what) -> None:
    """Record in the running job's record ("ran") what effectively ran: model preset, dtype, size, frames.
    No job running (the API used directly): nothing."""
    from minivid import jobs

    if jobs.ACTIVE:
        jobs.ACTIVE[-1].ran(**what)


def tiny_base(args: argparse.Namespace) -> dict:
    """What a tuned checkpoint records about its base model, so edit rebuilds the same tiny model."""
    return {"weights": args.weights or "tiny", "tiny_seed": None if args.weights else args.seed}


# ---------------------------------------------------------------- the source video

def source_size(args: argparse.Namespace, sd) -> int:
    """--size when given; else DEFAULT_SIZE, or with --tiny the tiny model's own size."""
    if args.size is None:
        return sd.config.image_size if args.tiny else DEFAULT_SIZE
    return args.size


def probe_size(path: str | Path, images: bool = False) -> tuple[int, int]:
    """(height, width) of the frames of a video, an image or a folder of frames, from ffmpeg's header
    (nothing decoded); checks the path first (`minivid.checks.input_path`)."""
    from minivid.checks import input_path
    from minivid.video import _list_images, probe_video

    path = input_path(path, "--video")
    first = _list_images(path)[0] if path.is_dir() else path
    info = probe_video(first)
    return info.height, info.width


def read_source(args: argparse.Namespace, sd, images: bool = False) -> torch.Tensor:
    """The source clip [F, 3, H, W] in [-1, 1]: --frames frames every --stride of --video, resized to
    `source_size` (short side) and centre-cropped only to what the model needs: a multiple of the VAE's
    factor (8; the UNet runs on any latent grid). A crop is logged. images=True: an image file is one
    frame. Refused before reading when the job's tensors cannot fit in memory (`check_job_memory`).
    The effective frames and size go into the running job's record (`record_ran`)."""
    from minivid.video import IMAGE_EXTENSIONS, MAX_VIDEO_SIDE, fit, fitted_size, read_image, read_video

    size = source_size(args, sd)
    multiple = sd.config.downsample_factor
    H0, W0 = probe_size(args.video)
    h, w = fitted_size(H0, W0, size, multiple)       # the size the job will run at
    check_job_memory(sd, args.frames, h, w, args.device,
                     what=f"{args.frames} frame(s) of {w}x{h} ({W0}x{H0} at --size {size})")
    one_image = images and Path(args.video).suffix.lower() in IMAGE_EXTENSIONS    # written as PNGs only
    if not one_image and max(h, 2 * w) > MAX_VIDEO_SIDE:     # side_by_side.mp4 is two frames wide
        raise ValueError(f"{args.video}: a {W0}x{H0} source at --size {size} runs at {w}x{h}, and its side-by-side "
                         f"video ({2 * w}x{h}) is beyond H.264's {MAX_VIDEO_SIDE} px a side; use a smaller --size "
                         f"or crop the source")
    path = Path(args.video)
    if images and path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        frames = read_image(path)[None]
    else:
        frames = read_video(path, num_frames=args.frames, stride=args.stride)
    H, W = frames.shape[-2:]
    scale = size / min(H, W)
    resized = (size, max(size, round(W * scale))) if H <= W else (max(size, round(H * scale)), size)
    out = fit(frames, size, multiple=multiple, min_side=min(8, multiple), source=args.video)
    if tuple(out.shape[-2:]) != resized:
        log.warning("%s: resized to %dx%d (width x height) and centre-cropped to %dx%d, a multiple of %d",
                    args.video, resized[1], resized[0], out.shape[-1], out.shape[-2], multiple)
    record_ran(frames=int(out.shape[0]), size=list(out.shape[-2:]))
    return out


# ---------------------------------------------------------------- memory

class MemoryEstimateError(ValueError):
    """A job whose tensors cannot fit in the memory of the machine (or device)."""


def available_memory(device: str | torch.device = "cpu") -> tuple[int, int]:
    """(available, total) bytes of `device`'s memory: for the CPU /proc/meminfo's MemAvailable and
    MemTotal (elsewhere the physical memory for both), for CUDA torch.cuda.mem_get_info."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        return int(free), int(total)
    info = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    import os

    total = info.get("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return info.get("MemAvailable", total), total


def job_bytes(config, frames: int, height: int, width: int, batch: int = 2, element: int = 4) -> int:
    """A lower bound of the memory a diffusion job on `frames` frames of height×width needs beyond the
    weights: the frames in pixels (source, result and a resize copy), the UNet's skip connections and
    working tensors for `batch` (2: CFG) copies of every frame at once, the VAE decoder's full-resolution
    activations for all frames. `config`: an SDConfig or SVDConfig (its unet and vae)."""
    unet, vae = config.unet, config.vae
    f = 2 ** (len(vae.ch_mult) - 1)
    h, w = max(1, height // f), max(1, width // f)
    pixels = 3 * frames * 3 * height * width * 4
    levels = sum((unet.num_res_blocks + 1) * unet.model_channels * m * max(1, h >> i) * max(1, w >> i)
                 for i, m in enumerate(unet.channel_mult))
    unet_bytes = batch * frames * (levels + 4 * unet.model_channels * h * w) * element
    vae_bytes = frames * 3 * vae.ch * vae.ch_mult[0] * height * width * element
    return pixels + unet_bytes + vae_bytes


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GiB"


def check_job_memory(model, frames: int, height: int, width: int, device: str | torch.device, what: str = "",
                     batch: int = 2, hint: str = "use fewer --frames or a smaller --size") -> int:
    """Refuse, before allocating, a job whose `job_bytes` lower bound exceeds the memory available
    (MemoryEstimateError with the estimate, the machine's memory and `hint`). Returns the estimate."""
    import torch

    need = job_bytes(model.config, frames, height, width, batch=batch,
                     element=torch.finfo(model.dtype).bits // 8 if hasattr(model, "dtype") else 4)
    free, total = available_memory(device)
    if need > free:
        raise MemoryEstimateError(
            f"{what or f'{frames} frame(s) of {height}x{width}'} needs at least ~{gib(need)} of memory "
            f"(frames, UNet and VAE activations; weights not counted), this machine has {gib(free)} available "
            f"of {gib(total)}; {hint}")
    return need


# ---------------------------------------------------------------- handing over to a method

def method_cli(name: str) -> ModuleType:
    """The command-line glue of method `name`: the module `minivid.cli.<name>`."""
    from minivid.methods import METHODS

    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return importlib.import_module(f"minivid.cli.{name}")


def available_clis() -> dict[str, ModuleType]:
    """Method CLIs that are present in this checkout (a method without its package or glue is skipped)."""
    from minivid.methods import METHODS

    found = {}
    for name in METHODS:
        try:
            found[name] = method_cli(name)
        except ModuleNotFoundError as e:
            if e.name not in (f"minivid.methods.{name}", f"minivid.cli.{name}"):
                raise
    return found


def method_defaults(args: argparse.Namespace, prompt_hint: str = "") -> None:
    """What a method's CLI module declares, applied before any work: `DEFAULT_FRAMES` (default 8) for an
    unset --frames, `DEFAULT_CHECKPOINT_EVERY` (default 100) for an unset --checkpoint-every,
    `TAKES_PROMPT` (default True): then --prompt is required, and `TAKES_TUNED` (default False): without
    it a --tuned given to edit is refused (the method would ignore it)."""
    mod = method_cli(args.method)
    if getattr(args, "tuned", None) and not getattr(mod, "TAKES_TUNED", False):
        raise ValueError(f"--method {args.method} takes no --tuned ({args.tuned} would be ignored)"
                         + ("; I2VEdit's tuned LoRAs are given with --lora" if args.method == "i2vedit" else ""))
    if getattr(args, "frames", 0) is None:
        args.frames = getattr(mod, "DEFAULT_FRAMES", 8)
    if getattr(args, "checkpoint_every", 0) is None:
        args.checkpoint_every = getattr(mod, "DEFAULT_CHECKPOINT_EVERY", 100)
    if getattr(mod, "TAKES_PROMPT", True) and not args.prompt:
        raise ValueError(f"--method {args.method} needs --prompt{prompt_hint}")


def per_method_frames(p: argparse.ArgumentParser, clis: dict[str, ModuleType]) -> None:
    """--frames of `edit`/`tune`: unset until `method_defaults` fills in the method's DEFAULT_FRAMES; its help
    names each method's default."""
    p.set_defaults(frames=None)
    names = {"cove": "COVE", "ei2": "EI²", "tcve": "TCVE", "i2vedit": "I2VEdit"}
    defaults = ", ".join(f"{names.get(n, n)} {getattr(mod, 'DEFAULT_FRAMES', 8)}" for n, mod in clis.items())
    for action in p._actions:
        if action.dest == "frames":
            action.help = f"number of frames to read, ≥ 1 (default: the method's: {defaults})"


def run_method(args: argparse.Namespace, action: str, hint: str = "", then=None) -> int:
    """`minivid <action> --method NAME`: run `minivid.cli.<name>.<action>(args, job)` in a job
    folder of its own and write its record. `hint`: what to do instead when the method has none.
    `then(job, results) -> dict`: more work of the same job after the method's (`edit --eval`), while the
    job still holds its folder's lock and before record.json is written (once, with what it returns under
    its results); its outputs are still in the job's staging folder (`job.stage`)."""
    from minivid.jobs import Job

    try:
        mod = method_cli(args.method)
    except ModuleNotFoundError:
        mod = None
    if mod is None or not hasattr(mod, action):
        raise ValueError(f"method {args.method!r} has no {action} in this installation "
                         f"(minivid.cli.{args.method}.{action}){hint}")
    job = Job(f"{action}-{args.method}", args.out, vars(args))
    results = getattr(mod, action)(args, job) or {}
    if then is not None:
        results = {**results, **then(job, results)}
    record = job.finish(**results)
    print(f"wrote {job.dir} ({', '.join(job.record['outputs'])}); record: {record}")
    return 0


# ---------------------------------------------------------------- outputs

def write_edit(job: Job, source: torch.Tensor, edited: torch.Tensor, fps: float = 8) -> None:
    """What every edit writes: edited.mp4, grid.png (source row over edited row), side_by_side.mp4."""
    import torch

    source, edited = source.cpu(), edited.cpu()
    with job.timed("write"):
        job.write_video("edited.mp4", edited, fps=fps)
        job.write_grid("grid.png", torch.cat([source, edited]), rows=["source", "edited"])
        job.write_side_by_side("side_by_side.mp4", source, edited, fps=fps)


def tuning_summary(label: str, result, frames: torch.Tensor) -> dict:
    """Print one line about a tuning run and return its record entries (`result`: a TuneResult)."""
    done = len(result.losses)
    print(f"{label} tuning: steps {result.start_step}..{result.steps} on {len(frames)} frames "
          f"{tuple(frames.shape[-2:])}; checkpoint {result.checkpoint}")
    return {
        "checkpoint": str(result.checkpoint), "start_step": result.start_step, "steps": result.steps,
        "frames": int(frames.shape[0]), "size": list(frames.shape[-2:]),
        "loss_first": result.losses[0] if done else None, "loss_last": result.losses[-1] if done else None,
        "losses": [round(v, 6) for v in result.losses],
        "seconds_per_step": round(result.seconds / done, 4) if done else None,
        "world_size": result.extra.get("world_size", 1),
    }


# ---------------------------------------------------------------- the tuning methods' demos

def print_hints(hints: list[str]) -> None:
    """What a demo prints last: the commands that run the same job on official weights, one per line, as
    they can be pasted (placeholders in capitals: CLIP, EDITED.png, PATH; a test runs every one of them
    on tiny checkpoints, tests/test_cli_policies.py)."""
    print("With official weights (weights/README.md tells where to get them):")
    for hint in hints:
        print(f"  {hint}")


def check_demo_arguments(args: argparse.Namespace, model: str | None = None) -> None:
    """A tuning demo needs at least one sampling step, two frames and a size the tiny models take, and
    its tensors must fit in memory (`model`: the tiny preset it builds, default --model)."""
    from minivid.models import SDConfig

    if args.steps < 1 or args.frames < 2 or args.size < 16 or args.size % 16:
        raise ValueError("--steps must be at least 1, --frames at least 2 and --size a multiple of 16")
    check_job_memory_config(SDConfig.preset(model or args.model), args.frames, args.size, args.size, args.device)


def check_job_memory_config(config, frames: int, height: int, width: int, device, what: str = "") -> int:
    """`check_job_memory` for a model not built yet (its config; float32)."""
    class _Model:       # the config is all job_bytes reads
        pass

    m = _Model()
    m.config = config
    return check_job_memory(m, frames, height, width, device, what)


def fixed_batch_loss(loss_fn) -> float:
    """A tuning loss_fn(step, generator) evaluated on one fixed draw (noise, t, posterior sample), without
    gradients: the same batch before and after tuning shows whether the tuning works."""
    import torch

    with torch.no_grad():
        return float(loss_fn(0, torch.Generator().manual_seed(1234)))


def tuning_demo_results(before: float, after: float, result) -> dict:
    """The record of a tuning demo: the loss on a fixed batch before and after tuning (`result`: a TuneResult)."""
    return {
        "loss_fixed_batch_before": round(before, 6), "loss_fixed_batch_after": round(after, 6),
        "tuning_losses": [round(v, 6) for v in result.losses], "checkpoint": str(result.checkpoint),
        "note": "random weights: the edit is not meaningful",
    }
