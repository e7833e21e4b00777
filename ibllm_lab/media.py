"""Readers and preprocessing for real media files: the path generated and real data share.

Readers return numpy arrays in one convention per modality and raise ``ValueError`` naming
the file and the problem when a file is unreadable or mis-shaped:

* ``read_image(path) -> (H, W, 3) uint8`` (PNG, JPEG, anything PIL opens);
* ``read_audio(path, sample_rate) -> (S,) float32`` in [-1, 1], mono, resampled
  (``scipy.signal.resample_poly``) to ``sample_rate``;
* ``read_points(path) -> (P, 3 or 6) float32`` (xyz [+ rgb in [0, 1]]) from .npy, .pt or .ply
  (ASCII or binary little/big endian);
* ``read_video(path) -> (T, H, W, 3) uint8`` from .npy, a folder of frame images, or .mp4 when
  a decoder (``imageio`` with ``imageio-ffmpeg`` or ``av``) is installed;
* ``read_depth(path) -> (H, W) float32`` from .npy or a 8/16-bit PNG.

Preprocessing is modelled on ImageBind's (resize + centre crop + normalise for images and
video frames; a log-mel filterbank normalised by a mean and a standard deviation for audio;
a fixed number of points for point clouds), parameterised for small encoders. Each
preprocessing config is a dataclass that saves with the encoder (``to_dict``/``from_dict``)."""

from __future__ import annotations

import dataclasses
import math
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

# ----------------------------------------------------------------------------------------------
# Readers


def _fail(path: Path | str, problem: str) -> ValueError:
    return ValueError(f"{path}: {problem}")


