"""Benchmark of the NRCCR image training step: cached CLIP embeddings vs the original's CLIP forward per batch.

    python util/bench/image.py                        # CPU (and CUDA when present), ViT-B/32 + bert-base sized
    python util/bench/image.py --device cuda --out bench_image.json
    python util/bench/image.py --quick                # tiny CLIP and BERT, seconds (the smoke test)

Both paths run the same training step (to device -> forward -> training_loss with its discriminator step ->
backward -> gradient clipping -> Adam step) of the same model on the same batches; the per-step path first runs
the CLIP vision tower (with projection, under no_grad, as the original's output never received a gradient) on
a batch of preprocessed pixels. JPEG decoding and preprocessing, which the original also did for every sample
in its data loader, are left out, so the measured gap is a lower bound. Weights are random (built from config
dicts, offline): speed does not depend on them.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

if __package__ in (None, ''):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import model as models                                        # noqa: E402
from nets import common  # noqa: E402

CLIP_CONFIGS = {
    'ViT-B/32': dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     image_size=224, patch_size=32, projection_dim=512),
    'tiny': dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                 patch_size=8, projection_dim=16),
}
BERT_CONFIGS = {
    'bert-base': dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      vocab_size=119547),
    'tiny': dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, vocab_size=200),
}
FULL = dict(clip='ViT-B/32', bert='bert-base', cpu_batch=16, cuda_batch=128, cpu_steps=(1, 3), cuda_steps=(3, 10),
            model=dict(text_hidden_size=768, video_hidden_size=1024, mapping_dim=1536),
            trainable=[f'layer.{i}' for i in range(3, 12)])
QUICK = dict(clip='tiny', bert='tiny', cpu_batch=4, cuda_batch=8, cpu_steps=(1, 1), cuda_steps=(1, 2),
             model=dict(text_hidden_size=32, video_hidden_size=40, mapping_dim=48, text_num_attention=4),
             trainable=['layer.2', 'layer.3'])
CAPTION_TOKENS = (10, 30)           # word pieces per caption, [CLS] and [SEP] excluded


def build_models(sizes, device, seed=0):
    """(CLIP vision tower with projection, NRCCR with the CLIP image encoder), random weights, on `device`."""
    from transformers import BertConfig, CLIPVisionConfig, CLIPVisionModelWithProjection
    common.quiet_transformers()
    torch.manual_seed(seed)
    clip_cfg = CLIP_CONFIGS[sizes['clip']]
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**clip_cfg)).to(device).eval()
    bert_config = BertConfig(**BERT_CONFIGS[sizes['bert']]).to_dict()
    cfg = models.model_config('nrccr', bert_config=bert_config, trainable_layers=sizes['trainable'],
                              visual_encoder='clip', visual_feat_dim=clip_cfg['projection_dim'],
                              disc_type='not-so-weak', **sizes['model'])
    return clip, models.build_model(cfg).to(device)


def make_batches(n, batch, clip_cfg, vocab, seed=0):
    """`n` CPU batches: pixels (B, 3, S, S), one-frame CLIP-dim placeholder features and three caption streams."""
    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        text = {}
        for role in ('src', 'tr', 'bt'):
            lengths = g.integers(CAPTION_TOKENS[0], CAPTION_TOKENS[1] + 1, batch) + 2
            ids = np.zeros((batch, lengths.max()), dtype=np.int64)
            for i, L in enumerate(lengths):
                ids[i, :L] = np.r_[101, g.integers(104, vocab, L - 2), 102]
            text[role] = {'ids': torch.from_numpy(ids), 'mask': torch.from_numpy((ids > 0).astype(np.float32)),
                          'lengths': torch.from_numpy(lengths)}
        size = clip_cfg['image_size']
        out.append({'pixels': torch.from_numpy(g.standard_normal((batch, 3, size, size), dtype=np.float32)),
                    'text': text, 'video_index': torch.arange(batch),
                    'same_video': torch.zeros(batch, batch, dtype=torch.bool)})
    return out


def one_frame(feats):
    B = feats.shape[0]
    ones = torch.ones(B, 1, device=feats.device)
    return {'frames': feats.unsqueeze(1), 'mask': ones, 'lengths': torch.ones(B, dtype=torch.long), 'mean': feats}


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def train_step(model, opts, batch, device, clip=None):
    """One trainer-like step. With `clip`, the image features come from the CLIP tower run on this batch."""
    text = {r: {k: v.to(device, non_blocking=True) for k, v in s.items()} for r, s in batch['text'].items()}
    if clip is not None:
        with torch.no_grad():
            feats = clip(pixel_values=batch['pixels'].to(device, non_blocking=True)).image_embeds
    else:
        feats = batch['features'].to(device, non_blocking=True)
    inputs = {'video': one_frame(feats), 'text': text, 'video_index': batch['video_index'].to(device),
              'same_video': batch['same_video'].to(device)}
    out = model(inputs)
    loss, _ = model.training_loss(out)
    opts['main'].zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.main_parameters(), 2.0)
    opts['main'].step()


def time_steps(fn, batches, warmup, steps, device):
    for b in batches[:warmup]:
        fn(b)
    times = []
    for b in batches[warmup:warmup + steps]:
        _sync(device)
        t0 = time.perf_counter()
        fn(b)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_image(device='cpu', quick=False, seed=0):
    """Rows {what, path, device, batch, clip, bert, median_step_s, samples_per_s} for the two paths; printed."""
    device = torch.device(device)
    sizes = QUICK if quick else FULL
    batch = sizes['cuda_batch'] if device.type == 'cuda' else sizes['cpu_batch']
    warmup, steps = sizes['cuda_steps'] if device.type == 'cuda' else sizes['cpu_steps']
    clip, model = build_models(sizes, device, seed)
    model.train()
    opts = model.configure_optimizers(1e-4, 1e-3)
    clip_cfg = CLIP_CONFIGS[sizes['clip']]
    batches = make_batches(warmup + steps, batch, clip_cfg, BERT_CONFIGS[sizes['bert']]['vocab_size'], seed)
    with torch.no_grad():                    # the cached path reads features extracted once, beforehand
        for b in batches:
            b['features'] = clip(pixel_values=b['pixels'].to(device)).image_embeds.cpu()
    rows = []
    print(f'image training step on {device} (CLIP {sizes["clip"]}, BERT {sizes["bert"]}, batch {batch}):', flush=True)
    for path, use_clip in (('cached_features', None), ('clip_per_step', clip)):
        median = time_steps(lambda b: train_step(model, opts, b, device, use_clip), batches, warmup, steps, device)
        rows.append(dict(what='image_train', path=path, device=str(device), batch=batch, clip=sizes['clip'],
                         bert=sizes['bert'], steps=steps, median_step_s=median, samples_per_s=batch / median))
        print(f'  {path:<16} {median * 1000:9.1f} ms/step  {batch / median:9.1f} samples/s', flush=True)
    speedup = rows[0]['samples_per_s'] / rows[1]['samples_per_s']
    rows[0]['speedup_vs_clip_per_step'] = speedup
    print(f'  cached CLIP features: {speedup:.2f}x the samples/s of a CLIP forward per batch '
          '(JPEG decoding, which the original also did per sample, not counted)', flush=True)
    return rows


def get_args_parser():
    p = argparse.ArgumentParser('bench_image', description=__doc__.split('\n')[0])
    p.add_argument('--device', default='auto', help='auto (CPU, plus CUDA when present) | cpu | cuda[:N]')
    p.add_argument('--quick', action='store_true', help='tiny CLIP and BERT (seconds; the smoke test)')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch decides)')
    p.add_argument('--out', default=None, help='write the rows as JSON here')
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    devices = (['cpu'] + (['cuda'] if torch.cuda.is_available() else [])) if args.device == 'auto' else [args.device]
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        rows = [r for d in devices for r in bench_image(d, args.quick)]
    finally:
        torch.set_num_threads(threads)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == '__main__':
    main()
