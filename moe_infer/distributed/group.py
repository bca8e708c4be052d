"""The job's process group and the collectives of the multi-rank path.

Owns joining the default process group (`init_distributed`: the group that exists, or one made
from torchrun's or the deepspeed launcher's environment), destroying the group it made at exit,
and running a collective so that a failure names the rank, the layer and the collective
(`ParallelError`). Not owned: what is exchanged (`moe_infer.distributed.parallel`, `.shard`).
"""

from __future__ import annotations

import atexit
import datetime
import os

import torch
import torch.distributed as dist
from torch import Tensor

from moe_infer.errors import ConfigError


class ParallelError(RuntimeError):
    """A collective of the parallel MoE path failed: another rank failed, left or timed out."""


def launched_by_deepspeed() -> bool:
    """The deepspeed launcher sets CROSS_RANK/LOCAL_SIZE for its workers; torchrun sets
    TORCHELASTIC_RUN_ID instead."""
    return "CROSS_RANK" in os.environ and "LOCAL_SIZE" in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ


def init_distributed(*, backend: str | None = None, timeout: datetime.timedelta | None = None) -> tuple[int, int]:
    """Join the job's default process group (created here if nobody did yet); returns (rank, world size).

    Uses the group that already exists (the user's, DeepSpeed's, Accelerate's); otherwise reads the
    launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): `deepspeed.init_distributed`
    when the deepspeed launcher started the job, `torch.distributed.init_process_group` otherwise.
    `backend` defaults to nccl when CUDA is available, gloo elsewhere.
    """
    if not dist.is_available():
        raise RuntimeError("MoEConfig.parallel needs torch.distributed, which this torch build does not have")
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ConfigError(
                "MoEConfig.parallel needs a multi-process job: launch with `torchrun --nproc-per-node N script.py` "
                "or `deepspeed --num_gpus N script.py`, or call torch.distributed.init_process_group() before "
                "wrapping (RANK and WORLD_SIZE are not set)"
            )
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl" and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        if launched_by_deepspeed():
            import deepspeed

            kwargs = {"timeout": timeout} if timeout is not None else {}
            deepspeed.init_distributed(dist_backend=backend, **kwargs)
        else:
            kwargs = {"timeout": timeout} if timeout is not None else {}
            dist.init_process_group(backend, **kwargs)
        # A group left alive at interpreter exit can abort the process (gloo's worker threads still
        # hold work when C++ statics are torn down: "terminate called without an active exception",
        # SIGABRT after a successful run). The group created here is destroyed while Python is alive.
        atexit.register(_destroy_group_at_exit)
    return dist.get_rank(), dist.get_world_size()


def _destroy_group_at_exit() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # exiting anyway; a failed peer may have left the group unusable
            pass


def collective(what: str, layer_idx: int | None, fn, *args, **kwargs):
    """Run one collective; a failure names the rank, the layer and the collective."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # gloo and nccl raise RuntimeError/DistBackendError subclasses
        where = f" in MoE layer {layer_idx}" if layer_idx is not None else ""
        raise ParallelError(
            f"rank {dist.get_rank()}/{dist.get_world_size()}: {what}{where} failed; another rank probably "
            f"failed, left the job or timed out ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from err


def all_to_all(rows: Tensor, send_counts: list[int], recv_counts: list[int], what: str, layer_idx: int) -> Tensor:
    """all_to_all_single along dim 0 with the given row counts per rank."""
    out = rows.new_empty((sum(recv_counts), *rows.shape[1:]))
    collective(what, layer_idx, dist.all_to_all_single, out, rows.contiguous(), recv_counts, send_counts)
    return out
