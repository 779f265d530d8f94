"""Device choice and torch.distributed helpers (docs/training.md, 'Distributed training').

One entry point, `init_distributed`, called first in `main` (never at import). Launched by torchrun
(`WORLD_SIZE` > 1) it starts a process group — nccl on CUDA, gloo on CPU; otherwise it starts none and every
helper below is a no-op (rank 0 of a world of 1).
"""
import collections
import gc
import os
import pickle
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: Optional[str]      # None without a process group


def resolve_device(spec='auto') -> torch.device:
    """'auto' -> cuda (the current device) if available, else cpu; 'cpu'; 'cuda'; 'cuda:N'.
    Raises ValueError (one line) for an unknown spec or a CUDA device this machine does not have."""
    spec = str(spec).strip().lower()
    if spec == 'auto':
        spec = 'cuda' if torch.cuda.is_available() else 'cpu'
    if spec == 'cpu':
        return torch.device('cpu')
    if spec != 'cuda' and not (spec.startswith('cuda:') and spec[5:].isdigit()):
        raise ValueError(f"--device {spec}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f'--device {spec}: CUDA is not available on this machine (no GPU visible, or a CPU-only '
                         'torch build); use --device cpu')
    index = torch.cuda.current_device() if spec == 'cuda' else int(spec[5:])
    if index >= torch.cuda.device_count():
        raise ValueError(f'--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible; use '
                         f'--device cuda:0 .. cuda:{torch.cuda.device_count() - 1} or --device cpu')
    return torch.device('cuda', index)


def init_distributed(device_spec='auto') -> DistInfo:
    """Read the torchrun environment (RANK, LOCAL_RANK, WORLD_SIZE). Without WORLD_SIZE, or with 1, no
    process group is created. Otherwise join the group (nccl on CUDA, gloo on CPU); on CUDA each process
    uses cuda:LOCAL_RANK and makes it the current device. Calling it again in a joined process is harmless."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size <= 1:
        return DistInfo(rank=0, local_rank=0, world_size=1, device=resolve_device(device_spec), backend=None)
    try:
        rank, local_rank = int(os.environ['RANK']), int(os.environ.get('LOCAL_RANK', '0'))
    except KeyError:
        raise ValueError(f'WORLD_SIZE={world_size} but RANK is not set; launch several processes with '
                         'torchrun --nproc_per_node=N, or unset WORLD_SIZE for one process') from None
    device = resolve_device(device_spec)
    if device.type == 'cuda':
        device = resolve_device(f'cuda:{local_rank}')
        torch.cuda.set_device(device)
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                device_id=device if backend == 'nccl' else None)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device, backend=backend)


def _active():
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if _active() else 0


def get_world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    return get_rank() == 0


def _gloo():
    return _active() and dist.get_backend() == 'gloo'


# The last collectives of a gloo group, each work with its tensors (docs/distributed.md, 'Leaving the process
# group'). A gloo worker thread lets go of a work just after its caller has returned; if that is the last C++
# reference to a tensor Python knows, the worker must take the GIL. If the main thread meanwhile holds the GIL
# destroying the group (it joins those workers) or has begun the interpreter's teardown, the rank hangs or aborts.
# While the works stay here the workers never hold the last reference (one that newer works push out was let go by
# its worker long before). cleanup() does not let them go: the group may outlive destroy_process_group (a DDP
# wrapper or a graph still holds it), and its workers with it.
_RECENT = collections.deque(maxlen=16)
_FENCE = torch.zeros(1)          # gloo's barrier: an all_reduce of zeros


def _collective(op, tensors, *args, **kwargs):
    """Run `op` (a torch.distributed collective) on `tensors` and wait for it; with gloo, keep the work and its
    tensors among the recent ones (_RECENT) so that no worker thread is left freeing them."""
    work = op(tensors, *args, async_op=True, **kwargs)
    work.wait()
    if _gloo():
        _RECENT.append((work, tensors, args))


def barrier():
    """Every rank waits here for the others. gloo: a one-element all_reduce (gloo's own barrier keeps the
    works still running when it starts alive until it is freed, which can be on a worker thread)."""
    if not _active():
        return
    if dist.get_backend() == 'nccl':           # name the device, or nccl guesses it from the rank
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        _collective(dist.all_reduce, _FENCE)


def _object_device():
    return torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else torch.device('cpu')


def _gather_rows(x):
    """[x of rank 0, x of rank 1, ...]: tensors of the same trailing shape, any number of rows each."""
    world = get_world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    _collective(dist.all_gather, sizes, torch.tensor([x.shape[0]], device=x.device))
    sizes = [int(n) for n in sizes]
    longest = max(sizes)
    padded = x if x.shape[0] == longest else torch.cat([x, x.new_zeros(longest - x.shape[0], *x.shape[1:])])
    parts = [torch.empty_like(padded) for _ in range(world)]
    _collective(dist.all_gather, parts, padded)
    return [p[:n] for p, n in zip(parts, sizes)]


def all_gather_with_grad(x):
    """Concatenation of `x` from every rank along dim 0, in rank order. The local slice is `x` itself, so it
    keeps its autograd graph: gradient flows to this rank's part only (the other slices are constants).
    Ranks may hold different numbers of rows. Identity when world_size == 1."""
    if get_world_size() == 1:
        return x
    x = x.contiguous()
    parts = _gather_rows(x.detach())
    parts[get_rank()] = x
    return torch.cat(parts)


def _to_bytes(obj):
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(_object_device())


def _from_bytes(t):
    return pickle.loads(t.cpu().numpy().tobytes())


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (picklable objects); [obj] without a process group."""
    if not _active():
        return [obj]
    return [_from_bytes(part) for part in _gather_rows(_to_bytes(obj))]


def broadcast_object(obj, src=0):
    """Rank `src`'s `obj` on every rank; `obj` itself without a process group."""
    if not _active():
        return obj
    data = _to_bytes(obj) if get_rank() == src else None
    size = torch.tensor([data.numel() if data is not None else 0], device=_object_device())
    _collective(dist.broadcast, size, src)
    if data is None:
        data = torch.empty(int(size), dtype=torch.uint8, device=_object_device())
    _collective(dist.broadcast, data, src)
    return _from_bytes(data)


def all_reduce_mean_(tensors):
    """Average each tensor over ranks, in place (e.g. the gradients of a module that is not under DDP).
    Tensors of one dtype and device travel as one flat buffer; None entries are skipped."""
    world = get_world_size()
    if world == 1:
        return
    groups = {}
    for t in tensors:
        if t is not None:
            groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        _collective(dist.all_reduce, flat)
        flat /= world
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def cleanup():
    """Leave the process group (if any), every rank together, once nothing else holds it (drop the DDP wrapper
    first). With gloo the ranks meet at a last barrier first: its tensor and those of the recent collectives are
    still held (_RECENT), so the worker threads that destroying the group joins have nothing left that needs the
    GIL."""
    if not _active():
        return
    gc.collect()        # a DDP wrapper caught in a reference cycle lets go of the group now, not at exit
    if _gloo():
        barrier()
    dist.destroy_process_group()


def broadcast_buffers_(module, src=0):
    """Copy rank `src`'s buffers (e.g. BatchNorm running statistics, which each rank updates from its
    own batches when BatchNorm is not synchronised) to every rank; no-op without a process group."""
    if get_world_size() > 1:
        for buf in module.buffers():
            _collective(dist.broadcast, buf, src)