def read_image(path: str | Path) -> np.ndarray:
    """An RGB image as ``(H, W, 3)`` uint8 (grey and RGBA are converted)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise _fail(path, f"not a readable image ({e})") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < 1:
        raise _fail(path, f"expected an (H, W, 3) image, got shape {arr.shape}")
    return arr


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """A PCM WAV file as ``((S, C) float32 in [-1, 1], sample_rate)``; 8/16/24/32-bit integer
    PCM via the standard library, float WAV via scipy."""
    path = Path(path)
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except FileNotFoundError:
        raise
    except (wave.Error, EOFError) as e:
        if "unknown format: 3" in str(e):  # IEEE float WAV
            return _read_float_wav(path)
        raise _fail(path, f"not a readable WAV file ({e})") from None
    if len(raw) % (channels * width):
        raise _fail(path, "truncated audio data")
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v) / float(1 << 23)).astype(np.float32)
    elif width == 4:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / 2**31
    else:
        raise _fail(path, f"unsupported sample width {width} bytes")
    return x.reshape(-1, channels), rate


def _read_float_wav(path: Path) -> tuple[np.ndarray, int]:
    from scipy.io import wavfile

    try:
        rate, x = wavfile.read(path)
    except ValueError as e:
        raise _fail(path, f"not a readable WAV file ({e})") from None
    x = np.asarray(x, dtype=np.float32)
    return (x[:, None] if x.ndim == 1 else x), int(rate)


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Polyphase resampling along the first axis (``scipy.signal.resample_poly``)."""
    if rate_in == rate_out:
        return x
    from scipy.signal import resample_poly

    g = math.gcd(int(rate_in), int(rate_out))
    return resample_poly(x, rate_out // g, rate_in // g, axis=0).astype(np.float32)


def read_audio(path: str | Path, sample_rate: int = 16000) -> np.ndarray:
    """A sound as mono ``(S,)`` float32 at ``sample_rate`` (channels are averaged)."""
    x, rate = read_wav(path)
    if x.shape[0] == 0:
        raise _fail(path, "no audio samples")
    if not np.isfinite(x).all():
        raise _fail(path, "audio contains NaN or infinite samples")
    return resample(x.mean(axis=1), rate, sample_rate)


_PLY_TYPES = {
    "char": "i1",
    "uchar": "u1",
    "short": "i2",
    "ushort": "u2",
    "int": "i4",
    "uint": "u4",
    "float": "f4",
    "double": "f8",
    "int8": "i1",
    "uint8": "u1",
    "int16": "i2",
    "uint16": "u2",
    "int32": "i4",
    "uint32": "u4",
    "float32": "f4",
    "float64": "f8",
}


def _parse_ply_header(data: bytes, path: Path) -> tuple[str, int, list[tuple[str, str]], int]:
    """(format, vertex count, vertex properties [(name, dtype)], header length in bytes)."""
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise _fail(path, "not a PLY file (missing 'ply' magic or 'end_header')")
    header_len = data.index(b"\n", end) + 1
    fmt, n_vertex, props, element = "", -1, [], None
    for line in data[:header_len].decode("ascii", "replace").splitlines():
        tok = line.split()
        if not tok:
            continue
        if tok[0] == "format":
            fmt = tok[1]
        elif tok[0] == "element":
            element = tok[1]
            if element == "vertex":
                n_vertex = int(tok[2])
            elif n_vertex < 0:
                raise _fail(path, "PLY elements before 'vertex' are not supported")
        elif tok[0] == "property" and element == "vertex":
            if tok[1] == "list":
                raise _fail(path, "list properties on vertices are not supported")
            if tok[1] not in _PLY_TYPES:
                raise _fail(path, f"unknown PLY property type {tok[1]!r}")
            props.append((tok[2], _PLY_TYPES[tok[1]]))
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian") or n_vertex < 0:
        raise _fail(path, f"unsupported PLY header (format {fmt!r}, vertices {n_vertex})")
    return fmt, n_vertex, props, header_len


def read_ply(path: str | Path) -> np.ndarray:
    """Vertices of a PLY file as ``(P, 3)`` or ``(P, 6)`` float32 (xyz [+ rgb in [0, 1]])."""
    path = Path(path)
    data = path.read_bytes()
    fmt, n, props, start = _parse_ply_header(data, path)
    names = [p for p, _ in props]
    if not {"x", "y", "z"} <= set(names):
        raise _fail(path, f"PLY vertices lack x, y, z (properties: {names})")
    if fmt == "ascii":
        rows = data[start:].decode("ascii", "replace").split("\n")[:n]
        try:
            table = np.array([r.split()[: len(props)] for r in rows], dtype=np.float64)
        except ValueError as e:
            raise _fail(path, f"malformed ASCII PLY vertex data ({e})") from None
        if table.shape != (n, len(props)):
            raise _fail(path, f"expected {n} vertices of {len(props)} values, got {table.shape}")
        cols = {name: table[:, i] for i, name in enumerate(names)}
    else:
        order = "<" if fmt == "binary_little_endian" else ">"
        dtype = np.dtype([(name, order + t) for name, t in props])
        if len(data) - start < n * dtype.itemsize:
            raise _fail(path, f"truncated binary PLY: {n} vertices need {n * dtype.itemsize} bytes")
        rec = np.frombuffer(data, dtype=dtype, count=n, offset=start)
        cols = {name: rec[name].astype(np.float64) for name in names}
    xyz = np.stack([cols["x"], cols["y"], cols["z"]], 1)
    if {"red", "green", "blue"} <= set(names):
        rgb = np.stack([cols["red"], cols["green"], cols["blue"]], 1)
        scale = 255.0 if dict(props)["red"] in ("u1", "i1") or rgb.max() > 1 else 1.0
        xyz = np.concatenate([xyz, rgb / scale], 1)
    return xyz.astype(np.float32)


def write_ply(path: str | Path, points: np.ndarray, binary: bool = True) -> None:
    """Write ``(P, 3|6)`` points (rgb in [0, 1]) as a PLY file (for tests and exports)."""
    pts = np.asarray(points, dtype=np.float32)
    has_rgb = pts.shape[1] == 6
    fmt = "binary_little_endian" if binary else "ascii"
    head = ["ply", f"format {fmt} 1.0", f"element vertex {len(pts)}"]
    head += [f"property float {c}" for c in "xyz"]
    if has_rgb:
        head += [f"property uchar {c}" for c in ("red", "green", "blue")]
    head.append("end_header")
    header = ("\n".join(head) + "\n").encode("ascii")
    rgb = (np.clip(pts[:, 3:], 0, 1) * 255).round().astype(np.uint8) if has_rgb else None
    if binary:
        fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
        fields += [(c, "u1") for c in ("red", "green", "blue")] if has_rgb else []
        rec = np.empty(len(pts), dtype=fields)
        for i, c in enumerate("xyz"):
            rec[c] = pts[:, i]
        if has_rgb:
            for i, c in enumerate(("red", "green", "blue")):
                rec[c] = rgb[:, i]
        body = rec.tobytes()
    else:
        lines = [
            " ".join(
                [f"{v:.7g}" for v in p[:3]] + ([str(int(c)) for c in rgb[i]] if has_rgb else [])
            )
            for i, p in enumerate(pts)
        ]
        body = ("\n".join(lines) + "\n").encode("ascii")
    Path(path).write_bytes(header + body)


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError) as e:
        raise _fail(path, f"not a readable .npy array ({e})") from None


