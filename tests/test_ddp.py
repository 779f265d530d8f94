"""Two gloo processes on CPU train one toy epoch with DistributedDataParallel (issue #5)."""
import builtins
import json
import os
import socket

import pytest
import torch

from conftest import leave_group, spawn_ranks, tiny_train_argv, val_score_of_checkpoint


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def ddp_worker(rank, world, port, argv, report_dir):
    """One rank: records whether all ranks hold identical weights after every optimiser step, and every
    file this process opened for writing."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    import torch.distributed as tdist
    import model as models
    import trainer

    writes, checks, built = [], [], []
    real_open, real_replace, real_build = builtins.open, os.replace, models.build_model

    def spy_open(file, mode='r', *a, **k):
        if any(c in mode for c in 'wax+'):
            writes.append(str(file))
        return real_open(file, mode, *a, **k)

    def spy_replace(src, dst, *a, **k):
        writes.append(str(dst))
        return real_replace(src, dst, *a, **k)

    def keep_model(cfg):
        built.append(real_build(cfg))
        return built[-1]

    real_step = torch.amp.GradScaler.step

    def checked_step(self, optimizer, *a, **k):
        out = real_step(self, optimizer, *a, **k)
        flat = torch.cat([p.detach().flatten() for p in built[0].parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        tdist.all_gather(gathered, flat)
        checks.append(all(torch.equal(gathered[0], g) for g in gathered))
        return out

    builtins.open, os.replace, models.build_model = spy_open, spy_replace, keep_model
    torch.amp.GradScaler.step = checked_step
    try:
        result = trainer.main(argv)
    finally:
        builtins.open, os.replace = real_open, real_replace
    with open(os.path.join(report_dir, f'rank{rank}.json'), 'w') as f:
        json.dump({'checks': checks, 'writes': writes, 'run_dir': result['run_dir']}, f)


@pytest.mark.parametrize('model_name', ['nrccr', 'mlcmr'])
def test_two_process_epoch(toy_root, tmp_path, model_name):
    argv = tiny_train_argv(toy_root, f'ddp_{model_name}', '--model', model_name, '--num_epochs', '1',
                           '--skip_test', '1', '--batch_size', '8', '--disc_type', 'strong')
    spawn_ranks(ddp_worker, (2, free_port(), argv, str(tmp_path)))
    r0, r1 = (json.load(open(tmp_path / f'rank{r}.json')) for r in (0, 1))
    steps = -(-(-(-72 // 2)) // 8)                               # 72 captions, 36 per rank, batches of 8
    assert len(r0['checks']) == len(r1['checks']) == steps
    assert all(r0['checks']) and all(r1['checks'])              # identical weights after every step
    assert r1['writes'] == []                                   # only rank 0 writes
    assert any(w.endswith('checkpoint_last.pth.tar') for w in r0['writes'])

    # validation on gathered embeddings == the same checkpoint evaluated in one process
    with open(os.path.join(r0['run_dir'], 'metrics.jsonl')) as f:
        record = json.loads(f.readline())
    score = val_score_of_checkpoint(os.path.join(r0['run_dir'], 'checkpoint_last.pth.tar'), argv)
    assert score == pytest.approx(record['score'], abs=1e-9)


def slice_batch(batch, rows):
    if isinstance(batch, dict):
        return {k: slice_batch(v, rows) for k, v in batch.items()}
    if batch.dim() == 2 and batch.dtype == torch.bool:             # same_video (B, B)
        return batch[rows][:, rows]
    return batch[rows]


def gradient_worker(rank, world, port, root, out_path):
    """Each rank sees half of one batch; embeddings are gathered with gradient and the loss of the global
    batch is scaled by the world size (model.RetrievalModel): DDP's averaged gradient must equal the
    single-process gradient of the whole batch."""
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    import torch.distributed as tdist
    import model as models
    from test_model import mlcmr_batch, small_cfg
    from basic import distributed as dist
    tdist.init_process_group('gloo', rank=rank, world_size=world)
    torch.manual_seed(0)
    model = models.build_model(small_cfg(root, 'mlcmr')).eval()     # eval: BatchNorm/dropout batch-independent
    torch.manual_seed(1)
    batch = mlcmr_batch(8)
    half = torch.arange(rank * 4, rank * 4 + 4)
    model.gather, model.world_size = dist.all_gather_with_grad, world
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    loss, logs = model.training_loss(ddp(slice_batch(batch, half)))
    loss.backward()
    if rank == 0:
        torch.save({'grads': [p.grad for p in model.main_parameters()], 'loss': float(logs['loss'])}, out_path)
    del ddp
    leave_group()


def test_global_batch_gradient_equals_single_process(toy_root, tmp_path):
    import model as models
    from test_model import mlcmr_batch, small_cfg
    out = tmp_path / 'ddp_grads.pt'
    spawn_ranks(gradient_worker, (2, free_port(), toy_root, str(out)))
    torch.manual_seed(0)
    model = models.build_model(small_cfg(toy_root, 'mlcmr')).eval()
    torch.manual_seed(1)
    loss, logs = model.training_loss(model(mlcmr_batch(8)))
    loss.backward()
    ddp = torch.load(out, weights_only=True)
    assert ddp['loss'] == pytest.approx(float(logs['loss']), rel=1e-5)
    for p, g in zip(model.main_parameters(), ddp['grads']):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6)
