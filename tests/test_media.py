"""Readers round-trip their formats and reject corrupt or mis-shaped files by name."""

from __future__ import annotations

import wave

import numpy as np
import pytest
import torch
from PIL import Image

from ibllm_lab import media


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _write_wav(path, x, rate, width=2, channels=1):
    scale = {1: 127, 2: 32767, 4: 2**31 - 1}[width]
    pcm = (np.clip(x, -1, 1) * scale).round()
    if width == 1:
        data = (pcm + 128).astype(np.uint8).tobytes()
    else:
        data = pcm.astype({2: "<i2", 4: "<i4"}[width]).tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(data)


def test_image_png_and_jpeg_round_trip(tmp_path, rng):
    img = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    np.testing.assert_array_equal(media.read_image(tmp_path / "a.png"), img)
    smooth = np.repeat(np.linspace(0, 255, 30, dtype=np.uint8)[None, :, None], 20, 0).repeat(3, 2)
    Image.fromarray(smooth).save(tmp_path / "a.jpg", quality=95)
    got = media.read_image(tmp_path / "a.jpg")
    assert got.shape == (20, 30, 3) and np.abs(got.astype(int) - smooth).max() < 8
    Image.fromarray(img[..., 0]).save(tmp_path / "grey.png")
    assert media.read_image(tmp_path / "grey.png").shape == (20, 30, 3)


def test_image_corrupt_is_named(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ValueError, match="broken.png"):
        media.read_image(bad)


@pytest.mark.parametrize("width", [1, 2, 4])
def test_wav_round_trip_widths(tmp_path, width):
    t = np.arange(1600) / 16000
    x = 0.5 * np.sin(2 * np.pi * 440 * t)
    _write_wav(tmp_path / "a.wav", x, 16000, width)
    got = media.read_audio(tmp_path / "a.wav", 16000)
    assert got.shape == (1600,) and got.dtype == np.float32
    assert np.abs(got - x).max() < {1: 0.02, 2: 1e-4, 4: 1e-6}[width]


def test_wav_resample_and_stereo(tmp_path):
    t = np.arange(8000) / 8000
    x = 0.5 * np.sin(2 * np.pi * 200 * t)
    stereo = np.stack([x, x], 1).ravel()
    _write_wav(tmp_path / "s.wav", stereo, 8000, channels=2)
    got = media.read_audio(tmp_path / "s.wav", 16000)
    assert got.shape == (16000,)
    ref = 0.5 * np.sin(2 * np.pi * 200 * np.arange(16000) / 16000)
    assert np.abs(got[200:-200] - ref[200:-200]).max() < 0.01  # edges ring


def test_wav_corrupt_and_float(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(ValueError, match="bad.wav"):
        media.read_audio(tmp_path / "bad.wav")
    from scipy.io import wavfile

    x = np.linspace(-0.5, 0.5, 100, dtype=np.float32)
    wavfile.write(tmp_path / "f.wav", 16000, x)
    np.testing.assert_allclose(media.read_audio(tmp_path / "f.wav", 16000), x, atol=1e-7)


@pytest.mark.parametrize("binary", [True, False])
def test_ply_round_trip(tmp_path, rng, binary):
    pts = np.concatenate([rng.normal(size=(50, 3)), rng.random((50, 3))], 1).astype(np.float32)
    media.write_ply(tmp_path / "p.ply", pts, binary=binary)
    got = media.read_points(tmp_path / "p.ply")
    assert got.shape == (50, 6)
    np.testing.assert_allclose(got[:, :3], pts[:, :3], atol=1e-5)
    np.testing.assert_allclose(got[:, 3:], pts[:, 3:], atol=1 / 255)


def test_ply_big_endian_xyz_only(tmp_path, rng):
    pts = rng.normal(size=(7, 3)).astype(">f4")
    head = b"ply\nformat binary_big_endian 1.0\nelement vertex 7\n"
    head += b"property float x\nproperty float y\nproperty float z\nelement face 0\n"
    head += b"property list uchar int vertex_indices\nend_header\n"
    (tmp_path / "be.ply").write_bytes(head + pts.tobytes())
    np.testing.assert_allclose(media.read_points(tmp_path / "be.ply"), pts.astype(np.float32))


def test_points_npy_pt_and_errors(tmp_path, rng):
    pts = rng.normal(size=(40, 6)).astype(np.float32)
    np.save(tmp_path / "p.npy", pts)
    torch.save(torch.from_numpy(pts), tmp_path / "p.pt")
    np.testing.assert_array_equal(media.read_points(tmp_path / "p.npy"), pts)
    np.testing.assert_array_equal(media.read_points(tmp_path / "p.pt"), pts)
    np.save(tmp_path / "wrong.npy", pts[:, :4])
    with pytest.raises(ValueError, match=r"wrong.npy.*\(P, 3\) or \(P, 6\)"):
        media.read_points(tmp_path / "wrong.npy")
    media.write_ply(tmp_path / "cut.ply", pts)
    (tmp_path / "cut.ply").write_bytes((tmp_path / "cut.ply").read_bytes()[:-30])
    with pytest.raises(ValueError, match="cut.ply.*truncated"):
        media.read_points(tmp_path / "cut.ply")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="junk.npy"):
        media.read_points(tmp_path / "junk.npy")


