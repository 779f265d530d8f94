"""Benchmark of the data path, the training step, evaluation encoding and metrics, with the model-FLOPs
utilisation (MFU) of training and encoding. Prints numbers and writes JSON; asserts nothing.

    python util/benchmark.py                                # CPU, plus CUDA when present (minutes on 2 CPU cores)
    python util/benchmark.py --device cuda --out bench_gpu.json
    python util/benchmark.py --only train --amps off,bf16 --profile   # fp32 vs bf16, and where the time goes
    python util/benchmark.py --only encode                  # 15,000 x 2 captions, file order vs length buckets
    python util/benchmark.py --quick                        # tiny sizes, seconds (the smoke test)
    python util/benchmark.py --only compile --amps off,bf16 # torch.compile vs eager (about an hour on 2 cores)

Everything is synthetic and offline, built in a temporary folder: a VATEX-like BigFile (1024-d i3d frames,
40-80 per video), caption tables of random token ids (10-30 word pieces between [CLS] and [SEP]) and BERTs
with random weights built from a config dict. Sections:

  peak   (with train or encode) the matrix-product peak of each device and precision, measured in this run:
         best FLOP/s of n x n products (CPU n=2048, CUDA n=8192; fp32 on CUDA is TF32, as the trainer runs).
  data   BigFile.read of 64 random frame ids (rows/s); TrainDataset + collate of one batch of 128 on one thread
         (median ms; target < 50 ms); DataLoader samples/s with 0 and 2 workers. The features were just written,
         so the page cache is warm: these are memory speeds, not disk speeds.
  train  samples/s of the trainer's step, basic/training.py train_step (to device -> forward -> the NRCCR
         discriminator step -> training_loss -> backward -> clip -> step), for NRCCR, MLCMR and mclip,
         median step after warm-up, for NRCCR and MLCMR with a toy, a small and a bert-base-sized text encoder,
         in each precision of --amps (auto: fp32, plus bf16 where the device has it natively), side by side.
         CPU: batch 16; CUDA: the papers' batches (NRCCR 128, MLCMR 64), peak memory. MFU: the FLOPs of the
         matrix products of one whole step (forward, backward, the NRCCR discriminator step), counted with
         torch.utils.flop_counter.FlopCounterMode, per sample, times samples/s, over the peak of the precision.
  encode evaluation.encode_texts over a VATEX-size test split (15,000 captions x 2 streams, 'small' encoder,
         masked pooling) in file-order batches and in length buckets (basic/bucketing.py), with the padded
         share, FLOPs per caption and MFU; then encode_videos of the synthetic collection, FLOPs per video.
  eval   util.bench.metrics.run against gallery size; 15,000 x 1,500 also on one thread (target < 2 s). A size
         predicted (from the previous one, work ~ captions x videos) to exceed --eval_budget is skipped and noted.
  image  util/bench/image.py: samples/s of the NRCCR image training step with cached CLIP features vs a CLIP
         forward per batch (ViT-B/32 and a bert-base-sized encoder; --quick: tiny ones), per device.
  search util/bench/search.py: gallery indexing (videos/s) and query latency, exact and FAISS (when installed),
         for a checkpoint's model and for search with no training (zero_shot_* rows),
         10k and 100k videos (--quick: tiny), per device.
  page   util/bench/page.py: the search page's query latency (p50 / p95) over loopback HTTP, one client and
         8 concurrent clients, 10k videos, and the errors (must be 0), per device.
  epoch  util/bench/epoch.py: trainer.py in a process of its own for one epoch + validation on a synthetic
         collection (1024-d frames, a 768-wide 2-layer BERT), NRCCR and MLCMR side by side with the papers'
         settings, --amp off and auto, every other flag at its default (--compile auto included): process
         wall time, epoch samples/s, peak memory.
  compile (only when named in --only: minutes per configuration) torch.compile against eager, per model,
         encoder and precision: the training step and the evaluation text and video encoders, with compile
         time, recompilations over three lengths, steady-state speed and the calls after which it pays.
  --profile  torch.profiler over one training step of each model ('small' encoder) per device and precision:
         the top ops by self time, printed and stored; then each component of the step (BERT, video encoder,
         MLCMR's bare GRU, attention block, mappings) alone, forward + backward, per precision, with its
         ratio to fp32: bf16 should make no part slower.
"""
import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils import flop_counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import evaluation                                            # noqa: E402
import model as models                                       # noqa: E402
from nets import common  # noqa: E402
from basic.bigfile import BigFileWriter                      # noqa: E402
from util.bench import epoch as bench_epoch                                 # noqa: E402
from util.bench import image as bench_image                                 # noqa: E402
from util.bench import metrics as bench_metrics                               # noqa: E402
from util.bench import search as bench_search                                # noqa: E402
from util.bench import page as bench_page                                    # noqa: E402
from basic import bucketing                                   # noqa: E402
from basic import compiling                                   # noqa: E402
from basic import data_provider as dp                         # noqa: E402
from basic import precision                                   # noqa: E402
from util.make_toy_data import build_vocab                   # noqa: E402
from basic.training import train_step                         # noqa: E402
from basic.runs import git_state                              # noqa: E402
from basic.errors import DataError                            # noqa: E402

SECTIONS = ('data', 'train', 'encode', 'eval', 'image', 'search', 'page', 'epoch', 'compile')
DEFAULT_SECTIONS = SECTIONS[:-1]        # compile takes minutes per configuration: asked for by name
CLS, SEP, MASK, FIRST_WORD = 101, 102, 103, 104              # mBERT special ids; word pieces start after them
MBERT_VOCAB = 119547
NRCCR_ROLES, MLCMR_ROLES = ('src', 'tr', 'bt'), ('en', 'zh')

# Text encoders (BertConfig fields). 'toy' is the tiny BERT of util/make_toy_data.py.
ENCODERS = {
    'toy': dict(hidden_size=64, num_hidden_layers=12, num_attention_heads=4, intermediate_size=256,
                vocab_size=len(build_vocab())),
    'small': dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                  vocab_size=MBERT_VOCAB),
    'bert-base': dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      vocab_size=MBERT_VOCAB),
}

# The training-step section times these models (--train_models; --quick: NRCCR and MLCMR). mclip (docs/models.md,
# 'Multilingual CLIP') runs with a transformers encoder of the section's sizes as its text tower (a config, no
# download), a learned projection of the frames into CLIP's 512 dims and mean pooling: the compute of a fine-tuning
# step on non-CLIP features.
TRAIN_MODELS = ('nrccr', 'mlcmr', 'mclip')
MCLIP_SETTINGS = dict(tower_format='encoder', video_projection=True, mapping_dim=512)

