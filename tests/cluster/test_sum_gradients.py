"""`sum_gradients` on a real two-process gloo group (torch.multiprocessing, 127.0.0.1)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.timeout(120)


def _rank(rank: int, port: int, out: dict) -> None:
    from aios.cluster.session import sum_gradients

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        params = [torch.nn.Parameter(torch.zeros(2, 3)) for _ in range(3)]
        params[0].grad = torch.full((2, 3), float(rank + 1))  # both ranks: summed
        if rank == 1:
            params[1].grad = torch.arange(6.0).reshape(2, 3)  # only rank 1: its gradient, on both
        flat = None
        for _ in range(2):  # the buffer is reused
            flat = sum_gradients(params, flat)
        out[rank] = [None if p.grad is None else p.grad.tolist() for p in params]
    finally:
        dist.destroy_process_group()


def test_gradients_are_summed_and_one_no_rank_has_stays_none():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(port, out), nprocs=2, join=True)
        results = dict(out)
    for rank in (0, 1):  # the second call sums the first call's sums again
        first, second, third = results[rank]
        assert first == [[6.0] * 3] * 2  # (1 + 2) + (1 + 2)
        assert second == [[0.0, 2.0, 4.0], [6.0, 8.0, 10.0]]  # rank 1's only, then its sum on both ranks, twice
        assert third is None  # no rank had one: no gradient, not zeros
