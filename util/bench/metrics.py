"""Timing of the exact retrieval metrics (evaluation.compute_metrics*, docs/evaluation.md). Prints; asserts nothing.

    python util/bench/metrics.py                                   # CPU; adds CUDA sizes when a GPU is present
    python util/bench/metrics.py --device cuda --sizes 1000000x100000 --dim 512
    python util/bench/metrics.py --json bench_metrics.json

Galleries are synthetic: unit-norm random video embeddings and N_c / N_v captions per video, each its video's
embedding plus noise (so ranks spread like a trained model's), captions in shuffled order.
'matrix' rows time compute_metrics on a precomputed similarity matrix; 'embeddings' rows time
compute_metrics_from_embeddings, which also recomputes every similarity twice (t2v and v2t passes).
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from evaluation import compute_metrics, compute_metrics_from_embeddings  # noqa: E402

CPU_SIZES = ((15_000, 1_500), (100_000, 10_000))
CUDA_SIZES = ((15_000, 1_500), (100_000, 10_000), (1_000_000, 100_000))
# the matrix path is timed only where the float32 matrix fits comfortably: 1 GiB on CPU, 8 GiB on a GPU
MATRIX_MAX_ELEMENTS = {'cpu': 1 << 28, 'cuda': 1 << 31}


def make_gallery(num_captions, num_videos, dim, device, seed=0):
    """(text (N_c, D), video (N_v, D), cap2vid (N_c,)) on `device`, generated there (no host copy)."""
    g = torch.Generator(device=device).manual_seed(seed)
    video = torch.nn.functional.normalize(torch.randn(num_videos, dim, generator=g, device=device), dim=1)
    cap2vid = torch.arange(num_captions, device=device) % num_videos
    cap2vid = cap2vid[torch.randperm(num_captions, generator=g, device=device)]
    # signal 0.2 against unit noise: about a third of the captions rank their video first at 1,500 videos
    text = 0.2 * video[cap2vid] + torch.randn(num_captions, dim, generator=g, device=device) / dim ** 0.5
    return torch.nn.functional.normalize(text, dim=1), video, cap2vid


def _timed(fn, device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def run(device, sizes, dim=256, matrix=True, seed=0):
    """Time both entry points on each (num_captions, num_videos) in `sizes`; one dict per measurement."""
    device = torch.device(device)
    results = []
    if device.type == 'cuda':   # kernels and the allocator warm up outside the timings
        text, video, cap2vid = make_gallery(2000, 200, dim, device, seed)
        compute_metrics(text @ video.T, cap2vid)
        compute_metrics_from_embeddings(text, video, cap2vid)
    for num_captions, num_videos in sizes:
        text, video, cap2vid = make_gallery(num_captions, num_videos, dim, device, seed)
        row = dict(device=str(device), threads=torch.get_num_threads(), captions=num_captions, videos=num_videos)
        if matrix and num_captions * num_videos <= MATRIX_MAX_ELEMENTS.get(device.type, 1 << 28):
            sims = text @ video.T
            seconds, m = _timed(lambda: compute_metrics(sims, cap2vid), device)
            results.append(dict(row, mode='matrix', seconds=seconds, sumr=m['sumr']))
            del sims
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        seconds, m = _timed(lambda: compute_metrics_from_embeddings(text, video, cap2vid), device)
        extra = {'peak_gpu_gib': torch.cuda.max_memory_allocated(device) / 2 ** 30} if device.type == 'cuda' else {}
        results.append(dict(row, mode='embeddings', dim=dim, seconds=seconds, sumr=m['sumr'], **extra))
        del text, video, cap2vid
    return results


def _print(rows):
    for r in rows:
        extra = f"  peak GPU {r['peak_gpu_gib']:.1f} GiB" if 'peak_gpu_gib' in r else ''
        dim = f" D={r['dim']}" if 'dim' in r else ''
        print(f"{r['device']:>6} threads={r['threads']:<2} {r['mode']:<10} {r['captions']:>9,} x {r['videos']:<8,}"
              f"{dim:<7} {r['seconds']:8.3f} s  (sumr {r['sumr']:.1f}){extra}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='auto', help='auto (CPU, plus CUDA when present), cpu or cuda[:N]')
    parser.add_argument('--sizes', nargs='+', default=None,
                        help='galleries as CAPTIONSxVIDEOS; default 15000x1500 100000x10000 (CUDA also 1000000x100000)')
    parser.add_argument('--dim', type=int, default=256, help='embedding size (default 256)')
    parser.add_argument('--json', default=None, help='also write all measurements to this JSON file')
    args = parser.parse_args(argv)
    sizes = [tuple(int(x) for x in s.lower().split('x')) for s in args.sizes] if args.sizes else None
    devices = [args.device] if args.device != 'auto' else ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])

    rows = []
    for device in devices:
        if device == 'cpu':
            # the 2-second target is for the VATEX-test size on one core
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            rows += run('cpu', [(15_000, 1_500)], dim=args.dim)
            torch.set_num_threads(threads)
            _print(rows)
            new = run('cpu', sizes or CPU_SIZES, dim=args.dim)
        else:
            new = run(device, sizes or CUDA_SIZES, dim=args.dim)
        _print(new)
        rows += new
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)


if __name__ == '__main__':
    main()