# Sizes of a full run and of --quick. Steps: (warm-up, timed) training steps per configuration. The full run
# keeps the papers' model sizes; --quick shrinks everything but the BERT, as tests/conftest.py does.
FULL = dict(videos=2000, frames=(40, 80), captions_per_video=10, dim=1024, batch=128, gather_reads=500,
            assembly_batches=20, loader_batches=12, encoders=tuple(ENCODERS), train_models=TRAIN_MODELS,
            model_overrides={'mclip': MCLIP_SETTINGS},
            cpu_train_batch=16,
            cpu_steps=(1, 5), cuda_steps=(3, 10), compile_encoders=tuple(ENCODERS),
            cpu_eval=((15_000, 1_500), (100_000, 10_000)), cuda_eval=bench_metrics.CUDA_SIZES,
            one_thread_eval=(15_000, 1_500),
            peak_n_cpu=2048, peak_n_cuda=8192, peak_reps=5, profile_encoder='small',
            encode_captions=15_000, encode_encoder='small')
QUICK = dict(videos=48, frames=(6, 12), captions_per_video=4, dim=64, batch=8, gather_reads=20,
             assembly_batches=3, loader_batches=3, encoders=('toy',), train_models=('nrccr', 'mlcmr'),
             model_overrides={'nrccr': dict(text_hidden_size=32, video_hidden_size=32, text_num_attention=4,
                                            visual_num_attention=4, mapping_dim=48),
                              'mlcmr': dict(visual_rnn_size=16, visual_kernel_num=8, mapping_dim=48),
                              'mclip': dict(MCLIP_SETTINGS, mapping_dim=48)},
             cpu_train_batch=4,
             cpu_steps=(1, 1), cuda_steps=(1, 2), compile_encoders=('toy',),
             cpu_eval=((300, 30), (1200, 120)), cuda_eval=((300, 30), (1200, 120)), one_thread_eval=(300, 30),
             peak_n_cpu=128, peak_n_cuda=256, peak_reps=2, profile_encoder='toy',
             encode_captions=150, encode_encoder='toy')

EPOCH_AMPS = ('off', 'auto')      # the papers' fp32 default and --amp auto, each with the other defaults
GATHER_ROWS = 64          # frame ids per BigFile.read: one padded video of the training collate
ASSEMBLY_TARGET_MS = 50.0
EVAL_TARGET_S = 2.0


# ============ helpers ============

@contextlib.contextmanager
def num_threads(n):
    """torch intra-op threads set to `n` inside the block (the one-core targets), restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timings(fn, runs, warmup=0, device=torch.device('cpu')):
    """Seconds of each of `runs` calls of fn(i) after `warmup` untimed calls (CUDA synchronised around each)."""
    for i in range(warmup):
        fn(i)
    _sync(device)
    out = []
    for i in range(warmup, warmup + runs):
        start = time.perf_counter()
        fn(i)
        _sync(device)
        out.append(time.perf_counter() - start)
    return out


def machine_info(devices):
    info = dict(date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
                python=platform.python_version(), torch=torch.__version__, numpy=np.__version__,
                platform=platform.platform(), cpu=_cpu_name(), cpu_count=os.cpu_count(),
                threads=torch.get_num_threads(), devices=[str(d) for d in devices], **git_state())
    try:
        import transformers
        info['transformers'] = transformers.__version__
    except ImportError:
        pass
    cuda = [d for d in devices if d.type == 'cuda']
    if cuda:
        info.update(cuda=torch.version.cuda, gpu=torch.cuda.get_device_name(cuda[0]),
                    gpu_memory_gib=torch.cuda.get_device_properties(cuda[0]).total_memory / 2 ** 30)
    return info


def _cpu_name():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ============ synthetic VATEX-like collection ============

def write_features(feature_dir, num_videos, frames, dim, seed=0, chunk_videos=100):
    """BigFile of `num_videos` videos with U{frames[0]..frames[1]} frames of `dim` random float32 each; frame ids
    `<video>_<n>` so FrameStore derives video2frames. Written in chunks to bound memory."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(frames[0], frames[1] + 1, size=num_videos)
    videos = [f'v{i:06d}xx_{10 * i:06d}_{10 * i + 10:06d}' for i in range(num_videos)]   # VATEX-like ids
    with BigFileWriter(feature_dir, dim) as writer:
        for start in range(0, num_videos, chunk_videos):
            part = range(start, min(start + chunk_videos, num_videos))
            names = [f'{videos[i]}_{n}' for i in part for n in range(lengths[i])]
            writer.add_rows(names, rng.standard_normal((len(names), dim), dtype=np.float32))
    return videos


def caption_table(videos, captions_per_video, roles, vocab_size, seed=0):
    """CaptionTable with `captions_per_video` rows per video; every role gets its own random token ids,
    [CLS] + 10..30 word pieces in [FIRST_WORD, vocab_size) + [SEP] (int32, as tokenize returns)."""
    rng = np.random.default_rng(seed)
    video_ids = [v for v in videos for _ in range(captions_per_video)]
    cap_ids = [f'{v}#enc#{k}' for v in videos for k in range(captions_per_video)]
    tokens = {}
    for role in roles:
        lengths = rng.integers(10, 31, size=len(video_ids))
        words = rng.integers(FIRST_WORD, vocab_size, size=int(lengths.sum()), dtype=np.int32)
        tokens[role] = [np.concatenate(([CLS], w, [SEP])).astype(np.int32)
                        for w in np.split(words, np.cumsum(lengths)[:-1])]
    return dp.CaptionTable(cap_ids=cap_ids, video_ids=video_ids, tokens=tokens)


class Synthetic:
    """The feature store and one training dataset per model (NRCCR: src/tr/bt; MLCMR: en/zh + augmentation)."""

    def __init__(self, folder, sizes):
        feature_dir = os.path.join(folder, 'FeatureData', 'i3d_synthetic')
        self.videos = write_features(feature_dir, sizes['videos'], sizes['frames'], sizes['dim'])
        self.store = dp.FrameStore(feature_dir)
        # word pieces below the smallest vocabulary, so every encoder can embed every table
        vocab = min(e['vocab_size'] for e in ENCODERS.values())
        self.datasets = {
            'nrccr': dp.TrainDataset(caption_table(self.videos, sizes['captions_per_video'], NRCCR_ROLES, vocab, 1),
                                     self.store, augment=False),
            'mlcmr': dp.TrainDataset(caption_table(self.videos, sizes['captions_per_video'], MLCMR_ROLES, vocab, 2),
                                     self.store, augment=True, mask_id=MASK)}

    def batch(self, name, batch_size, seed):
        dataset = self.datasets[name]
        index = np.random.default_rng(seed).choice(len(dataset), size=batch_size, replace=False)
        return dp.collate([dataset[int(i)] for i in index])


