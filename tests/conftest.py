"""Shared pytest setup: one BLAS thread per process (2-core CI, bit-exact CPU comparisons) and a small
synthetic data set written once per session."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported by any test module

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory):
    """data.make_synthetic with 24 training and 4 test images (caption + choice record each)."""
    import data

    root = tmp_path_factory.mktemp("synthetic")
    data.make_synthetic(root, n_train=24, n_test=4)
    return root


def run_on_gloo_ranks(worker, world: int, *args):
    """Run `worker(rank, world, *args)` in `world` spawned processes joined by a gloo process group."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gloo_rank, args=(worker, world, port, args), nprocs=world)


def _gloo_rank(rank, worker, world, port, args):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # the ranks share the cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        worker(rank, world, *args)
        dist.barrier()  # no rank tears gloo down while another still has messages in flight to it
    finally:
        dist.destroy_process_group()


def wrap_up_down(model, mode: str):
    """A two-layer test model (`up`, `down`) under FSDP2 (each layer sharded) or DDP; returns the module to call."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    if mode == "fsdp":
        fully_shard(model.up)
        fully_shard(model.down)
        return model
    return DistributedDataParallel(model)
