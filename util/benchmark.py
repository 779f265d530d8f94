"""Benchmarks: data loading, training throughput, evaluation time. Prints numbers and writes JSON.

    python util/benchmark.py                       # CPU (or the GPU when there is one), ~5 min on 2 cores
    python util/benchmark.py --device cuda --amp bf16
    python util/benchmark.py --quick --out /tmp/b.json   # tiny sizes (the smoke test)

Everything runs on synthetic VATEX-like data written to a temporary folder (frame features of 1024 dims,
40-80 frames per video, three caption streams) and BERTs with random weights, so nothing is downloaded.
Timings are medians over repeated runs after a warm-up. Nothing here asserts a speed.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model as models                                          # noqa: E402
from basic.bigfile import write_bigfile                        # noqa: E402
from trainer import autocast_factory                           # noqa: E402
from util import bench_metrics                                 # noqa: E402
from util import data_provider as dp                           # noqa: E402
from util.distributed import resolve_device                    # noqa: E402

BERT_SIZES = {   # name: (hidden, layers, heads, vocab)
    'toy': (64, 12, 4, 500),
    'small': (256, 4, 4, 30000),
    'bert-base': (768, 12, 12, 119547),
}


def median_time(fn, repeats, device=None, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device is not None and device.type == 'cuda':
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device is not None and device.type == 'cuda':
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def synthetic_collection(folder, n_videos, dim, seed=0, roles=('src', 'tr', 'bt'), vocab=500, caps_per_video=2):
    """A BigFile of n_videos x 40-80 frames and a caption table with random token ids for `roles`."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(40, 81, size=n_videos)
    videos = [f'vid{i:05d}_000000_000010' for i in range(n_videos)]
    names = [f'{v}_{k}' for v, n in zip(videos, lengths) for k in range(n)]
    write_bigfile(folder, names, rng.standard_normal((len(names), dim), dtype=np.float32))
    video_ids = [v for v in videos for _ in range(caps_per_video)]
    tokens = {role: [np.concatenate([[101], rng.integers(104, vocab, size=rng.integers(10, 31)), [102]])
                     .astype(np.int32) for _ in video_ids] for role in roles}
    table = dp.CaptionTable([f'{v}#enc#{i % caps_per_video}' for i, v in enumerate(video_ids)], video_ids, tokens)
    return dp.FrameStore(folder), table


# ============ data ============

def bench_data(tmp, n_videos, batch_size, repeats):
    store, table = synthetic_collection(os.path.join(tmp, 'feat'), n_videos, 1024)
    rng = np.random.default_rng(1)
    results = {}
    frame_lists = [store.video2frames[v] for v in rng.choice(table.videos, size=repeats * 8)]
    rows = sum(len(f) for f in frame_lists)
    t0 = time.perf_counter()
    for frames in frame_lists:
        store.bigfile.read(frames)
    results['bigfile_rows_per_s'] = rows / (time.perf_counter() - t0)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dataset = dp.TrainDataset(table, store)
    batches = [rng.choice(len(dataset), size=batch_size, replace=False) for _ in range(repeats)]
    it = iter(batches)
    results['batch_assembly_ms'] = 1000 * median_time(lambda: dp.collate([dataset[i] for i in next(it)]),
                                                     repeats - 1)
    torch.set_num_threads(threads)
    for workers in (0, 2):
        loader = dp.make_loader(dataset, batch_size, shuffle=True, workers=workers)
        t0, n = time.perf_counter(), 0
        for k, batch in enumerate(loader):
            n += batch['index'].shape[0]
            if k + 1 >= repeats:
                break
        results[f'loader_samples_per_s_workers{workers}'] = n / (time.perf_counter() - t0)
    for key, value in results.items():
        print(f'  data  {key:36s} {value:12.1f}')
    return results


# ============ training ============

def bert_config(size):
    from transformers import BertConfig
    hidden, layers, heads, vocab = BERT_SIZES[size]
    return BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=4 * hidden, max_position_embeddings=512).to_dict()