# ============ data ============

def bench_data(data, sizes):
    """Rows for the BigFile gather, the one-thread batch assembly of each model and the DataLoader."""
    rows = []
    big = data.store.bigfile
    rng = np.random.default_rng(0)
    reads = [[big.names[i] for i in rng.integers(0, len(big), size=GATHER_ROWS)] for _ in range(sizes['gather_reads'])]
    seconds = sum(timings(lambda i: big.read(reads[i]), len(reads)))
    n = GATHER_ROWS * len(reads)
    rows.append(dict(what='bigfile_gather', rows_per_read=GATHER_ROWS, reads=len(reads), store_rows=len(big),
                     dim=big.ndims, rows_per_s=n / seconds, mib_per_s=n * big.ndims * 4 / 2 ** 20 / seconds))
    print(f'  BigFile.read of {GATHER_ROWS} random rows x {big.ndims} dims (store {len(big):,} rows): '
          f'{rows[-1]["rows_per_s"]:,.0f} rows/s ({rows[-1]["mib_per_s"]:,.0f} MiB/s)', flush=True)

    batch = sizes['batch']
    for name in ('nrccr', 'mlcmr'):
        with num_threads(1):
            times = timings(lambda i: data.batch(name, batch, seed=i), sizes['assembly_batches'], warmup=1)
        ms = 1000 * float(np.median(times))
        rows.append(dict(what='batch_assembly', model=name, batch=batch, threads=1, batches=len(times),
                         median_ms=ms, max_ms=1000 * max(times), samples_per_s=1000 * batch / ms,
                         target_ms=ASSEMBLY_TARGET_MS))
        print(f'  TrainDataset + collate, {name} batch {batch}, 1 thread: median {ms:.1f} ms '
              f'(max {1000 * max(times):.1f}; target < {ASSEMBLY_TARGET_MS:.0f} ms)', flush=True)

    for name in ('nrccr', 'mlcmr'):
        for workers in (0, 2):
            rows.append(_loader_row(data.datasets[name], name, batch, workers, sizes['loader_batches']))
            r = rows[-1]
            print(f'  DataLoader {name} batch {batch}, {workers} workers: {r["samples_per_s"]:,.0f} samples/s '
                  f'(first batch after {r["first_batch_s"]:.2f} s)', flush=True)
    return rows


def _loader_row(dataset, name, batch, workers, num_batches):
    """Steady-state samples/s over `num_batches` batches after the first (worker start-up reported apart)."""
    loader = dp.make_loader(dataset, batch, shuffle=True, workers=workers, seed=0)
    start = time.perf_counter()
    it = iter(loader)
    next(it)
    first = time.perf_counter() - start
    start, samples = time.perf_counter(), 0
    for _ in range(num_batches):
        samples += next(it)['index'].shape[0]
    seconds = time.perf_counter() - start
    del it          # shuts the workers down
    return dict(what='loader', model=name, batch=batch, workers=workers, batches=num_batches,
                samples_per_s=samples / seconds, first_batch_s=first)


# ============ FLOPs and the matrix-product peak ============

def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# FlopCounterMode counts the matrix products (mm, addmm, bmm, convolutions, attention); the CPU kernel of
# scaled_dot_product_attention, which BERT uses on a CPU, is missing from its table in torch 2.x.
_EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def count_flops(fn, *args):
    """(fn(*args), FLOPs of its matrix products) — the usual model-FLOPs convention: element-wise work,
    normalisations and softmaxes are not counted."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter:
        out = fn(*args)
    return out, counter.get_total_flops()


def matmul_peak(device, dtype, n, reps):
    """Best FLOP/s of `reps` products of two n x n matrices of `dtype` on `device` (2 n^3 FLOPs each):
    the practical peak the model's FLOP/s are compared with."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    best = min(timings(lambda i: torch.mm(a, b), reps, warmup=1, device=device))
    return dict(device=str(device), dtype=PEAK_DTYPE_NAMES[dtype], n=n, reps=reps, best_s=best,
                flops_per_s=2 * n ** 3 / best)


PEAK_DTYPE_NAMES = {torch.float32: 'fp32', torch.bfloat16: 'bf16', torch.float16: 'fp16'}
AMP_PEAK_DTYPE = {'off': 'fp32', 'bf16': 'bf16', 'fp16': 'fp16'}


def bench_peak(devices, amps_of, sizes):
    """One row per (device, precision the runs use): the measured matrix-product peak. On CUDA, fp32 runs
    with TF32 on (as the trainer runs), so its 'fp32' peak is the TF32 one."""
    rows = []
    for device in devices:
        n, reps = sizes['peak_n_cuda' if device.type == 'cuda' else 'peak_n_cpu'], sizes['peak_reps']
        for amp in amps_of(device):
            name = AMP_PEAK_DTYPE[amp]
            dtype = {v: k for k, v in PEAK_DTYPE_NAMES.items()}[name]
            row = matmul_peak(device, dtype, n, reps)
            if device.type == 'cuda' and name == 'fp32':
                row['tf32'] = torch.backends.cuda.matmul.allow_tf32
            rows.append(row)
            print(f'  matmul peak {str(device):6} {name}: {_rate(row["flops_per_s"])} '
                  f'({n} x {n}, best of {reps})', flush=True)
    return rows


def _rate(flops_per_s):
    return (f'{flops_per_s / 1e12:.2f} TFLOP/s' if flops_per_s >= 1e12 else f'{flops_per_s / 1e9:.1f} GFLOP/s')


def _add_mfu(row, flops_per_item, items_per_s, peaks):
    """FLOPs per item, achieved FLOP/s and their share of the peak of the row's precision."""
    achieved = flops_per_item * items_per_s
    peak = peaks.get((row['device'], AMP_PEAK_DTYPE[row['amp']]))
    row.update(achieved_flops_per_s=achieved, peak_flops_per_s=peak, mfu=achieved / peak if peak else None)
    return row


def _amount(flops):
    return f'{flops / 1e9:.2f} GFLOP' if flops >= 1e8 else f'{flops / 1e6:.2f} MFLOP'


def _mfu_text(row, per='sample'):
    text = f'{_amount(row[f"flops_per_{per}"])}/{per}, {_rate(row["achieved_flops_per_s"])}'
    if row['mfu'] is not None:
        text += f' = {100 * row["mfu"]:.1f}% of the {AMP_PEAK_DTYPE[row["amp"]]} peak'
    return text


# ============ training ============

