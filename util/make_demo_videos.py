"""A runnable-anywhere demo of searching your own videos: coloured .mp4 files, their captions, a tiny CLIP and BERT.

    python util/make_demo_videos.py --root demo

writes (nothing is downloaded; needs PyAV, `pip install av`)
    demo/videos/demoNNN.mp4             short videos, each one solid colour with a small moving grey square
    demo/video_colours.txt              video id, split and colour of each video (to check search results)
    demo/colours/TextData/*.caption.txt captions naming the colour in English and Chinese, in the naming of
                                        docs/data.md ('Captions'): train / val / test splits, for NRCCR and MLCMR
    demo/tiny_clip/                     a tiny random CLIP (basic/clip_encoder.save_tiny_clip)
    demo/tiny_bert/                     the tiny random BERT of the toy collection (its vocabulary holds the colours)
    demo/tiny_mclip/                    a tiny sentence-transformers text model aligned to the tiny CLIP (the
                                        tiny BERT + mean pooling + Dense, a few optimiser steps pulling each colour's
                                        captions onto the tiny-CLIP embedding of frames of that colour), for search
                                        with no training; only when sentence-transformers is installed

The colours are six of the toy lexicon (util/make_toy_data.py); each colour has `--per_colour` videos, split
into train (all but two), val (one) and test (one). docs/search.md walks from here to ranked search results.
"""
import argparse
import importlib.util
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COLOURS = (('red', '红色', (220, 30, 30)), ('blue', '蓝色', (30, 60, 220)), ('green', '绿色', (30, 190, 60)),
           ('yellow', '黄色', (235, 220, 40)), ('black', '黑色', (10, 10, 10)), ('white', '白色', (245, 245, 245)))
EN_TEMPLATES = ('{c}', 'the {c}', 'a {c} one', 'all {c}')
ZH_TEMPLATES = ('{c}', '{c}的', '一片{c}', '全是{c}')
COLLECTION = 'colours'


def video_codec():
    """H.264 where PyAV's FFmpeg has an encoder for it (browsers play it: the search page), else MPEG-4 part 2."""
    import av
    return next((c for c in ('libx264', 'h264') if c in av.codecs_available), 'mpeg4')


def write_video(path, rgb, seconds=3.0, fps=8, size=48, seed=0, rgb_after=None):
    """An .mp4 of a solid `rgb` background (`rgb_after` from half-way on, when given) with a small grey square
    moving across it; H.264 with the index at the front (a browser can start playing at once) where available."""
    import av
    rng = np.random.default_rng(seed)
    grey, y0, speed = int(rng.integers(90, 170)), int(rng.integers(0, size - 12)), int(rng.integers(1, 4))
    frames = int(seconds * fps)
    with av.open(path, mode='w', options={'movflags': '+faststart'}) as container:
        stream = container.add_stream(video_codec(), rate=fps)
        stream.width, stream.height, stream.pix_fmt = size, size, 'yuv420p'
        for i in range(frames):
            img = np.empty((size, size, 3), np.uint8)
            img[:] = rgb if rgb_after is None or i < frames // 2 else rgb_after
            x = (i * speed) % (size - 10)
            img[y0:y0 + 10, x:x + 10] = grey
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format='rgb24')):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def colour_frames(rgb, n=6, size=48, seed=0):
    """PIL frames as write_video draws them (solid `rgb`, a grey square at random places), without the codec."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        img = np.empty((size, size, 3), np.uint8)
        img[:] = rgb
        y, x, grey = (int(v) for v in (rng.integers(0, size - 10), rng.integers(0, size - 10), rng.integers(90, 170)))
        img[y:y + 10, x:x + 10] = grey
        frames.append(Image.fromarray(img))
    return frames


def write_aligned_text_model(folder, clip_dir, bert_dir, steps=200, lr=1e-3, seed=0):
    """A tiny sentence-transformers text model aligned to the tiny CLIP of `clip_dir`, written to `folder`.

    Built with sentence-transformers' own modules (Transformer over the tiny BERT, mean Pooling, Dense into the
    CLIP's projection size), then `steps` Adam steps on the captions of every colour in English and Chinese (the
    caption templates of the demo): a caption's cosine with the mean l2-normalised tiny-CLIP embedding of frames
    of each colour, times 20, is the logit of a six-way cross-entropy whose label is its colour. The folder
    records the CLIP it is aligned to (aligned_clip.json, nets/text_towers.py)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from basic.clip_encoder import ClipImageEmbedder
    from nets.text_towers import write_alignment
    try:
        from sentence_transformers.sentence_transformer.modules import Dense, Pooling, Transformer
    except ImportError:                               # sentence-transformers < 6
        from sentence_transformers.models import Dense, Pooling, Transformer
    embedder = ClipImageEmbedder(clip_dir)
    targets = []
    for i, (_, _, rgb) in enumerate(COLOURS):
        e = torch.from_numpy(embedder.embed(colour_frames(rgb, seed=[seed, i])))
        targets.append(torch.nn.functional.normalize(torch.nn.functional.normalize(e, dim=1).mean(0), dim=0))
    targets = torch.stack(targets)                                         # (6, D)
    texts, labels = [], []
    for c, (en, zh, _) in enumerate(COLOURS):
        for template in EN_TEMPLATES + ZH_TEMPLATES:
            texts.append(template.format(c=en if template in EN_TEMPLATES else zh))
            labels.append(c)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = Transformer(bert_dir, max_seq_length=32)
        dim = transformer.get_embedding_dimension() if hasattr(transformer, 'get_embedding_dimension') \
            else transformer.get_word_embedding_dimension()
        model = SentenceTransformer(modules=[transformer, Pooling(dim, 'mean'),
                                             Dense(dim, embedder.dim, activation_function=torch.nn.Identity())],
                                    device='cpu')
        features = model.preprocess(texts) if hasattr(model, 'preprocess') else model.tokenize(texts)
        target = torch.tensor(labels)
        optimiser = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        for _ in range(steps):
            emb = torch.nn.functional.normalize(model(dict(features))['sentence_embedding'], dim=1)
            loss = torch.nn.functional.cross_entropy(20.0 * emb @ targets.T, target)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    model.save(folder)
    write_alignment(folder, embedder.identity)
    return folder


