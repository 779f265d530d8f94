"""Shared fixtures: a tiny toy collection with a tiny local BERT, built once per test session; a deadline on
every test and on every group of spawned ranks, so a hang fails one test with its stacks instead of stalling
the suite."""
import faulthandler
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED_DATA = REPO.parent / 'shared' / 'data'

# Small enough for seconds per epoch on 2 CPU cores, large enough for every code path
# (several captions per video, videos over 64 frames, shuffled file orders).
TINY = dict(n_train=24, n_val=8, n_test=10, captions_per_video=3, dim=32, bert_hidden=32, bert_layers=4, seed=0)

# The longest test takes under two minutes on 2 CPU cores; one still running after this is stuck.
TEST_TIMEOUT_S = int(os.environ.get('MLCMR_TEST_TIMEOUT', 600))
RANKS_TIMEOUT_S = int(os.environ.get('MLCMR_RANKS_TIMEOUT', 240))


@pytest.fixture(autouse=True)
def deadline(request):
    """Fails the test (TimeoutError, every thread's stack on stderr) if it runs past TEST_TIMEOUT_S. SIGALRM
    interrupts the main thread between bytecodes and in waits (a subprocess, a join), so the suite goes on."""
    if not hasattr(signal, 'SIGALRM') or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        faulthandler.dump_traceback(all_threads=True)
        raise TimeoutError(f'{request.node.nodeid} still running after {TEST_TIMEOUT_S} s (stacks above)')

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TEST_TIMEOUT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope='module')
def one_torch_thread():
    """One torch thread for a whole module: float sums depend on the thread count, and modules that compare a
    run with a killed one (a one-thread subprocess) need bit-equality wherever the default is not one."""
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _rank_main(rank, fn, timeout, args):
    """A spawned rank: prints its stacks and exits if it is still running after `timeout` seconds."""
    faulthandler.dump_traceback_later(timeout, exit=True)
    fn(rank, *args)
    faulthandler.cancel_dump_traceback_later()


def leave_group():
    """The end of a spawned rank that ran a DDP backward (drop the DDP wrapper first). Collectives launched during a
    backward carry a Python object of it in their thread-local state, and gloo's barrier keeps the works still
    running when it starts alive until it is freed; this barrier, waited for before basic.distributed.cleanup's
    own (an all_reduce; the main thread waits without the GIL), lets gloo's workers free them before the group is
    destroyed (docs/distributed.md, 'Leaving the process group'). Without it a rank hung about 1 run in 10."""
    import torch.distributed as tdist
    from basic import distributed as dist
    tdist.barrier()
    dist.cleanup()


def spawn_ranks(fn, args, nprocs=2, timeout=RANKS_TIMEOUT_S):
    """torch.multiprocessing.spawn(fn, args, nprocs) that cannot hang: a rank still running after `timeout`
    seconds prints its stacks and exits, which fails the test; the ranks never outlive it."""
    import torch.multiprocessing as mp
    context = mp.spawn(_rank_main, args=(fn, timeout, args), nprocs=nprocs, join=False)
    stop = time.monotonic() + timeout + 30
    try:
        while not context.join(timeout=1):
            if time.monotonic() > stop:
                pytest.fail(f'{fn.__name__}: ranks still running {timeout + 30} s after the start')
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


@pytest.fixture(scope='session')
def toy_root(tmp_path_factory):
    from util.make_toy_data import make_toy_collection
    root = tmp_path_factory.mktemp('VisualSearch')
    make_toy_collection(str(root), 'toy', **TINY)
    return str(root)