def trainable_layers(model_name, num_layers):
    """The reference fine-tuning policy scaled to `num_layers`: NRCCR trains the top 7 of 12 BERT layers
    (layer.5..11), MLCMR the top 6 (layer.6..11); at 12 layers this is exactly the model default. (mclip
    fine-tunes its whole tower and has no list.)"""
    top = round(len(models.MODELS[model_name].DEFAULTS['trainable_layers'] or []) * num_layers / 12)
    return [f'layer.{i}' for i in range(num_layers - top, num_layers)]


def build(model_name, encoder, dim, **overrides):
    """The model with random weights; the BERT comes from its config dict (no folder, no download)."""
    from transformers import BertConfig
    common.quiet_transformers()
    bert = BertConfig(max_position_embeddings=512, **ENCODERS[encoder]).to_dict()
    cfg = models.model_config(model_name, bert_config=bert, visual_feat_dim=dim,
                              trainable_layers=trainable_layers(model_name, ENCODERS[encoder]['num_hidden_layers']),
                              **overrides)
    return models.build_model(cfg)


def train_amps(device, spec):
    """Precisions the train and encode sections run on `device`: --amps auto = fp32, plus bf16 where the
    device multiplies bf16 natively (basic/precision.py); otherwise the listed ones."""
    if spec != 'auto':
        return [a.strip() for a in spec.split(',') if a.strip()]
    return ['off', 'bf16'] if precision.bf16_support(device)[0] else ['off']


def bench_train(data, sizes, device, amp, peaks, notes):
    """One row per (model, encoder): median seconds of the trainer's step, samples/s, FLOPs per sample and
    the share of the matrix-product peak. On CUDA a configuration that fails (e.g. out of memory) becomes
    a note and the others still run."""
    warmup, steps = sizes['cuda_steps'] if device.type == 'cuda' else sizes['cpu_steps']
    rows = []
    for name in sizes['train_models']:
        batch_size = (models.MODELS[name].RUN_DEFAULTS['batch_size'] if device.type == 'cuda'
                      else sizes['cpu_train_batch'])
        # a few distinct batches (padded lengths differ), cycled over the steps; mclip reads NRCCR's captions
        batches = [data.batch(models.MODELS[name].CAPTIONS, batch_size, seed=100 + i)
                   for i in range(min(warmup + steps, 4))]
        for encoder in sizes['encoders']:
            try:
                row = _train_row(name, encoder, data.store.dim, sizes['model_overrides'].get(name, {}), batches,
                                 device, amp, warmup, steps)
            except RuntimeError as e:     # out of memory, or an op without a kernel for this dtype: say so
                if device.type != 'cuda':
                    raise
                note = f'train {name} {encoder} {device} {amp} batch {batch_size}: failed ({str(e).splitlines()[0]})'
                print(f'  {note}', flush=True)
                notes.append(note)
                torch.cuda.empty_cache()
                continue
            rows.append(_add_mfu(row, row['flops_per_sample'], row['samples_per_s'], peaks))
            extra = f', peak {row["peak_gpu_gib"]:.1f} GiB' if 'peak_gpu_gib' in row else ''
            print(f'  train {name:5} {encoder:9} {str(device):6} {amp:4} batch {batch_size:3}: '
                  f'{row["samples_per_s"]:8.1f} samples/s ({1000 * row["median_step_s"]:.0f} ms/step; '
                  f'{row["params_m"]:.1f}M params, {row["trainable_m"]:.1f}M trained{extra}) | '
                  f'{_mfu_text(row)}', flush=True)
            if device.type == 'cuda':       # the model of this row is gone: hand its memory back
                torch.cuda.empty_cache()
    return rows


# The trainer's defaults (docs/training.md, 'Schedule' and 'Hyperparameters'): --learning_rate, --glr,
# --grad_clip (tests/test_benchmark.py checks they still match).
LEARNING_RATE, DISC_LEARNING_RATE, GRAD_CLIP = 1e-4, 1e-3, 2.0


class TrainSetup:
    """A model and what its training step needs, built as trainer.py builds them; `step` is the trainer's
    step (basic/training.py train_step: forward, the NRCCR discriminator step, loss, backward, clip, step),
    with the trainer's non-finite check (per step on a CPU, none inside the step on a GPU)."""

    def __init__(self, name, encoder, dim, overrides, device, amp, compiled=False):
        torch.manual_seed(0)
        self.model = build(name, encoder, dim, **overrides).to(device).train()
        self.forward = compiling.compile_forward(self.model) if compiled else self.model   # as --compile 1
        self.optimizers = self.model.configure_optimizers(LEARNING_RATE, DISC_LEARNING_RATE)
        self.main_params = self.model.main_parameters()
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == 'fp16')
        self.autocast = precision.autocast_factory(amp, device)
        self.device = device

    def step(self, batch):
        return train_step(self.model, self.forward, dp.move_to(batch, self.device), self.optimizers, self.scaler,
                          self.autocast, GRAD_CLIP, self.main_params)


def _train_row(name, encoder, dim, overrides, batches, device, amp, warmup, steps):
    """Build one model; count the FLOPs of one step on each distinct batch (these steps are the warm-up),
    then time `steps` training steps."""
    setup = TrainSetup(name, encoder, dim, overrides, device, amp)
    flops = [count_flops(setup.step, b)[1] for b in batches]
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    seconds = float(np.median(timings(lambda i: setup.step(batches[i % len(batches)]), steps,
                                      max(warmup - len(batches), 0), device)))
    batch_size = batches[0]['index'].shape[0]
    model = setup.model
    row = dict(model=name, encoder=encoder, device=str(device), amp=amp, batch=batch_size, warmup=warmup,
               steps=steps, median_step_s=seconds, samples_per_s=batch_size / seconds,
               flops_per_sample=float(np.mean(flops)) / batch_size,
               params_m=sum(p.numel() for p in model.parameters()) / 1e6,
               trainable_m=sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6)
    if device.type == 'cuda':
        row['peak_gpu_gib'] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return row


# ============ profile ============

