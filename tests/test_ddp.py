"""Two gloo processes on CPU train one toy epoch with DistributedDataParallel (issue #5)."""
import builtins
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from conftest import tiny_train_argv, val_score_of_checkpoint


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
    mp.spawn(ddp_worker, args=(2, free_port(), argv, str(tmp_path)), nprocs=2, join=True)
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