def read_points(path: str | Path) -> np.ndarray:
    """A point cloud as ``(P, 3)`` or ``(P, 6)`` float32 from .npy, .pt or .ply."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".ply":
        pts = read_ply(path)
    elif suffix == ".npy":
        pts = _load_npy(path)
    elif suffix == ".pt":
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:  # torch raises several types for bad files
            raise _fail(path, f"not a readable torch tensor file ({e})") from None
        if not isinstance(obj, torch.Tensor):
            raise _fail(path, f"expected a tensor, got {type(obj).__name__}")
        pts = obj.float().numpy()
    else:
        raise _fail(path, f"unsupported point-cloud format {suffix!r} (use .npy, .pt or .ply)")
    pts = np.asarray(pts, dtype=np.float32)
    if pts.ndim != 2 or pts.shape[1] not in (3, 6) or len(pts) == 0:
        raise _fail(path, f"expected (P, 3) or (P, 6) points, got shape {pts.shape}")
    if not np.isfinite(pts).all():
        raise _fail(path, "point cloud contains NaN or infinite values")
    return pts


def read_video(path: str | Path) -> np.ndarray:
    """A clip as ``(T, H, W, 3)`` uint8 from .npy, a folder of frame images (sorted by name),
    or .mp4/.avi/.mov when a decoder is installed."""
    path = Path(path)
    if path.is_dir():
        frames = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not frames:
            raise _fail(path, "folder holds no frame images (.png/.jpg)")
        imgs = [read_image(p) for p in frames]
        if len({im.shape for im in imgs}) != 1:
            raise _fail(path, "frames differ in size")
        clip = np.stack(imgs)
    elif path.suffix.lower() == ".npy":
        clip = _load_npy(path)
    elif path.suffix.lower() in (".mp4", ".avi", ".mov", ".mkv", ".webm"):
        clip = _decode_video(path)
    else:
        raise _fail(path, f"unsupported video format {path.suffix!r}")
    if clip.ndim != 4 or clip.shape[-1] != 3 or clip.shape[0] < 1:
        raise _fail(path, f"expected (T, H, W, 3) frames, got shape {clip.shape}")
    if clip.dtype != np.uint8:
        if np.issubdtype(clip.dtype, np.floating) and clip.min() >= 0 and clip.max() <= 1:
            clip = (clip * 255).round().astype(np.uint8)
        else:
            raise _fail(path, f"expected uint8 frames or floats in [0, 1], got {clip.dtype}")
    return clip


def _decode_video(path: Path) -> np.ndarray:
    try:
        import imageio.v3 as iio  # needs imageio-ffmpeg or av for mp4
    except ImportError:
        raise _fail(
            path,
            "decoding compressed video needs a decoder: pip install imageio imageio-ffmpeg "
            "(or av), or convert the clip to a folder of PNG frames or a .npy array",
        ) from None
    try:
        return np.asarray(iio.imread(path))
    except Exception as e:  # the plugin's own error types vary
        raise _fail(path, f"could not decode video ({e})") from None


def read_depth(path: str | Path) -> np.ndarray:
    """A depth map as ``(H, W)`` float32 from .npy or an 8/16-bit grey PNG (scaled to [0, 1])."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        d = _load_npy(path)
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        try:
            with Image.open(path) as im:
                im.load()
                d = np.asarray(im)
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise _fail(path, f"not a readable depth image ({e})") from None
        if d.ndim == 3:
            raise _fail(path, f"expected a single-channel depth image, got shape {d.shape}")
        d = d.astype(np.float32) / (65535.0 if d.dtype == np.uint16 or d.max() > 255 else 255.0)
    else:
        raise _fail(path, f"unsupported depth format {path.suffix!r} (use .npy or .png)")
    d = np.asarray(d, dtype=np.float32)
    if d.ndim == 3 and d.shape[0] == 1:
        d = d[0]
    if d.ndim != 2 or min(d.shape) < 1:
        raise _fail(path, f"expected an (H, W) depth map, got shape {d.shape}")
    if not np.isfinite(d).all():
        raise _fail(path, "depth map contains NaN or infinite values")
    return d