def bench_profile(data, sizes, device, amp, row_limit):
    """torch.profiler over one training step of each model (after one warm-up step); prints the ops that
    took the most time and returns them as rows."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    sort_by = 'self_cuda_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    rows = []
    encoder = sizes['profile_encoder']
    for name in ('nrccr', 'mlcmr'):
        batch_size = (models.MODELS[name].RUN_DEFAULTS['batch_size'] if device.type == 'cuda'
                      else sizes['cpu_train_batch'])
        batch = data.batch(name, batch_size, seed=100)
        setup = TrainSetup(name, encoder, data.store.dim, sizes['model_overrides'].get(name, {}), device, amp)
        setup.step(batch)
        _sync(device)
        with profile(activities=activities) as prof:
            setup.step(batch)
            _sync(device)
        events = prof.key_averages()
        print(f'  profile {name} {encoder} {device} {amp} batch {batch_size}: top {row_limit} ops by self time',
              flush=True)
        print(events.table(sort_by=sort_by, row_limit=row_limit), flush=True)
        attr = 'self_device_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
        total = sum(getattr(e, attr) for e in events) or 1.0
        top = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:row_limit]
        rows.append(dict(model=name, encoder=encoder, device=str(device), amp=amp, batch=batch_size,
                         total_self_ms=total / 1000,
                         ops=[dict(op=e.key, self_ms=getattr(e, attr) / 1000, share=getattr(e, attr) / total,
                                   calls=e.count) for e in top]))
    return rows


# ============ per component ============
# Does bf16 make every part of the step faster? One training forward records the inputs of each named
# component (the BERT, the video encoder and MLCMR's bare GRU, the attention block, the mappings; the NRCCR
# discriminator always runs in fp32); then each component alone runs forward and backward on those inputs
# under each precision's autocast, as inside the step (MLCMR's video encoder with its GRU rule,
# basic/precision.py; its bare GRU as a row of its own shows what the rule avoids).

COMPONENTS = {
    'nrccr': ('text_encoder.bert', 'text_encoder.encoder_layer', 'video_encoder', 'video_mapping', 'text_mapping'),
    'mlcmr': ('bert', 'video_encoder', 'video_encoder.rnn', 'video_mapping', 'text_mapping'),
}


def capture_inputs(model, batch, names):
    """{name: (args, kwargs)} of the first call of each named submodule during model(batch) (no grad)."""
    seen, handles = {}, []
    modules = dict(model.named_modules())
    for name in names:
        def hook(module, args, kwargs, name=name):
            if name not in seen:
                seen[name] = (_detach(args), _detach(kwargs))
        handles.append(modules[name].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def _detach(x):
    if torch.is_tensor(x):
        return x.detach().clone().requires_grad_(x.is_floating_point())
    if isinstance(x, (list, tuple)):
        return type(x)(_detach(v) for v in x)
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    return x


def _tensors(x):
    """Float tensors of an output (tensor, tuple, dict or a transformers output)."""
    if torch.is_tensor(x):
        return [x] if x.is_floating_point() else []
    if isinstance(x, dict) or hasattr(x, 'to_tuple'):
        x = list(x.values()) if isinstance(x, dict) else list(x.to_tuple())
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return []


def time_component(module, inputs, autocast, device, runs=3):
    """Median seconds of forward + backward of `module` on `inputs` under `autocast` (after one warm-up)."""
    args, kwargs = inputs

    def once():
        with autocast():
            out = module(*args, **kwargs)
        loss = sum(t.float().sum() for t in _tensors(out))
        if loss.requires_grad:
            loss.backward()
        for p in module.parameters():
            p.grad = None
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
    once()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def component_rows(model_name, model, batch, device, autocasts):
    """Rows {model, component, amp, seconds} for each component of `model_name` and each (amp, autocast)."""
    model.train()
    names = COMPONENTS[model_name]
    inputs = capture_inputs(model, batch, names)
    modules = dict(model.named_modules())
    return [dict(model=model_name, component=name, amp=amp, device=str(device),
                 seconds=time_component(modules[name], inputs[name], autocast, device))
            for name in names for amp, autocast in autocasts]


def bench_per_component(data, sizes, device, amps):
    """util/bench/components.py: forward + backward of each component of each model ('small' encoder),
    alone, in every precision of `amps`; prints a table per model with the ratio to fp32."""
    rows = []
    encoder = sizes['profile_encoder']
    for name in ('nrccr', 'mlcmr'):
        batch_size = (sizes['cpu_train_batch'] if device.type == 'cpu'
                      else models.MODELS[name].RUN_DEFAULTS['batch_size'])
        setup = TrainSetup(name, encoder, data.store.dim, sizes['model_overrides'].get(name, {}), device, 'off')
        batch = dp.move_to(data.batch(name, batch_size, seed=100), device)
        found = component_rows(name, setup.model, batch, device,
                                                [(amp, precision.autocast_factory(amp, device)) for amp in amps])
        print(f'  components {name} {encoder} {device} batch {batch_size}: forward + backward, ms '
              f'({" | ".join(amps)}{" | ratio to fp32" if "off" in amps and len(amps) > 1 else ""})', flush=True)
        by = {(r['component'], r['amp']): r['seconds'] for r in found}
        for component in COMPONENTS[name]:
            times = [by[component, amp] for amp in amps]
            ratios = ([f'{by[component, amp] / by[component, "off"]:.2f}' for amp in amps if amp != 'off']
                      if 'off' in amps else [])
            print(f'    {component:28} ' + ' | '.join(f'{1000 * t:8.1f}' for t in times)
                  + (' | ' + ' | '.join(ratios) if ratios else ''), flush=True)
        rows += found
    return rows


# ============ compile ============

def bench_compile(data, sizes, device, amp):
    """torch.compile against eager (basic/compiling.py compile_forward, dynamic shapes, as --compile 1), per
    model and encoder of sizes['compile_encoders'], in this precision: the training step (the distinct
    batches of the train section) and the evaluation text and video encoders (no_grad, batches of the test
    batch size at three lengths each). Per row: the eager and the compiled median, the compile time (first
    compiled call minus an eager one), graphs compiled after the first call (recompilations; 0 is the aim),
    and the calls after which compiling has paid for itself (none where the compiled call is not faster)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    warmup, steps = sizes['cuda_steps'] if device.type == 'cuda' else sizes['cpu_steps']
    rows = []
    for name in ('nrccr', 'mlcmr'):
        batch_size = (models.MODELS[name].RUN_DEFAULTS['batch_size'] if device.type == 'cuda'
                      else sizes['cpu_train_batch'])
        batches = [data.batch(name, batch_size, seed=100 + i) for i in range(3)]
        overrides = sizes['model_overrides'].get(name, {})
        for encoder in sizes['compile_encoders']:
            calls = {}
            for compiled in (False, True):
                setup = TrainSetup(name, encoder, data.store.dim, overrides, device, amp, compiled=compiled)
                calls[compiled] = (setup.step, batches)
            rows.append(_compile_row(dict(what='train_step', model=name, encoder=encoder, device=str(device), amp=amp,
                                          batch=batch_size), calls, warmup, steps, device, counters))
            torch._dynamo.reset()
            torch.manual_seed(0)
            model = build(name, encoder, data.store.dim, **overrides).to(device).eval()
            autocast = precision.autocast_factory(amp, device)
            eval_batch = models.MODELS[name].RUN_DEFAULTS['test_batch_size']
            for what, fn, inputs in (('encode_texts', model.embed_texts, _text_inputs(eval_batch, device)),
                                     ('encode_videos', model.embed_videos,
                                      _video_inputs(eval_batch, data.store.dim, device))):
                def call(fn):
                    def run(x):
                        with torch.no_grad(), autocast():
                            return fn(x)
                    return run
                calls = {False: (call(fn), inputs), True: (call(compiling.compile_forward(fn)), inputs)}
                rows.append(_compile_row(dict(what=what, model=name, encoder=encoder, device=str(device), amp=amp,
                                              batch=eval_batch), calls, 1, 3 * len(inputs), device, counters))
                torch._dynamo.reset()
            del model
    return rows


