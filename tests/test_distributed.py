"""basic/distributed.py: single-process no-ops, device resolution, and a real 2-process gloo group."""
import json
import os
import socket

import pytest
import torch
import torch.distributed as tdist

from basic import distributed as dist
from conftest import spawn_ranks

TORCHRUN_VARS = ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')


@pytest.fixture
def no_torchrun_env(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize('world_size', [None, '1'])
def test_single_process_has_no_group(no_torchrun_env, monkeypatch, world_size):
    if world_size is not None:
        monkeypatch.setenv('WORLD_SIZE', world_size)
    info = dist.init_distributed('cpu')
    assert info == dist.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device('cpu'), backend=None)
    assert not tdist.is_initialized()
    assert dist.is_main() and dist.get_rank() == 0 and dist.get_world_size() == 1
    dist.barrier()
    x = torch.randn(3, 2, requires_grad=True)
    assert dist.all_gather_with_grad(x) is x
    grads = [torch.ones(2), None, torch.full((2, 2), 3.0)]
    dist.all_reduce_mean_(grads)
    assert torch.equal(grads[0], torch.ones(2)) and torch.equal(grads[2], torch.full((2, 2), 3.0))
    assert dist.all_gather_object({'a': 1}) == [{'a': 1}]
    assert dist.broadcast_object('x') == 'x'
    dist.cleanup()


def test_resolve_device():
    assert dist.resolve_device('cpu') == torch.device('cpu')
    assert dist.resolve_device('auto').type == ('cuda' if torch.cuda.is_available() else 'cpu')
    with pytest.raises(ValueError, match='expected auto, cpu, cuda or cuda:N'):
        dist.resolve_device('gpu0')
    with pytest.raises(ValueError, match='use --device cpu'):
        dist.resolve_device(f'cuda:{torch.cuda.device_count()}')    # one past the last device, or no CUDA


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message on a machine without CUDA')
def test_cuda_unavailable_message():
    with pytest.raises(ValueError) as e:
        dist.resolve_device('cuda')
    assert 'CUDA is not available' in str(e.value) and '--device cpu' in str(e.value) and '\n' not in str(e.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_resolve_cuda_device():
    assert dist.resolve_device('cuda') == torch.device('cuda', torch.cuda.current_device())
    assert dist.resolve_device('cuda:0') == torch.device('cuda', 0)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def worker(rank, port, out_dir):
    """One of two gloo ranks. Rank r holds r+2 rows x_r = (r+1) * [[1, 2], [3, 4], ...]."""
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), WORLD_SIZE='2', RANK=str(rank),
                      LOCAL_RANK=str(rank))
    info = dist.init_distributed('cpu')
    try:
        assert (info.rank, info.world_size, info.backend, info.device) == (rank, 2, 'gloo', torch.device('cpu'))
        assert dist.is_main() == (rank == 0) and dist.get_world_size() == 2
        # rank 0: [[1, 2], [3, 4]]; rank 1: 2 * [[1, 2], [3, 4], [5, 6]] -> 5 rows gathered (uneven on purpose)
        x = ((rank + 1) * torch.arange(1.0, 2 * (rank + 2) + 1).view(rank + 2, 2)).requires_grad_()
        y = dist.all_gather_with_grad(x)
        weights = torch.arange(1.0, 11.0).view(5, 2)              # row k of y weighted by [2k+1, 2k+2]
        (y * weights).sum().backward()
        # reduce-mean of [g0, g1] with g0 = [1, 2, 3] and g1 = [3, 6, 9] -> [2, 4, 6]; a None is skipped
        grads = [torch.tensor([1.0, 2.0, 3.0]) * (1 + 2 * rank), None, torch.full((2, 2), float(rank))]
        dist.all_reduce_mean_(grads)
        record = {'y': y.tolist(), 'grad': x.grad.tolist(), 'mean': grads[0].tolist(), 'mean2': grads[2].tolist(),
                  'objects': dist.all_gather_object({'rank': rank, 'text': 'ab' * 500 * rank}),   # uneven sizes
                  'tensors': [t.tolist() for t in dist.all_gather_object(torch.full((rank + 1,), rank + 0.5))],
                  'broadcast': dist.broadcast_object(f'from {rank} ' * (rank + 1) * 100, src=1)}
        dist.barrier()
        with open(os.path.join(out_dir, f'rank{rank}.json'), 'w') as f:
            json.dump(record, f)
    finally:
        dist.cleanup()


def test_two_process_gloo(tmp_path):
    spawn_ranks(worker, (free_port(), str(tmp_path)))
    r0, r1 = (json.loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1))
    gathered = [[1, 2], [3, 4], [2, 4], [6, 8], [10, 12]]
    assert r0['y'] == r1['y'] == gathered
    # each rank's gradient is its own rows of the weights only: rank 0 rows 0-1, rank 1 rows 2-4
    assert r0['grad'] == [[1, 2], [3, 4]]
    assert r1['grad'] == [[5, 6], [7, 8], [9, 10]]
    assert r0['mean'] == r1['mean'] == [2, 4, 6]
    assert r0['mean2'] == r1['mean2'] == [[0.5, 0.5], [0.5, 0.5]]
    assert r0['objects'] == r1['objects'] == [{'rank': 0, 'text': ''}, {'rank': 1, 'text': 'ab' * 500}]
    assert r0['tensors'] == r1['tensors'] == [[0.5], [1.5, 1.5]]
    assert r0['broadcast'] == r1['broadcast'] == 'from 1 ' * 200