def test_video_npy_folder_and_errors(tmp_path, rng):
    clip = rng.integers(0, 256, size=(4, 8, 10, 3), dtype=np.uint8)
    np.save(tmp_path / "v.npy", clip)
    np.testing.assert_array_equal(media.read_video(tmp_path / "v.npy"), clip)
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, f in enumerate(clip):
        Image.fromarray(f).save(frames / f"{i:03d}.png")
    np.testing.assert_array_equal(media.read_video(frames), clip)
    np.save(tmp_path / "flat.npy", clip[0])
    with pytest.raises(ValueError, match=r"flat.npy.*\(T, H, W, 3\)"):
        media.read_video(tmp_path / "flat.npy")
    (tmp_path / "c.mp4").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="c.mp4"):
        media.read_video(tmp_path / "c.mp4")


def test_depth_npy_png16_and_errors(tmp_path, rng):
    d = rng.random((12, 9)).astype(np.float32)
    np.save(tmp_path / "d.npy", d)
    np.testing.assert_array_equal(media.read_depth(tmp_path / "d.npy"), d)
    Image.fromarray((d * 65535).round().astype(np.uint16)).save(tmp_path / "d.png")
    np.testing.assert_allclose(media.read_depth(tmp_path / "d.png"), d, atol=1e-4)
    np.save(tmp_path / "rgb.npy", rng.random((4, 4, 3)))
    with pytest.raises(ValueError, match=r"rgb.npy.*\(H, W\)"):
        media.read_depth(tmp_path / "rgb.npy")


def test_preprocessing_shapes_and_normalisation(rng):
    imgs = rng.integers(0, 256, size=(2, 40, 60, 3), dtype=np.uint8)
    x = media.ImagePreprocess(size=32)(imgs)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    clips = rng.integers(0, 256, size=(2, 10, 24, 24, 3), dtype=np.uint8)
    assert media.VideoPreprocess(n_frames=4, size=16)(clips).shape == (2, 4, 3, 16, 16)
    ap = media.AudioPreprocess(mean=-2.0, std=3.0)
    waves = rng.normal(size=(3, 12000)).astype(np.float32)  # shorter than 1 s: padded
    mel = ap(waves)
    assert mel.shape == (3, 1, ap.n_mels, ap.n_frames)
    torch.testing.assert_close(mel, ((ap.log_mel(waves) + 2.0) / 3.0).unsqueeze(1))
    pts = media.PointPreprocess(n_points=16)([rng.normal(size=(40, 3)), rng.normal(size=(8, 6))])
    assert pts.shape == (2, 16, 6) and torch.all(pts[0, :, 3:] == 0.5)
    assert media.DepthPreprocess(size=16)(rng.random((2, 20, 20))).shape == (2, 1, 16, 16)


def test_log_mel_peaks_at_the_tone():
    ap = media.AudioPreprocess()
    t = np.arange(16000) / 16000
    lo = ap.log_mel(np.sin(2 * np.pi * 300 * t)[None])[0].mean(1).argmax()
    hi = ap.log_mel(np.sin(2 * np.pi * 3000 * t)[None])[0].mean(1).argmax()
    assert hi > lo + 10


def _partial_peaks(ap: media.AudioPreprocess, f0: float) -> np.ndarray:
    """Filter indices of the spectral peaks of a tone with partials 1-4 at ``f0``."""
    t = np.arange(16000) / 16000
    x = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in (1, 2, 3, 4))
    s = ap.log_mel(x[None])[0].mean(1).numpy()
    inner = np.arange(1, len(s) - 1)
    peak = (s[inner] > s[inner - 1]) & (s[inner] >= s[inner + 1]) & (s[inner] > s.max() - 6)
    return inner[peak]


def test_log_frequency_filters_shift_a_timbre_with_its_pitch():
    """``scale="log"``: raising the pitch by k filter steps moves every partial's peak by k
    filters, so a timbre's pattern is the same at every pitch; on the mel scale the spacing
    of the partials changes with the pitch."""
    log = media.AudioPreprocess(scale="log", n_fft=2048, f_min=100.0)
    mel = media.AudioPreprocess(n_fft=2048, f_min=100.0)
    step = (log.f_max / log.f_min) ** (1 / (log.n_mels + 1))  # ratio between filter centres
    base = _partial_peaks(log, 400.0)
    assert len(base) == 4
    for k in (3, 6):
        np.testing.assert_array_equal(_partial_peaks(log, 400.0 * step**k), base + k)
    spacing = [np.diff(_partial_peaks(mel, 400.0 * step**k)) for k in (0, 6)]
    assert not np.array_equal(*spacing)
    fb = media.log_filterbank(512, 64, 16000, 100.0, 8000.0)
    assert fb.shape == (64, 257) and (fb.sum(1) > 0).all()  # narrow low filters still see a bin
    with pytest.raises(ValueError, match="scale"):
        media.AudioPreprocess(scale="bark")
    with pytest.raises(ValueError, match="f_min > 0"):
        media.AudioPreprocess(scale="log", f_min=0.0)
