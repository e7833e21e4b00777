"""Two-process DDP on gloo trains like one process on the same global batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_train import Synthetic, small_cfg, tiny_model  # noqa: I001 (sibling test module)

from ibllm_lab.io import atomic_save_torch, safe_torch_load
from ibllm_lab.peft import mark_trainable
from ibllm_lab.train import DistEnv, init_distributed, train_phase, trainable_state


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    env = init_distributed(torch.device("cpu"))
    try:
        assert env == DistEnv(rank, world_size, rank) and dist.get_backend() == "gloo"
        model = tiny_model()
        mark_trainable(model, "pretrain")
        cfg = small_cfg(batch_size=2, accum_iter=1)  # global batch 2 x 2 processes = 4
        train_phase(model, Synthetic(), cfg, Path(out) / "run", env=env, progress=False)
        if rank == 0:
            atomic_save_torch(trainable_state(model), Path(out) / "ddp.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_matches_single_process(tmp_path):
    mp.start_processes(
        _worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    ddp = safe_torch_load(tmp_path / "ddp.pt")
    single = tiny_model()
    mark_trainable(single, "pretrain")
    before = trainable_state(single)
    # every Synthetic sample has 8 labelled tokens, so the mean of per-process mean losses
    # equals the global mean loss and the gradients agree
    train_phase(
        single, Synthetic(), small_cfg(batch_size=4, accum_iter=1), tmp_path / "one", progress=False
    )
    after = trainable_state(single)
    assert set(ddp) == set(after)
    assert any(not torch.equal(before[k], after[k]) for k in after)
    for name, value in after.items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-4, atol=1e-6, msg=name)
