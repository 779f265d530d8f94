"""Stress check of a two-process run's exit (docs/distributed.md, 'Leaving the process group'); not collected by
pytest. Trains one toy epoch with two gloo ranks N times, the way tests/test_ddp.py and tests/test_mclip.py do
(or, with --model gradient, runs tests/test_ddp.py's one-backward gradient ranks), and counts the runs whose
ranks failed or are still alive 90 s after the start; for each hang, the ranks' native stacks go to
OUT/hang_<run>_<pid>.txt when py-spy is installed.

    python tests/stress_ddp_exit.py --runs 150 --model mclip --out /tmp/ddp_exit
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import torch.multiprocessing as mp  # noqa: E402

from conftest import TINY, tiny_train_argv  # noqa: E402
from test_ddp import ddp_worker, free_port, gradient_worker  # noqa: E402
from util.make_toy_data import make_toy_collection  # noqa: E402

HANG_S = 90


def build_inputs(base, model):
    """The toy collection (and, for mclip, its tiny CLIP features and text model); a function of the run number
    giving the rank function and its arguments after (rank, world, port)."""
    toy = base / 'VisualSearch'
    make_toy_collection(str(toy), 'toy', **TINY)
    if model == 'gradient':
        return lambda i: (gradient_worker, (str(toy), str(base / f'grads{i}.pt')))
    if model != 'mclip':
        return lambda i: (ddp_worker, (tiny_train_argv(str(toy), f'ddp_{model}{i}', '--model', model, '--num_epochs',
                                                       '1', '--skip_test', '1', '--batch_size', '8', '--disc_type',
                                                       'strong'), str(base / f'report{i}')))
    import test_mclip as tm                 # needs sentence-transformers (requirements-optional.txt)
    from basic.clip_encoder import ClipImageEmbedder, save_tiny_clip
    from nets import text_towers as towers
    clip = save_tiny_clip(str(base / 'tiny_clip'))
    text_model = tm.build_tiny_st(str(base / 'tiny_st'), str(toy / 'tiny_bert'))
    towers.write_alignment(text_model, ClipImageEmbedder(clip).identity)
    root = base / 'ClipSearch'
    shutil.copytree(toy / 'toy' / 'TextData', root / 'toy' / 'TextData')
    tm.write_clip_features(str(toy), str(root / 'toy' / 'FeatureData' / 'tiny_clip'), clip)
    return lambda i: (ddp_worker, (tm.mclip_argv(str(root), f'ddp_mclip{i}', text_model, '--num_epochs', '1',
                                                 '--skip_test', '1', '--batch_size', '8', '--temporal', 'transformer',
                                                 '--c2kd_w', '0.5'), str(base / f'report{i}')))


def dump_stacks(pid, path):
    spy = shutil.which('py-spy')
    if spy:
        out = subprocess.run([spy, 'dump', '--native', '--pid', str(pid)], capture_output=True, text=True).stdout
        Path(path).write_text(out)


def one_run(fn, args, out, i):
    """'ok', 'failed' (a rank raised or aborted) or 'hung' (a rank alive after HANG_S; its stacks saved, ranks
    killed)."""
    start = time.monotonic()
    ranks = mp.start_processes(fn, args=(2, free_port(), *args), nprocs=2, join=False, start_method='spawn')
    try:
        while not ranks.join(timeout=1):
            if time.monotonic() - start > HANG_S:
                for p in ranks.processes:
                    if p.is_alive():
                        dump_stacks(p.pid, out / f'hang_{i}_{p.pid}.txt')
                return 'hung'
    except Exception:                                   # a rank exited with an error
        return 'failed'
    finally:
        for p in ranks.processes:
            if p.is_alive():
                p.kill()
    return 'ok'


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--runs', type=int, default=100)
    parser.add_argument('--model', default='mclip', choices=['mclip', 'nrccr', 'mlcmr', 'gradient'])
    parser.add_argument('--out', default=os.path.join(tempfile.gettempdir(), 'ddp_exit'))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix='ddp_exit'))
    try:
        run_of = build_inputs(base, args.model)
        counts = {'ok': 0, 'failed': 0, 'hung': 0}
        for i in range(args.runs):
            (base / f'report{i}').mkdir()
            start = time.monotonic()
            outcome = one_run(*run_of(i), out, i)
            counts[outcome] += 1
            print(f'run {i + 1}/{args.runs}: {outcome} in {time.monotonic() - start:.1f} s | {counts}', flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f'{args.model}: {counts["hung"]} hung, {counts["failed"]} failed, {counts["ok"]} ok of {args.runs} runs')


if __name__ == '__main__':
    main()