@pytest.fixture(scope='session')
def demo_run(tmp_path_factory):
    """The demo of README 'Search your own videos', once per session: generated coloured .mp4 files, their
    features (with frame times and thumbnails) and a toy MLCMR run; a dict of make_demo's paths plus root,
    feature_dir and run_dir."""
    pytest.importorskip('av', reason='PyAV is optional (requirements-optional.txt): pip install av')
    import logging
    import trainer
    from util import extract_features
    from util.make_demo_videos import COLLECTION, make_demo
    root = str(tmp_path_factory.mktemp('demo'))
    demo = make_demo(root)
    feature_dir = os.path.join(root, COLLECTION, 'FeatureData', 'tiny_clip')
    extract_features.main(['--videos', demo['video_dir'], '--out', feature_dir, '--model', demo['clip_dir'],
                           '--device', 'cpu', '--progress', '0', '--thumbnails', '1'])
    run = trainer.main(['--model', 'mlcmr', '--rootpath', root, '--collection', COLLECTION,
                        '--visual_feature', 'tiny_clip', '--bert_name', demo['bert_dir'], '--frozen', 'finetune',
                        '--masked_pooling', '1', '--text_mapping_layers', '0-32', '--visual_mapping_layers', '0-32',
                        '--visual_rnn_size', '16', '--visual_kernel_num', '8', '--batch_size', '16',
                        '--num_epochs', '15', '--learning_rate', '1e-3', '--max_violation', '--workers', '0',
                        '--device', 'cpu', '--seed', '0', '--skip_test', '1', '--cv_name', 'demo'])
    # the trainer's log handlers (stdout) outlive its main() in this process; search logs to stderr, and its
    # progress lines must not land in the JSON on stdout
    root_logger = logging.getLogger()
    for handler in [h for h in root_logger.handlers if getattr(h, '_mlcmr', False)]:
        root_logger.removeHandler(handler)
    return dict(demo, root=root, feature_dir=feature_dir, run_dir=run['run_dir'])


def tiny_train_argv(root, run_tag, *extra):
    """trainer.py arguments for a seconds-long run on the tiny collection."""
    return ['--rootpath', root, '--collection', 'toy', '--visual_feature', 'toy_feature',
            '--bert_name', os.path.join(root, 'tiny_bert'), '--layer_list', 'layer.2', 'layer.3',
            '--text_hidden_size', '32', '--video_hidden_size', '32', '--text_num_attention', '4',
            '--visual_num_attention', '4', '--text_mapping_layers', '0-48', '--visual_mapping_layers', '0-48',
            '--visual_rnn_size', '16', '--visual_kernel_num', '8', '--batch_size', '16', '--eval_batch_size', '8',
            '--workers', '0', '--device', 'cpu', '--max_violation', '--postfix', run_tag, *extra]


def val_score_of_checkpoint(path, argv):
    """Validation score of a saved checkpoint, evaluated in this one process with the run's settings."""
    import torch
    import model as models
    import trainer
    from basic import paths
    from basic import data_provider as dp
    from basic.precision import autocast_factory
    model, _ = models.load_model(path)
    args = trainer.parse_args(argv)
    data_cfg = trainer.data_cfg_from_args(args)
    tok = dp.build_tokenizer(args.bert_name, True)
    store = dp.FrameStore(paths.feature_dir(args.rootpath, args.collection, args.visual_feature))
    val = dp.EvalData(args.rootpath, data_cfg, 'val', tok, store, purpose='val')
    sims = trainer.embed_split(model, val, args.val_batch_size, torch.device('cpu'), 0,
                               autocast_factory('off', None), False)
    return model.validation_score(sims, val.cap2vid)[0]


def interrupt_after_epochs(monkeypatch, argv, epochs=1):
    """trainer.main(argv) stopped by Ctrl-C when epoch `epochs` (0-based) starts, as a user would stop it."""
    import trainer
    real_epoch, calls = trainer.train_one_epoch, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == epochs + 1:
            raise KeyboardInterrupt
        return real_epoch(*a, **k)

    monkeypatch.setattr(trainer, 'train_one_epoch', interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.main(argv)
    monkeypatch.setattr(trainer, 'train_one_epoch', real_epoch)


# Runs <module>.main(argv) and kills its own process (SIGKILL, as `kill -9`) just before the nth os.replace
# onto a path whose base name is `target`: that rename (a checkpoint's, a file moved aside, ...) never happens.
KILL_DRIVER = r'''
import importlib, json, os, signal, sys
sys.path.insert(0, sys.argv[1])
module, target, nth, argv = sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
real_replace, seen = os.replace, [0]

def replace(src, dst, *a, **k):
    if os.path.basename(str(dst)) == target:
        seen[0] += 1
        if seen[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *a, **k)

os.replace = replace
importlib.import_module(module).main(argv)
'''


def run_killed(module, argv, target, nth, tmp_path):
    """`module`.main(argv) (trainer, tester) in a subprocess killed at the nth os.replace onto `target`."""
    driver = tmp_path / 'kill_driver.py'
    driver.write_text(KILL_DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, str(driver), str(REPO), module, target, str(nth), json.dumps(argv)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