def _compile_row(row, calls, warmup, runs, device, counters):
    """Time the eager and the compiled version of one call over the same inputs (cycled) and print the row."""
    eager_fn, inputs = calls[False]
    eager = float(np.median(timings(lambda i: eager_fn(inputs[i % len(inputs)]), runs, warmup, device)))
    compiled_fn, _ = calls[True]
    before = counters['stats']['unique_graphs']
    first = timings(lambda i: compiled_fn(inputs[0]), 1, 0, device)[0]
    after_first = counters['stats']['unique_graphs']
    for x in inputs[1:]:                      # the other lengths: any graph compiled here is a recompilation
        compiled_fn(x)
    recompiles = counters['stats']['unique_graphs'] - after_first
    compiled = float(np.median(timings(lambda i: compiled_fn(inputs[i % len(inputs)]), runs, 0, device)))
    saved = eager - compiled
    row.update(eager_s=eager, compiled_s=compiled, speedup=eager / compiled, compile_s=max(first - eager, 0.0),
               graphs=after_first - before, recompiles=recompiles,
               pays_after_calls=(first - eager) / saved if saved > 0 else None)
    pays = (f'pays after {row["pays_after_calls"]:,.0f} calls' if row['pays_after_calls'] is not None
            else 'never pays (not faster)')
    print(f'  compile {row["what"]:13} {row["model"]:5} {row["encoder"]:9} {row["device"]:6} {row["amp"]:4} batch '
          f'{row["batch"]:3}: eager {1000 * eager:7.1f} ms, compiled {1000 * compiled:7.1f} ms '
          f'({row["speedup"]:.2f}x); '
          f'compiling {row["compile_s"]:.0f} s, {row["graphs"]} graphs, {recompiles} recompilations; {pays}',
          flush=True)
    return row


def _text_inputs(batch_size, device, lengths=(12, 23, 31)):
    """Caption batches ({'query': stream}) at three padded lengths, every caption as long as its batch."""
    out = []
    for n in lengths:
        ids = torch.randint(FIRST_WORD, min(e['vocab_size'] for e in ENCODERS.values()), (batch_size, n), device=device)
        ids[:, 0], ids[:, -1] = CLS, SEP
        out.append({'query': {'ids': ids, 'mask': torch.ones(batch_size, n, device=device),
                              'lengths': torch.full((batch_size,), n, device=device)}})
    return out


def _video_inputs(batch_size, dim, device, lengths=(41, 57, 64)):
    """Video batches at three padded lengths (frames capped at 64, as the data layer caps them)."""
    return [{'frames': torch.randn(batch_size, n, dim, device=device), 'mask': torch.ones(batch_size, n, device=device),
             'lengths': torch.full((batch_size,), n, device=device),
             'mean': torch.randn(batch_size, dim, device=device)}
            for n in lengths]


# ============ evaluation encoding ============

class EncodeFlops:
    """FLOPs of one encoder call on a batch of a given shape, counted once per shape (they depend on the
    shape only) on synthetic input of that shape."""

    def __init__(self, model, device, autocast, dim):
        self.model, self.device, self.autocast, self.dim = model, device, autocast, dim
        self.cache = {}

    @torch.inference_mode()
    def _count(self, key, fn):
        if key not in self.cache:
            self.model.eval()
            with self.autocast():
                self.cache[key] = count_flops(fn)[1]
        return self.cache[key]

    def text(self, batch_size, length):
        ids = torch.full((batch_size, length), FIRST_WORD, device=self.device)
        stream = {'ids': ids, 'mask': torch.ones(batch_size, length, device=self.device),
                  'lengths': torch.full((batch_size,), length, device=self.device)}
        return self._count(('text', batch_size, length), lambda: self.model.embed_texts({'x': stream}))

    def video(self, batch_size, length):
        d = self.device
        video = {'frames': torch.randn(batch_size, length, self.dim, device=d),
                 'mask': torch.ones(batch_size, length, device=d),
                 'lengths': torch.full((batch_size,), length, device=d),
                 'mean': torch.randn(batch_size, self.dim, device=d)}
        return self._count(('video', batch_size, length), lambda: self.model.embed_videos(video))


def paired_caption_table(num_captions, vocab_size, seed=3):
    """A test split of `num_captions` captions (10 per video) in two streams, 'primary' with 10..30 word
    pieces and 'second' its "translation": the same length +-3 (at least 5), as translated captions track
    their source's length. Token ids random in [FIRST_WORD, vocab_size), between [CLS] and [SEP]."""
    rng = np.random.default_rng(seed)
    primary = rng.integers(10, 31, size=num_captions)
    second = np.maximum(primary + rng.integers(-3, 4, size=num_captions), 5)
    tokens = {role: [np.concatenate(([CLS], rng.integers(FIRST_WORD, vocab_size, size=n), [SEP])).astype(np.int32)
                     for n in lengths] for role, lengths in (('primary', primary), ('second', second))}
    videos = [f'enc{i // 10:06d}' for i in range(num_captions)]
    return dp.CaptionTable(cap_ids=[f'{v}#enc#{i % 10}' for i, v in enumerate(videos)], video_ids=videos,
                           tokens=tokens)