# ----------------------------------------------------------------------------------------------
# Preprocessing configs (ImageBind's steps, small sizes)


@dataclass
class ImagePreprocess:
    """Resize the short side (bicubic), centre-crop to ``size``, scale to [0, 1] and normalise
    per channel. ImageBind: size 224, CLIP mean/std; BindLite: the world's image size."""

    size: int = 48
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ValueError(f"image size must be >= 8, got {self.size}")
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need 3 values each, std > 0")

    def __call__(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``(B, H, W, 3)`` uint8 -> ``(B, 3, size, size)`` float32."""
        x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 255.0
        x = resize_crop(x, self.size)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std


def resize_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic resize of the short side to ``size`` then centre crop: ``(B, C, H, W)``."""
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top : top + size, left : left + size]
    return x


@dataclass
class VideoPreprocess:
    """Sample ``n_frames`` uniformly, then the image preprocessing per frame."""

    n_frames: int = 8
    size: int = 32
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)

    def __post_init__(self) -> None:
        if self.n_frames < 1:
            raise ValueError(f"n_frames must be >= 1, got {self.n_frames}")
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        self._image = ImagePreprocess(self.size, self.mean, self.std)

    def __call__(self, clips: np.ndarray) -> torch.Tensor:
        """``(B, T, H, W, 3)`` uint8 -> ``(B, n_frames, 3, size, size)`` float32."""
        clips = np.asarray(clips)
        b, t = clips.shape[:2]
        idx = np.linspace(0, t - 1, self.n_frames).round().astype(int)
        frames = clips[:, idx].reshape(b * self.n_frames, *clips.shape[2:])
        x = self._image(frames)
        return x.view(b, self.n_frames, 3, self.size, self.size)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if not k.startswith("_")}


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, f_min: float, f_max: float):
    """HTK-mel triangular filters ``(n_mels, n_fft // 2 + 1)`` float32."""

    def mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def hz(m):
        return 700.0 * (10 ** (np.asarray(m) / 2595.0) - 1.0)

    bins = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = hz(np.linspace(mel(f_min), mel(f_max), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (bins[None] - lo) / (mid - lo)
    down = (hi - bins[None]) / (hi - mid)
    return np.maximum(0, np.minimum(up, down)).astype(np.float32)


def log_filterbank(n_fft: int, n_bins: int, sample_rate: int, f_min: float, f_max: float):
    """Triangular filters ``(n_bins, n_fft // 2 + 1)`` float32 with centres evenly spaced in
    log-frequency (a constant-Q-like map): a change of pitch shifts a harmonic sound's pattern
    along the bins without changing it. Each filter spans at least one FFT bin either side,
    so low filters narrower than the FFT resolution still see energy."""
    bins = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    step = bins[1]
    edges = np.geomspace(f_min, f_max, n_bins + 2)
    mid = edges[1:-1, None]
    lo = np.minimum(edges[:-2, None], mid - step)
    hi = np.maximum(edges[2:, None], mid + step)
    up = (bins[None] - lo) / (mid - lo)
    down = (hi - bins[None]) / (hi - mid)
    return np.maximum(0, np.minimum(up, down)).astype(np.float32)


AUDIO_SCALES = ("mel", "log")


@dataclass
class AudioPreprocess:
    """Crop/pad to ``seconds``, log filterbank energies, normalise by ``mean``/``std``.

    ``scale``: "mel" (HTK mel filters, ImageBind's) or "log" (``log_filterbank``: filters
    evenly spaced in log-frequency from ``f_min`` > 0). ImageBind: 16 kHz, 128 mels, 204
    frames per 2 s clip, mean -4.268, std 9.138. BindLite: 1 s, 64 filters, hop 256 (63
    frames); mean and std are measured on the training sounds."""

    sample_rate: int = 16000
    seconds: float = 1.0
    n_fft: int = 512
    hop: int = 256
    n_mels: int = 64
    f_min: float = 50.0
    f_max: float = 8000.0
    mean: float = 0.0
    std: float = 1.0
    scale: str = "mel"

    def __post_init__(self) -> None:
        if self.scale not in AUDIO_SCALES:
            raise ValueError(
                f"AudioPreprocess.scale {self.scale!r}: expected one of {AUDIO_SCALES}"
            )
        if self.scale == "log" and self.f_min <= 0:
            raise ValueError(f"scale 'log' needs f_min > 0 Hz (log of 0), got {self.f_min}")
        if self.f_max > self.sample_rate / 2 or self.f_min >= self.f_max:
            raise ValueError(
                f"need 0 <= f_min < f_max <= sample_rate / 2: {self.f_min}, {self.f_max}"
            )
        if self.std <= 0 or self.hop < 1 or self.n_fft < self.hop:
            raise ValueError("need std > 0 and 1 <= hop <= n_fft")

    @property
    def n_samples(self) -> int:
        return int(round(self.sample_rate * self.seconds))

    @property
    def n_frames(self) -> int:
        return 1 + self.n_samples // self.hop

    def log_mel(self, waves: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``(B, S)`` float waveforms -> ``(B, n_mels, n_frames)`` un-normalised log-mel."""
        x = torch.as_tensor(np.asarray(waves, dtype=np.float32))
        s = self.n_samples
        x = F.pad(x, (0, max(0, s - x.shape[1])))[:, :s]
        window = torch.hann_window(self.n_fft, dtype=x.dtype)
        spec = (
            torch.stft(
                x,
                self.n_fft,
                self.hop,
                window=window,
                center=True,
                pad_mode="constant",
                return_complex=True,
            ).abs()
            ** 2
        )  # (B, n_fft // 2 + 1, frames)
        bank = mel_filterbank if self.scale == "mel" else log_filterbank
        fb = torch.from_numpy(
            bank(self.n_fft, self.n_mels, self.sample_rate, self.f_min, self.f_max)
        )
        return torch.log(torch.einsum("mf,bft->bmt", fb, spec) + 1e-6)

    def __call__(self, waves: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``(B, S)`` waveforms -> ``(B, 1, n_mels, n_frames)`` normalised log-mel."""
        return ((self.log_mel(waves) - self.mean) / self.std).unsqueeze(1)


@dataclass
class PointPreprocess:
    """Keep ``n_points`` points (evenly spaced indices; repeat if fewer), add rgb = 0.5 when
    absent. ImageBind/Point-Bind: 8192 points; BindLite: the world's point count."""

    n_points: int = 256

    def __post_init__(self) -> None:
        if self.n_points < 1:
            raise ValueError(f"n_points must be >= 1, got {self.n_points}")

    def one(self, pts: np.ndarray) -> np.ndarray:
        if pts.shape[1] == 3:
            pts = np.concatenate([pts, np.full_like(pts, 0.5)], 1)
        idx = np.floor(np.arange(self.n_points) * len(pts) / self.n_points).astype(int)
        return pts[idx]

    def __call__(self, clouds: np.ndarray | list[np.ndarray]) -> torch.Tensor:
        """``(B, P, 3|6)`` (or a list of clouds) -> ``(B, n_points, 6)`` float32."""
        return torch.from_numpy(np.stack([self.one(np.asarray(c)) for c in clouds])).float()


@dataclass
class DepthPreprocess:
    """Resize/crop to ``size``, normalise by ``mean``/``std`` -> ``(B, 1, size, size)``."""

    size: int = 48
    mean: float = 0.8
    std: float = 0.15

    def __post_init__(self) -> None:
        if self.std <= 0 or self.size < 8:
            raise ValueError("need std > 0 and size >= 8")

    def __call__(self, depth: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(depth, dtype=np.float32)).unsqueeze(1)
        return (resize_crop(x, self.size) - self.mean) / self.std


def config_to_dict(cfg) -> dict:
    """A preprocessing config as plain data (tuples become lists; private fields dropped)."""
    return {
        k: (list(v) if isinstance(v, tuple) else v)
        for k, v in dataclasses.asdict(cfg).items()
        if not k.startswith("_")
    }
