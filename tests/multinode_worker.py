"""One process of the two-node test (tests/test_multinode.py), started by torchrun on each "node".

It joins the process group the way trainer.py does (basic.distributed.init_distributed reads the torchrun
environment), takes its rank's half of one fixed batch, gathers the embeddings of the global batch with
gradient, back-propagates under DistributedDataParallel and writes, from every rank, the averaged gradients
of the main parameters and the logged loss. The test compares them with one process on the whole batch.

    python -m torch.distributed.run --nnodes 2 --nproc_per_node 1 ... tests/multinode_worker.py ROOT OUT_DIR
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import torch  # noqa: E402

import model as models  # noqa: E402
from test_ddp import slice_batch  # noqa: E402
from test_model import mlcmr_batch, nrccr_batch, small_cfg  # noqa: E402
from basic import distributed as dist  # noqa: E402

BATCH = 8
BATCHES = {'nrccr': nrccr_batch, 'mlcmr': mlcmr_batch}


def global_batch(name):
    torch.manual_seed(1)
    return BATCHES[name](BATCH)


def fresh_model(root, name):
    """Identical weights on every rank; eval mode so BatchNorm and dropout do not depend on the batch."""
    torch.manual_seed(0)
    return models.build_model(small_cfg(root, name)).eval()


def main(root, out_dir):
    info = dist.init_distributed('cpu')
    assert info.world_size == 2 and info.backend == 'gloo', info
    rank, world = info.rank, info.world_size
    per_rank = BATCH // world
    result = {'rank': rank, 'world_size': world, 'node': os.environ.get('GROUP_RANK'),
              'local_rank': info.local_rank}
    for name in BATCHES:
        model = fresh_model(root, name)
        model.gather, model.grad_sync, model.world_size = dist.all_gather_with_grad, dist.all_reduce_mean_, world
        # as trainer.py: the discriminator has its own optimiser and is left out of DDP's reduction
        ignore = [n for n, _ in model.named_parameters() if n.startswith('discriminator.')]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        rows = torch.arange(rank * per_rank, (rank + 1) * per_rank)
        loss, logs = model.training_loss(ddp(slice_batch(global_batch(name), rows)))
        loss.backward()
        result[name] = {'grads': [p.grad.clone() for p in model.main_parameters()],
                        'logs': {k: float(v) for k, v in logs.items()}}     # logs are 0-d tensors
    torch.save(result, os.path.join(out_dir, f'rank{rank}.pt'))
    del ddp                 # nothing else may hold the group when it is destroyed
    dist.cleanup()


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])