def bench_encode(data, sizes, device, amp, peaks):
    """Caption encoding of a VATEX-size test split (15,000 captions x 2 streams) with masked pooling, in
    file-order batches and in length-bucketed ones (basic/bucketing.py): seconds, captions/s, padded share,
    FLOPs per caption and MFU; the two must give the same embeddings (max difference reported). Then the
    video encoding of the synthetic collection (file order) with its FLOPs per video."""
    rows = []
    table = paired_caption_table(sizes['encode_captions'], min(e['vocab_size'] for e in ENCODERS.values()))
    texts = dp.TextDataset(table)
    for name in ('nrccr', 'mlcmr'):
        batch_size = models.MODELS[name].RUN_DEFAULTS['test_batch_size']
        encoder = sizes['encode_encoder']
        torch.manual_seed(0)
        model = build(name, encoder, data.store.dim, masked_pooling=True,
                      **sizes['model_overrides'].get(name, {})).to(device).eval()
        autocast = precision.autocast_factory(amp, device)
        flops = EncodeFlops(model, device, autocast, data.store.dim)
        reference = None
        for order in ('file', 'length'):
            batches = (bucketing.file_order_batches(len(table), batch_size) if order == 'file'
                       else bucketing.caption_batches(table, batch_size, masked_pooling=True))
            total_flops = sum(flops.text(len(b), max(len(toks[i]) for i in b))
                              for toks in table.tokens.values() for b in batches)
            emb, seconds = _timed(lambda: evaluation.encode_texts(model, texts, batch_size, device,
                                                                  autocast=autocast, batches=batches), device)
            row = dict(what='encode_texts', model=name, encoder=encoder, device=str(device), amp=amp, order=order,
                       captions=len(table), streams=len(table.tokens), batch=batch_size, seconds=seconds,
                       captions_per_s=len(table) / seconds,
                       padding_fraction=bucketing.padding_fraction(table, batches),
                       flops_per_caption=total_flops / len(table))
            if reference is None:
                reference = emb
            else:
                row['max_abs_diff_vs_file_order'] = max(float((emb[r] - reference[r]).abs().max()) for r in emb)
            rows.append(_add_mfu(row, row['flops_per_caption'], row['captions_per_s'], peaks))
            same = (f', max |diff| vs file order {row["max_abs_diff_vs_file_order"]:.1e}'
                    if 'max_abs_diff_vs_file_order' in row else '')
            print(f'  encode {name:5} {encoder:5} {str(device):6} {amp:4} {len(table):,} captions x '
                  f'{len(table.tokens)} streams, {order:6} batches of {batch_size}: {seconds:7.2f} s '
                  f'({row["captions_per_s"]:,.0f} captions/s, {100 * row["padding_fraction"]:.0f}% padding'
                  f'{same}) | {_mfu_text(row, "caption")}', flush=True)

        videos = dp.VideoDataset(data.videos, data.store)
        vbatches = bucketing.file_order_batches(len(videos), batch_size)
        lengths = [min(len(data.store.video2frames[v]), dp.VIDEO_MAX_LEN) for v in data.videos]
        total_flops = sum(flops.video(len(b), max(lengths[i] for i in b)) for b in vbatches)
        _, seconds = _timed(lambda: evaluation.encode_videos(model, videos, batch_size, device,
                                                             autocast=autocast), device)
        row = dict(what='encode_videos', model=name, encoder=encoder, device=str(device), amp=amp, order='file',
                   videos=len(videos), batch=batch_size, seconds=seconds, videos_per_s=len(videos) / seconds,
                   flops_per_video=total_flops / len(videos))
        rows.append(_add_mfu(row, row['flops_per_video'], row['videos_per_s'], peaks))
        print(f'  encode {name:5} {str(device):6} {amp:4} {len(videos):,} videos, batches of {batch_size}: '
              f'{seconds:7.2f} s ({row["videos_per_s"]:,.0f} videos/s) | {_mfu_text(row, "video")}', flush=True)
        del model
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    return rows


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


# ============ evaluation ============

def bench_eval(sizes, device, budget_s, notes):
    """util.bench.metrics rows, smallest gallery first; a size predicted over `budget_s` is skipped."""
    rows = []
    if device.type == 'cpu':
        with num_threads(1):
            for r in bench_metrics.run(device, [sizes['one_thread_eval']]):
                rows.append(dict(r, target_s=EVAL_TARGET_S))
                _print_eval(rows[-1])
    last = None
    for num_captions, num_videos in (sizes['cuda_eval'] if device.type == 'cuda' else sizes['cpu_eval']):
        if last is not None:
            predicted = last['seconds'] * num_captions * num_videos / (last['captions'] * last['videos'])
            if predicted > budget_s:
                note = (f'eval {device}: skipped {num_captions:,} x {num_videos:,} (predicted {predicted:.0f} s '
                        f'from {last["captions"]:,} x {last["videos"]:,} > --eval_budget {budget_s:.0f} s)')
                print(f'  {note}', flush=True)
                notes.append(note)
                break
        new = bench_metrics.run(device, [(num_captions, num_videos)])
        for r in new:
            _print_eval(r)
        rows += new
        last = new[-1]           # the embeddings row: timed at every size
    return rows


def _print_eval(r):
    extra = f', peak {r["peak_gpu_gib"]:.1f} GiB' if 'peak_gpu_gib' in r else ''
    target = f' (target < {r["target_s"]:.0f} s)' if 'target_s' in r else ''
    print(f'  metrics {r["device"]:6} {r["threads"]:2} threads {r["mode"]:10} {r["captions"]:>9,} x {r["videos"]:<8,}'
          f' {r["seconds"]:8.3f} s{target}{extra}', flush=True)


# ============ image, search, page ============

def bench_search_rows(devices, quick, indexes):
    """util/bench/search.py rows of each device as dicts {device, name, value, unit, note}."""
    rows = []
    indexes = tuple(i.strip() for i in indexes.split(',') if i.strip())
    for device in devices:
        with num_threads(torch.get_num_threads()):       # bench_search may set threads; undone here
            log = lambda line: print(f'  {line}', flush=True)     # noqa: E731
            found = bench_search.run(quick=quick, device=device, indexes=indexes, log=log)
            found += bench_search.run_zero_shot(quick=quick, device=device, indexes=indexes, log=log)
        rows += [dict(device=str(device), name=n, value=v, unit=u, note=note) for n, v, u, note in found]
    return rows


def bench_page_rows(devices, quick):
    """util/bench/page.py rows of each device as dicts {device, name, value, unit, note}."""
    rows = []
    for device in devices:
        try:
            with num_threads(torch.get_num_threads()):
                found = bench_page.run(quick=quick, device=device, log=lambda line: print(f'  {line}', flush=True))
        except DataError as e:                   # starlette / uvicorn not installed
            print(f'  page: skipped ({e})', flush=True)
            return rows
        rows += [dict(device=str(device), name=n, value=v, unit=u, note=note) for n, v, u, note in found]
    return rows


# ============ main ============

