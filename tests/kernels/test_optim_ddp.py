"""Ranger under DistributedDataParallel: the step sees the averaged gradients and needs no sync of its own,
so 2 gloo processes on half batches match 1 process on the whole batch."""

import gc
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fer_kernels.optim import Ranger

STEPS = 8


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def _data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 5, (8,), generator=gen)


def _train(model, images, labels):
    opt = Ranger(model.parameters(), k=3, backend="cpu")
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        opt.step()


def _worker(rank, world, init_file, out_file):
    sys.path.insert(0, os.path.dirname(__file__))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        images, labels = _data()
        half = images.shape[0] // world
        model = nn.parallel.DistributedDataParallel(_model())
        _train(model, images[rank * half:(rank + 1) * half], labels[rank * half:(rank + 1) * half])
        if rank == 0:
            torch.save(model.module.state_dict(), out_file)
        # Gloo's worker threads drop their last gradient all-reduce after the rank has moved on; one that does so
        # while the interpreter ends aborts the process. The barrier returns once every rank is here, long after.
        dist.barrier()
        del model
    finally:
        # under torch 2.11 DDP sits in a reference cycle: freed by a later collection, its reducer would destroy
        # the group with the GIL held and could hang on gloo's worker thread; collected here, the group outlives it
        gc.collect()
        dist.destroy_process_group()


def test_two_gloo_processes_match_one(tmp_path):
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    single = _model()
    _train(single, *_data())
    for key, value in single.state_dict().items():
        torch.testing.assert_close(torch.load(out)[key], value, rtol=1e-5, atol=1e-6, msg=key)
