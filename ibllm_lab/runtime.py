"""Run-time switches shared by the library, the notebooks and the tests.

``profile()`` is the one switch between the quick profile (tests, nbval) and the full
profile (``make run``): it reads the environment variable ``IBLLM_PROFILE``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

PROFILES = ("quick", "full")


def profile() -> str:
    """Return ``"quick"`` or ``"full"`` from ``IBLLM_PROFILE`` (default ``"full"``)."""
    value = os.environ.get("IBLLM_PROFILE", "full").strip().lower()
    if value not in PROFILES:
        raise ValueError(f"IBLLM_PROFILE={value!r}: expected one of {PROFILES}")
    return value


def is_quick() -> bool:
    return profile() == "quick"


def data_dir() -> Path:
    """Root for generated and cached data: ``IBLLM_DATA`` or ``<repo>/data``."""
    env = os.environ.get("IBLLM_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "data"


def default_device() -> torch.device:
    """CUDA if present, else Apple MPS, else CPU. Library code takes devices as arguments;
    this is only the default that entry points (CLI, notebooks) pass in."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
