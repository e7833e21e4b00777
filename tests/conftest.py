"""Test-session settings shared by every test file.

Two shared cores: torch's intra-op threads spin-wait under load, so the suite runs torch
single-threaded (measured: test_generation 69 s with 2 threads under load, 5 s with 1).
The quick profile is the default for anything the tests run.
"""

import os

os.environ.setdefault("IBLLM_PROFILE", "quick")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