def plan(per_colour=8, seed=0):
    """[(video id, split, colour index)]: ids shuffled so that they say nothing about the colour."""
    if per_colour < 3:
        raise ValueError('per_colour must be >= 3 (train, val and test need one video each)')
    items = [(c, j) for c in range(len(COLOURS)) for j in range(per_colour)]
    order = np.random.default_rng(seed).permutation(len(items))
    out = []
    for number, i in enumerate(order):
        c, j = items[i]
        split = 'val' if j == per_colour - 2 else 'test' if j == per_colour - 1 else 'train'
        out.append((f'demo{number:03d}', split, c))
    return sorted(out)


def write_captions(text_dir, videos, collection=COLLECTION, captions_per_video=3):
    """Caption files of every split in NRCCR and MLCMR naming; machine-translation files hold the same texts as
    the human ones (the demo has no translation noise)."""
    os.makedirs(text_dir, exist_ok=True)
    en, zh = {}, {}
    for split in ('train', 'val', 'test'):
        en[split], zh[split] = [], []
        for vid, s, c in videos:
            if s != split:
                continue
            for k in range(captions_per_video):
                en[split].append((vid, k, EN_TEMPLATES[k % len(EN_TEMPLATES)].format(c=COLOURS[c][0])))
                zh[split].append((vid, k, ZH_TEMPLATES[(k + 1) % len(ZH_TEMPLATES)].format(c=COLOURS[c][1])))
    files = {'train': {'': ('enc', en), '_zh': ('zh', zh), '_google_enc2zh': ('enc2zh', zh),
                       '_google_enc2zh2enc': ('enc2zh2enc', en), '_google_zhc2en': ('zhc2en', en)},
             'val': {'': ('enc', en), '_zh': ('zh', zh), '_google_zh2enc': ('zh2enc', en),
                     '_google_enc2zh': ('enc2zh', zh)}}
    files['test'] = files['val']
    for split, names in files.items():
        for suffix, (tag, rows) in names.items():
            with open(os.path.join(text_dir, f'{collection}{split}{suffix}.caption.txt'), 'w', encoding='utf-8') as f:
                f.write(''.join(f'{vid}#{tag}#{k} {text}\n' for vid, k, text in rows[split]))


def make_demo(root, per_colour=8, seconds=3.0, fps=8, size=48, seed=0, collection=COLLECTION):
    """Write the demo under `root`; returns a dict of its paths and the plan [(video id, split, colour)]."""
    from basic.clip_encoder import save_tiny_clip
    from util.make_toy_data import write_tiny_bert
    videos = plan(per_colour, seed)
    video_dir = os.path.join(root, 'videos')
    os.makedirs(video_dir, exist_ok=True)
    for vid, _, c in videos:
        path = os.path.join(video_dir, f'{vid}.mp4')
        if not os.path.exists(path):
            write_video(path, COLOURS[c][2], seconds, fps, size, seed=[seed, int(vid[4:])])
    with open(os.path.join(root, 'video_colours.txt'), 'w', encoding='utf-8') as f:
        f.write(''.join(f'{vid} {split} {COLOURS[c][0]} {COLOURS[c][1]}\n' for vid, split, c in videos))
    text_dir = os.path.join(root, collection, 'TextData')
    write_captions(text_dir, videos, collection)
    clip_dir, bert_dir = os.path.join(root, 'tiny_clip'), os.path.join(root, 'tiny_bert')
    if not os.path.exists(os.path.join(clip_dir, 'config.json')):
        save_tiny_clip(clip_dir, seed=seed)
    if not os.path.exists(os.path.join(bert_dir, 'config.json')):
        write_tiny_bert(bert_dir, seed=seed, hidden=32, layers=4)
    text_model_dir = os.path.join(root, 'tiny_mclip')
    if importlib.util.find_spec('sentence_transformers') is None:
        text_model_dir = None
    elif not os.path.exists(os.path.join(text_model_dir, 'modules.json')):
        write_aligned_text_model(text_model_dir, clip_dir, bert_dir, seed=seed)
    return {'video_dir': video_dir, 'text_dir': text_dir, 'clip_dir': clip_dir, 'bert_dir': bert_dir,
            'text_model_dir': text_model_dir, 'collection_dir': os.path.join(root, collection), 'videos': videos}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--root', required=True, help='folder to write the demo into')
    p.add_argument('--per_colour', type=int, default=8, help='videos per colour (8: 6 train, 1 val, 1 test)')
    p.add_argument('--seconds', type=float, default=3.0, help='video length (3 s)')
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    out = make_demo(args.root, args.per_colour, args.seconds, seed=args.seed)
    print(f'{len(out["videos"])} videos in {out["video_dir"]}, captions in {out["text_dir"]}, '
          f'tiny CLIP {out["clip_dir"]}, tiny BERT {out["bert_dir"]}, '
          + (f'tiny multilingual CLIP text model {out["text_model_dir"]}' if out['text_model_dir'] else
             'no tiny text model for search with no training (pip install sentence-transformers)'))
    return out


if __name__ == '__main__':
    main()
