"""Runs a check in `world` gloo processes on 127.0.0.1 (torch.multiprocessing spawn) and fails the
calling test with every rank's traceback; a rank that hangs is stopped after `timeout` s."""
import os
import socket
import traceback
import warnings

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, reports):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from helpers import poison

    poison()
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        fn(rank, world, *args)
        reports.put(f"ok {rank}")
    except BaseException:  # noqa: BLE001 - reported to the parent
        reports.put(f"rank {rank}:\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            import gc

            gc.collect()         # every rank's collectives (FSDP2's hooks included) done first
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()


def run_ranks(fn, world, *args, timeout=300):
    """fn(rank, world, *args) on each of `world` ranks; asserts every rank reported success."""
    ctx = mp.get_context("spawn")
    reports = ctx.SimpleQueue()
    procs = mp.start_processes(_worker, args=(world, _free_port(), fn, args, reports), nprocs=world,
                               start_method="spawn", join=False)
    for p in procs.processes:
        p.join(timeout=timeout)
    for p in procs.processes:
        if p.is_alive():        # a hang: stop it, and the missing report fails the test
            p.terminate()
    got = []
    while not reports.empty():
        got.append(reports.get())
    failures = [r for r in got if not r.startswith("ok ")]
    assert not failures, "\n".join(failures)
    assert sorted(got) == [f"ok {r}" for r in range(world)], got      # every rank checked its results
    crashed = [(i, p.exitcode) for i, p in enumerate(procs.processes) if p.exitcode != 0]
    if crashed:   # after reporting: a crash in torch.distributed's teardown, not in what is tested
        warnings.warn(f"ranks {crashed} exited abnormally after their checks passed (teardown)")
