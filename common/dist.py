"""Distributed helpers: one setup for torchrun and plain runs, rank-0 I/O, gathering results.

Under torchrun (RANK/LOCAL_RANK/WORLD_SIZE set) this starts a process group, NCCL on CUDA and
gloo on the CPU; as a plain process it is a world of one and every collective is a no-op.
"""
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def setup(device_arg="auto"):
    """Return (rank, world_size, device); start the process group under torchrun. --device cuda
    without CUDA is refused (a paper run would grind on the CPU unnoticed); auto says it falls
    back."""
    from common.utils import UserError  # common.utils imports this module
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() and device_arg in ("auto", "cuda")
    if device_arg == "cuda" and not use_cuda:
        why = ("this PyTorch is a CPU-only build" if torch.version.cuda is None
               else "check the driver and CUDA_VISIBLE_DEVICES")
        raise UserError(f"--device cuda: no CUDA device available ({why}); --device cpu runs on "
                        f"the CPU")
    if device_arg == "auto" and not use_cuda and rank() == 0:
        print("--device auto: no CUDA device, running on the CPU", flush=True)
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size() > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank(), world_size(), device


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def rank():
    """This process's rank: the process group's, or torchrun's RANK before the group starts."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size():
    """The number of ranks: the process group's, or torchrun's WORLD_SIZE before it starts (the
    plan of --dry-run counts them); 1 for a plain process."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def is_main():
    return rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t):
    """Mean of a tensor over ranks (in place on a copy)."""
    if not dist.is_initialized():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def broadcast_buffers(model):
    """Rank 0's buffers (BatchNorm statistics) on every rank. DDP broadcasts them before each
    forward, then every rank updates its copy with its own batch: without this, ranks would evaluate
    slightly different models, none of them exactly the one rank 0 saves."""
    if dist.is_initialized():
        for b in model.buffers():
            dist.broadcast(b, 0)


def all_gather_cat(t):
    """Every rank's `t` (same shape on all ranks) concatenated along dim 0, in rank order, without
    gradient (MoCo's concat_all_gather); `t` itself without a process group."""
    if not dist.is_initialized():
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def gather_objects(obj):
    """List of every rank's `obj` (picklable), in rank order; [obj] without a process group."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard_indices(n):
    """This rank's share of range(n) for evaluation: rank r takes r, r + world, ... and nothing is
    padded, so gathering the shards gives each sample exactly once (DistributedSampler would
    repeat samples to even out the shards and bias the metric)."""
    return list(range(rank(), n, world_size()))


def convert_sync_bn(model, device):
    """SyncBatchNorm under multi-GPU DDP (as SimSiam/MoCo); plain BN elsewhere (SyncBN is
    CUDA-only)."""
    if dist.is_initialized() and device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def ddp(module, device):
    """`module` in DistributedDataParallel under torchrun (gradients averaged over ranks in
    backward); `module` itself in a world of one."""
    if world_size() == 1:
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda"
                                   else None)


def train_loader(dataset, per_rank, *, workers, seed, device, collate_fn=None):
    """(loader, sampler) over this rank's share of every epoch. The sampler reshuffles by
    (seed, epoch): call sampler.set_epoch(epoch) before each epoch. The last incomplete batch is
    dropped, so every rank runs the same number of steps."""
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size(), rank=rank(),
                                                  shuffle=True, seed=seed, drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=per_rank, sampler=sampler,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         drop_last=True, collate_fn=collate_fn)
    return loader, sampler