def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='auto', help='auto (CPU, plus CUDA when present), cpu, cuda or cuda:N')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    p.add_argument('--quick', action='store_true', help='tiny sizes, seconds (the smoke test)')
    p.add_argument('--out', default='benchmark_results.json', help='JSON file (default benchmark_results.json)')
    p.add_argument('--only', default=','.join(DEFAULT_SECTIONS),
                   help=f'comma-separated sections of {",".join(SECTIONS)} (default {",".join(DEFAULT_SECTIONS)})')
    p.add_argument('--amps', default='auto',
                   help='precisions of the train and encode sections, e.g. off,bf16 (default auto: fp32, plus '
                        'bf16 where the device has it natively)')
    p.add_argument('--profile', action='store_true',
                   help='also profile one training step of each model (torch.profiler) and print the top ops')
    p.add_argument('--profile_rows', type=int, default=25, help='ops shown per profile table (default 25)')
    p.add_argument('--search_index', default='exact,faiss',
                   help='indexes of the search section (default exact,faiss; faiss is skipped when not installed)')
    p.add_argument('--train_models', default=None,
                   help=f'models of the train section (default {",".join(TRAIN_MODELS)}; --quick: nrccr,mlcmr)')
    p.add_argument('--compile_encoders', default=None,
                   help='text encoders of the compile section (default toy,small,bert-base; --quick: toy)')
    p.add_argument('--epoch_workers', type=int, default=2,
                   help="the trainer's --workers in the epoch section (default 2)")
    p.add_argument('--eval_budget', type=float, default=180.0,
                   help='skip a metrics size predicted to take longer than this many seconds (default 180)')
    return p


def _devices(spec, parser):
    if spec == 'auto':
        return [torch.device('cpu')] + ([torch.device('cuda')] if torch.cuda.is_available() else [])
    try:
        device = torch.device(spec)
    except RuntimeError:
        parser.error(f'--device {spec}: expected auto, cpu, cuda or cuda:N')
    if device.type == 'cuda' and not torch.cuda.is_available():
        parser.error(f'--device {spec}: no CUDA device visible; use --device cpu')
    if device.type not in ('cpu', 'cuda'):
        parser.error(f'--device {spec}: expected auto, cpu, cuda or cuda:N')
    return [device]


def _subset(parser, flag, value, allowed):
    """The comma-separated names of `value`, all in `allowed`; otherwise the parser's one-line error."""
    names = tuple(n.strip() for n in value.split(',') if n.strip())
    if not names or set(names) - set(allowed):
        parser.error(f'{flag} {value}: expected a comma-separated subset of {",".join(allowed)}')
    return names


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.only.split(',') if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        parser.error(f'--only {args.only}: expected a comma-separated subset of {",".join(SECTIONS)}')
    if set(i.strip() for i in args.search_index.split(',')) - {'exact', 'faiss'}:
        parser.error(f'--search_index {args.search_index}: expected a comma-separated subset of exact,faiss')
    if args.threads is not None and args.threads < 1:
        parser.error(f'--threads {args.threads}: expected a positive number of threads')
    if args.amps != 'auto' and (not train_amps(None, args.amps)
                                or set(train_amps(None, args.amps)) - {'off', 'fp16', 'bf16'}):
        parser.error(f'--amps {args.amps}: expected auto or a comma-separated subset of off,fp16,bf16')
    devices = _devices(args.device, parser)
    sizes = QUICK if args.quick else FULL
    if args.train_models:
        sizes = dict(sizes, train_models=_subset(parser, '--train_models', args.train_models, TRAIN_MODELS))
    if args.compile_encoders:
        sizes = dict(sizes, compile_encoders=_subset(parser, '--compile_encoders', args.compile_encoders, ENCODERS))
    amps_of = lambda device: train_amps(device, args.amps)       # noqa: E731
    with num_threads(args.threads or torch.get_num_threads()):
        if any(d.type == 'cuda' for d in devices):      # as the trainer runs
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        report = {'machine': machine_info(devices),
                  'settings': dict(quick=args.quick, sections=sections, eval_budget_s=args.eval_budget,
                                   amps={str(d): amps_of(d) for d in devices}, profile=args.profile, **sizes)}
        notes = []
        m = report['machine']
        print(f'benchmark: {m["cpu"]} ({m["threads"]} threads), torch {m["torch"]}'
              + (f', {m["gpu"]}' if 'gpu' in m else ''), flush=True)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix='mlcmr_bench_') as tmp:
            if {'data', 'train', 'encode', 'compile'} & set(sections) or args.profile:
                t0 = time.perf_counter()
                data = Synthetic(tmp, sizes)
                print(f'synthetic collection: {len(data.videos):,} videos, {len(data.store.bigfile):,} frames x '
                      f'{data.store.dim} dims, {len(data.datasets["nrccr"]):,} captions '
                      f'({time.perf_counter() - t0:.1f} s to write)', flush=True)
            peaks = {}
            if {'train', 'encode'} & set(sections):
                print('matrix-product peak', flush=True)
                report['peak'] = bench_peak(devices, amps_of, sizes)
                peaks = {(r['device'], r['dtype']): r['flops_per_s'] for r in report['peak']}
            if 'data' in sections:
                print('data', flush=True)
                report['data'] = bench_data(data, sizes)
            if 'train' in sections:
                print('train', flush=True)
                report['train'] = []
                for device in devices:
                    for amp in amps_of(device):
                        report['train'] += bench_train(data, sizes, device, amp, peaks, notes)
            if args.profile:
                print('profile', flush=True)
                report['profile'], report['components'] = [], []
                for device in devices:
                    for amp in amps_of(device):
                        report['profile'] += bench_profile(data, sizes, device, amp, args.profile_rows)
                    report['components'] += bench_per_component(data, sizes, device, amps_of(device))
            if 'encode' in sections:
                print('encode', flush=True)
                report['encode'] = []
                for device in devices:
                    for amp in amps_of(device):
                        report['encode'] += bench_encode(data, sizes, device, amp, peaks)
            if 'eval' in sections:
                print('eval', flush=True)
                report['eval'] = []
                for device in devices:
                    report['eval'] += bench_eval(sizes, device, args.eval_budget, notes)
            if 'image' in sections:
                print('image', flush=True)
                report['image'] = [r for device in devices for r in bench_image.bench_image(device, args.quick)]
            if 'search' in sections:
                print('search', flush=True)
                report['search'] = bench_search_rows(devices, args.quick, args.search_index)
            if 'page' in sections:
                print('page', flush=True)
                report['page'] = bench_page_rows(devices, args.quick)
            if 'compile' in sections:
                print('compile', flush=True)
                report['compile'] = []
                for device in devices:
                    for amp in amps_of(device):
                        report['compile'] += bench_compile(data, sizes, device, amp)
            if 'epoch' in sections:
                print('epoch', flush=True)
                report['epoch'] = [r for device in devices for r in bench_epoch.bench_epoch(
                    args.quick, EPOCH_AMPS, args.epoch_workers, str(device),
                    log=lambda line: print(f'  {line}', flush=True))]
        report['notes'] = notes
        report['total_s'] = time.perf_counter() - start
    with open(args.out, 'w') as f:
        json.dump(report, f, indent=1)
    print(f'wrote {args.out} ({report["total_s"]:.0f} s)', flush=True)
    return report


if __name__ == '__main__':
    main()
