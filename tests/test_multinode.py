"""Two "nodes" on one machine: two torchrun launchers (--nnodes 2, one process each, gloo over loopback)
rendezvous, and DDP's averaged gradient with negatives gathered across the nodes equals the single-process
gradient of the global batch, for both models (docs/distributed.md). Every wait is bounded."""
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

import multinode_worker as worker

TIMEOUT_S = 240          # both launchers together; a healthy run takes seconds to a minute on 2 busy cores


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def launcher(node_rank, rendezvous, port, root, out_dir):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2', '--nproc_per_node', '1',
           '--max_restarts', '0', '--monitor_interval', '1']
    if rendezvous == 'c10d':     # what a cluster uses: any node may host the store at the endpoint
        cmd += ['--rdzv_backend', 'c10d', '--rdzv_endpoint', f'127.0.0.1:{port}', '--rdzv_id', 'mlcmr_test',
                '--rdzv_conf', 'join_timeout=120,read_timeout=120']
    else:                        # static: node 0 hosts at master_addr:master_port, ranks by --node_rank
        cmd += ['--node_rank', str(node_rank), '--master_addr', '127.0.0.1', '--master_port', str(port)]
    cmd += [worker.__file__, root, str(out_dir)]
    env = {k: v for k, v in os.environ.items()
           if k not in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'GROUP_RANK')}
    env.update(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    if any(name == 'lo' for _, name in socket.if_nameindex()):
        env['GLOO_SOCKET_IFNAME'] = 'lo'       # keep gloo on loopback whatever the hostname resolves to
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def run_two_nodes(rendezvous, root, out_dir):
    port = free_port()
    nodes = [launcher(r, rendezvous, port, root, out_dir) for r in (0, 1)]
    outputs = []
    try:
        for p in nodes:
            outputs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f'two-node run ({rendezvous}) did not finish within {TIMEOUT_S} s')
    for r, (p, out) in enumerate(zip(nodes, outputs)):
        assert p.returncode == 0, f'node {r} exited {p.returncode}:\n{out[-3000:]}'


@pytest.mark.parametrize('rendezvous', ['c10d', 'static'])
def test_two_nodes_match_the_single_process_global_batch(toy_root, tmp_path, rendezvous):
    run_two_nodes(rendezvous, toy_root, tmp_path)
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in (0, 1)]
    assert [(r['rank'], r['world_size'], r['local_rank']) for r in ranks] == [(0, 2, 0), (1, 2, 0)]
    assert sorted(r['node'] for r in ranks) == ['0', '1']      # one process on each launcher

    for name in worker.BATCHES:
        model = worker.fresh_model(toy_root, name)
        loss, logs = model.training_loss(model(worker.global_batch(name)))
        logs = {k: float(v) for k, v in logs.items()}       # 0-d tensors
        loss.backward()
        expected = [p.grad for p in model.main_parameters()]
        for r in ranks:
            got = r[name]['grads']
            assert len(got) == len(expected)
            for g, e in zip(got, expected):
                assert torch.allclose(g, e, rtol=1e-4, atol=1e-6), name
        if name == 'mlcmr':      # every term is over the gathered global batch
            for r in ranks:
                assert r[name]['logs']['loss'] == pytest.approx(logs['loss'], rel=1e-5)
        else:                    # NRCCR's generator term is each rank's own mean; the rest is global
            for key in ('tri_src', 'tri_trans', 'dtl', 'back_trans', 'feat'):
                for r in ranks:
                    assert r[name]['logs'][key] == pytest.approx(logs[key], rel=1e-5), key
            gen = sum(r[name]['logs']['gen'] for r in ranks) / 2
            assert gen == pytest.approx(logs['gen'], rel=1e-5)
    # the test is not vacuous: the gradient is non-zero
    assert any(float(g.abs().sum()) > 0 for g in ranks[0]['mlcmr']['grads'])