def bench_train(tmp, device, amp, sizes, batch_sizes, steps):
    results = []
    autocast = autocast_factory(amp, device)
    for name in ('nrccr', 'mlcmr'):
        roles = ('src', 'tr', 'bt') if name == 'nrccr' else ('en', 'zh')
        batch_size = batch_sizes[name]
        store, table = synthetic_collection(os.path.join(tmp, f'train_{name}'), max(batch_size, 64), 1024,
                                            roles=roles, vocab=500)
        dataset = dp.TrainDataset(table, store, augment=name == 'mlcmr')
        batch = dp.move_to(dp.collate([dataset[i] for i in range(batch_size)]), device)
        for size in sizes:
            torch.manual_seed(0)
            cfg = models.model_config(name, bert_config=bert_config(size), visual_feat_dim=1024,
                                      **({'text_hidden_size': 768} if name == 'nrccr' else {}))
            model = models.build_model(cfg).to(device).train()
            opts = model.configure_optimizers(1e-4)
            scaler = torch.amp.GradScaler(device.type, enabled=amp == 'fp16')

            def step():
                with autocast():
                    loss, _ = model.training_loss(model(batch))
                opts['main'].zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(opts['main'])
                torch.nn.utils.clip_grad_norm_(model.main_parameters(), 2.0)
                scaler.step(opts['main'])
                scaler.update()

            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(device)
            seconds = median_time(step, steps, device)
            row = dict(model=name, bert=size, batch_size=batch_size, amp=amp, device=str(device),
                       step_seconds=seconds, samples_per_s=batch_size / seconds)
            if device.type == 'cuda':
                row['peak_gpu_gib'] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            print(f'  train {name:5s} {size:9s} batch {batch_size:3d} amp {amp:4s}: {row["samples_per_s"]:8.1f} '
                  f'samples/s ({seconds * 1000:.0f} ms/step)')
            results.append(row)
            del model, opts
    return results


# ============ evaluation ============

def bench_eval(device, quick):
    if quick:
        sizes = [(200, 20)]
    elif device.type == 'cuda':
        sizes = [(15_000, 1_500), (100_000, 10_000), (1_000_000, 100_000)]
    else:
        sizes = [(15_000, 1_500), (50_000, 5_000)]
    rows = bench_metrics.run(device, sizes)
    for r in rows:
        print(f'  eval  {r["mode"]:10s} {r["captions"]:>9,} x {r["videos"]:>7,}: {r["seconds"]:8.2f} s')
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description='MLCMR benchmarks (numbers only, no assertions)')
    p.add_argument('--device', default='auto')
    p.add_argument('--amp', default='off', choices=['off', 'fp16', 'bf16'])
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: all)')
    p.add_argument('--only', default='data,train,eval', help='comma-separated sections')
    p.add_argument('--quick', action='store_true', help='tiny sizes, for the smoke test')
    p.add_argument('--out', default='benchmark_results.json')
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    sections = set(args.only.split(','))
    report = {'machine': {'torch': torch.__version__, 'device': str(device), 'threads': torch.get_num_threads(),
                          'cpu': platform.processor() or platform.machine(), 'python': platform.python_version(),
                          'gpu': torch.cuda.get_device_name(device) if device.type == 'cuda' else None,
                          'date': time.strftime('%Y-%m-%d %H:%M')}}
    print(f'benchmark on {device} ({report["machine"]["threads"]} CPU threads, torch {torch.__version__})')
    cuda = device.type == 'cuda'
    with tempfile.TemporaryDirectory() as tmp:
        if 'data' in sections:
            report['data'] = bench_data(tmp, 64 if args.quick else 2000, 8 if args.quick else 128,
                                        3 if args.quick else 20)
        if 'train' in sections:
            sizes = ['toy'] if args.quick else list(BERT_SIZES)
            batch_sizes = ({'nrccr': 4, 'mlcmr': 4} if args.quick else
                           {'nrccr': 128, 'mlcmr': 64} if cuda else {'nrccr': 16, 'mlcmr': 16})
            report['train'] = bench_train(tmp, device, args.amp, sizes, batch_sizes, 2 if args.quick else 3)
        if 'eval' in sections:
            report['eval'] = bench_eval(device, args.quick)
    with open(args.out, 'w') as f:
        json.dump(report, f, indent=2)
    print(f'wrote {args.out}')
    return report


if __name__ == '__main__':
    main()
