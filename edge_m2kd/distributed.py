"""Running a step on several processes with PyTorch's own engine (torchrun + DDP).

Under `torchrun --nproc_per_node N -m edge_m2kd add-classes ...` every rank builds the same
learner and teachers, trains the student under DistributedDataParallel on its share of each
global batch, and computes the rest of the step (pruning, herding) identically; only rank 0
writes the workspace, and the others wait at a barrier so none reads a half-written one.
Without torchrun (no WORLD_SIZE in the environment) every function here is a no-op.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


def init_from_env(device: str = "auto") -> bool:
    """Join the process group torchrun describes; True when running distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=10))
    return True


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def wrap(model: nn.Module, device: torch.device, sync_batchnorm: bool = False) -> nn.Module:
    """DDP around the student when distributed. Unused-parameter search is on because the
    auxiliary heads take no part in the loss for methods without them. `sync_batchnorm`
    computes BatchNorm statistics over the global batch (CUDA/NCCL only in PyTorch)."""
    if world()[1] == 1:
        return model
    if sync_batchnorm:
        if device.type != "cuda":
            from edge_m2kd.errors import UserError

            raise UserError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm runs on NCCL); drop it on CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index or 0] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def sum_across_ranks(values: list[float]) -> list[float]:
    if world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def sync_buffers(model: nn.Module) -> None:
    """BatchNorm statistics differ per rank after the last batch; take rank 0's everywhere."""
    if world()[1] == 1:
        return
    for b in model.buffers():
        dist.broadcast(b, 0)


def parameter_digests(model: nn.Module) -> list[str]:
    """Every rank's digest of the student's parameters, gathered on all ranks: the ranks
    must agree bit for bit before rank 0 commits what it holds."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    digest = h.hexdigest()
    if world()[1] == 1:
        return [digest]
    out: list[str] = [""] * world()[1]
    dist.all_gather_object(out, digest)
    return out
