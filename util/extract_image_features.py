"""Extract CLIP image embeddings of a folder of images into a BigFile (one row per image) that the trainer reads.

    python util/extract_image_features.py --images ~/VisualSearch/multi30k/flickr30k-images \\
        --out ~/VisualSearch/multi30k/FeatureData/clip_vit_b32 --device cuda
    python util/extract_image_features.py --images DIR --out DIR --ids train_id.txt val_id.txt   # only these

The embedding is transformers' CLIP vision tower with its projection (`image_embeds`, not normalised), after
CLIP's own preprocessing (bicubic resize, centre crop, normalisation): the output of the original code's
`clip.encode_image` (docs/models.md, 'Image encoders'). The row id of an image is its file name without the
extension, as in the caption ids (`<id>.jpg#enc#0`).

Resumable: features are written in chunks (each one atomically) under FEATURE_DIR/.chunks while running, and
merged into FEATURE_DIR/{feature.bin,id.txt,shape.txt} at the end (atomically too); a re-run skips every image
already in the BigFile or in a chunk. Unreadable (or, with --ids, missing) images are listed in
FEATURE_DIR/skipped_images.txt and skipped; with --strict 1 they stop the run before anything is written.
"""
import argparse
import glob
import json
import os
import sys

import numpy as np

if __package__ in (None, ''):          # run as `python util/extract_image_features.py` from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from basic.bigfile import BigFile, BigFileWriter          # noqa: E402
from basic.errors import DataError                        # noqa: E402
from basic.clip_encoder import DEFAULT_CLIP                # noqa: E402

EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')
CHUNK_DIR = '.chunks'
INFO_FILE = 'extract_info.json'
SKIPPED_FILE = 'skipped_images.txt'


# ============ which images ============

def list_images(images_dir, extensions=EXTENSIONS):
    """{image id: path} of the image files directly inside `images_dir` (id = file name without extension)."""
    if not os.path.isdir(images_dir):
        raise DataError(f'{images_dir}: no such image folder; pass --images the folder holding the JPEGs')
    found = {}
    for name in sorted(os.listdir(images_dir)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in extensions and os.path.isfile(os.path.join(images_dir, name)):
            found.setdefault(stem, os.path.join(images_dir, name))
    return found


def wanted_ids(images, id_files):
    """(ids to extract in order, ids listed but without an image file). Without id files: every image."""
    if not id_files:
        return list(images), []
    from basic.image_data import read_image_ids
    ids = list(dict.fromkeys(i for f in id_files for i in read_image_ids(f)))
    return [i for i in ids if i in images], [i for i in ids if i not in images]


def valid_row_id(image_id):
    try:
        raw = image_id.encode('latin-1')
    except UnicodeEncodeError:
        return False
    return raw.split() == [raw]


# ============ resumable output ============

def done_ids(out_dir):
    """Ids already extracted: rows of the BigFile in `out_dir` and of finished chunks."""
    done = set()
    if os.path.isfile(os.path.join(out_dir, 'feature.bin')):
        done.update(BigFile(out_dir).names)
    for path in sorted(glob.glob(os.path.join(out_dir, CHUNK_DIR, 'chunk_*.npz'))):
        with np.load(path, allow_pickle=False) as z:
            done.update(z['ids'].tolist())
    return done


def write_chunk(out_dir, ids, feats):
    """Write one chunk atomically (temporary file, then os.replace)."""
    folder = os.path.join(out_dir, CHUNK_DIR)
    os.makedirs(folder, exist_ok=True)
    n = len(glob.glob(os.path.join(folder, 'chunk_*.npz')))
    while os.path.exists(os.path.join(folder, f'chunk_{n:06d}.npz')):
        n += 1
    final = os.path.join(folder, f'chunk_{n:06d}.npz')
    tmp = os.path.join(folder, f'.chunk_{n:06d}.tmp{os.getpid()}.npz')
    np.savez(tmp, ids=np.asarray(ids, dtype=str), feats=np.asarray(feats, dtype=np.float32))
    os.replace(tmp, final)
    return final


def merge_chunks(out_dir):
    """Rewrite the BigFile of `out_dir` as its old rows plus every chunk's rows, then delete the chunks."""
    chunks = sorted(glob.glob(os.path.join(out_dir, CHUNK_DIR, 'chunk_*.npz')))
    if not chunks:
        return 0
    old = BigFile(out_dir) if os.path.isfile(os.path.join(out_dir, 'feature.bin')) else None
    added = 0
    with BigFileWriter(out_dir, old.ndims if old else None) as writer:
        if old is not None:
            for i in range(0, len(old), 65536):
                writer.add_rows(old.names[i:i + 65536], old.data[i:i + 65536])
        seen = set(old.names) if old is not None else set()
        for path in chunks:
            with np.load(path, allow_pickle=False) as z:
                ids, feats = z['ids'].tolist(), z['feats']
            keep = [j for j, i in enumerate(ids) if i not in seen]
            seen.update(ids)
            writer.add_rows([ids[j] for j in keep], feats[keep])
            added += len(keep)
        del old                                 # release the memory map before its file is replaced
    for path in chunks:
        os.remove(path)
    os.rmdir(os.path.join(out_dir, CHUNK_DIR))
    return added


def check_info(out_dir, model_name, dim, identity=None):
    """Refuse to mix two models' features in one folder; record the model (and the CLIP's identity,
    basic/clip_encoder.py `clip_identity`) on first use."""
    path = os.path.join(out_dir, INFO_FILE)
    info = {'model': model_name, 'dim': int(dim), 'embedding': 'CLIP image_embeds (projected, not normalised)'}
    if identity is not None:
        info['clip'] = identity
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        same_weights = old.get('clip', identity) == identity
        if (old.get('model'), old.get('dim')) != (info['model'], info['dim']) or not same_weights:
            raise DataError(f'{path}: this folder holds features of {old.get("model")} ({old.get("dim")}-d), not '
                            f'{model_name} ({dim}-d){"" if same_weights else " (other weights)"}; use another --out '
                            'folder')
        if 'clip' not in old and identity is not None:        # recorded before identities were
            with open(path, 'w') as f:
                json.dump(dict(old, clip=identity), f, indent=1)
        return
    os.makedirs(out_dir, exist_ok=True)
    with open(path, 'w') as f:
        json.dump(info, f, indent=1)


# ============ loading images ============

class _ImageFiles:
    """Dataset of (index, pixels or None) so that decoding and preprocessing run in loader workers."""

    def __init__(self, paths, processor):
        self.paths, self.processor = paths, processor

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image
        try:
            with Image.open(self.paths[i]) as im:
                im = im.convert('RGB')
            pixels = self.processor(images=[im], return_tensors='pt')['pixel_values'][0]
        except Exception as e:                 # PIL raises many types for broken files
            return i, None, f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
        return i, pixels, None


def _collate(items):
    import torch
    good = [(i, p) for i, p, _ in items if p is not None]
    bad = [(i, err) for i, _, err in items if err is not None]
    pixels = torch.stack([p for _, p in good]) if good else None
    return [i for i, _ in good], pixels, bad


def unreadable_images(paths):
    """(index, reason) of the images PIL cannot decode (a full decode of each; used by --strict 1)."""
    from PIL import Image
    bad = []
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                im.convert('RGB')
        except Exception as e:
            bad.append((i, f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'))
    return bad


# ============ the whole job ============

def extract(images_dir, out_dir, model=DEFAULT_CLIP, batch_size=64, device='cpu', strict=False, id_files=(),
            workers=0, chunk_size=2048, progress=True):
    """Extract what is missing and merge it into the BigFile `out_dir`. Returns a summary dict:
    extracted, skipped_done, unreadable (list of (id, reason)), missing (ids without an image file), rows."""
    import torch
    from tqdm import tqdm
    from basic.clip_encoder import ClipImageEmbedder

    images = list_images(images_dir)
    ids, missing = wanted_ids(images, id_files)
    bad_ids = [i for i in ids if not valid_row_id(i)]
    ids = [i for i in ids if valid_row_id(i)]
    done = done_ids(out_dir) if os.path.isdir(out_dir) else set()
    todo = [i for i in ids if i not in done]
    unreadable = [(i, 'id contains whitespace or non-Latin-1 characters') for i in bad_ids]
    if strict:
        unreadable += [(todo[j], why) for j, why in unreadable_images([images[i] for i in todo])]
        problems = [f'{images.get(i, i)} ({why})' for i, why in unreadable] + \
                   [f'{i} (listed in {", ".join(id_files)}, no image file)' for i in missing]
        if problems:
            raise DataError(f'{images_dir}: {len(problems)} images unreadable or missing (first: '
                            f'{"; ".join(problems[:3])}); fix or remove them, or pass --strict 0 to skip them')

    summary = dict(extracted=0, skipped_done=len(ids) - len(todo), unreadable=unreadable, missing=missing, rows=0)
    if todo:
        embedder = ClipImageEmbedder(model, device=device)
        check_info(out_dir, model, embedder.dim, embedder.identity)
        dataset = _ImageFiles([images[i] for i in todo], embedder.processor)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                             collate_fn=_collate, shuffle=False)
        chunk_ids, chunk_feats = [], []
        bar = tqdm(total=len(todo), desc='CLIP image features', unit='img', disable=not progress)
        for index, pixels, bad in loader:
            summary['unreadable'] += [(todo[i], why) for i, why in bad]
            if pixels is not None:
                chunk_ids += [todo[i] for i in index]
                chunk_feats.append(embedder.embed_pixels(pixels))
            if len(chunk_ids) >= chunk_size:
                write_chunk(out_dir, chunk_ids, np.concatenate(chunk_feats))
                summary['extracted'] += len(chunk_ids)
                chunk_ids, chunk_feats = [], []
            bar.update(len(index) + len(bad))
        if chunk_ids:
            write_chunk(out_dir, chunk_ids, np.concatenate(chunk_feats))
            summary['extracted'] += len(chunk_ids)
        bar.close()
    if os.path.isdir(os.path.join(out_dir, CHUNK_DIR)):
        merge_chunks(out_dir)
    if os.path.isfile(os.path.join(out_dir, 'feature.bin')):
        summary['rows'] = len(BigFile(out_dir))
    write_skipped(out_dir, images, summary, id_files)
    return summary


def write_skipped(out_dir, images, summary, id_files):
    path = os.path.join(out_dir, SKIPPED_FILE)
    lines = [f'{images.get(i, i)}\t{why}' for i, why in summary['unreadable']]
    lines += [f'{i}\tlisted in {", ".join(id_files)} but no image file' for i in summary['missing']]
    if lines:
        os.makedirs(out_dir, exist_ok=True)
        with open(path, 'w', encoding='utf-8') as f:
            f.write('\n'.join(lines) + '\n')
    elif os.path.exists(path):
        os.remove(path)


def get_args_parser():
    p = argparse.ArgumentParser('extract_image_features', description=__doc__.split('\n')[0])
    p.add_argument('--images', required=True, help='folder holding the images (<id>.jpg, ...)')
    p.add_argument('--out', required=True, help='feature folder to write, e.g. <root>/<collection>/FeatureData/'
                                                'clip_vit_b32 (a BigFile, one row per image)')
    p.add_argument('--model', default=DEFAULT_CLIP,
                   help=f'CLIP hub id or local folder (default {DEFAULT_CLIP}, the ViT-B/32 of the original)')
    p.add_argument('--ids', nargs='+', default=[], metavar='FILE',
                   help='extract only the images listed in these id files (one id per line), e.g. '
                        'FeatureData/train_id.txt FeatureData/val_id.txt (default: every image of --images)')
    p.add_argument('--batch_size', type=int, default=64, help='images per forward pass (default 64)')
    p.add_argument('--device', default='auto', help='auto | cpu | cuda | cuda:N (default auto)')
    p.add_argument('--workers', type=int, default=4, help='image-decoding loader workers (default 4)')
    p.add_argument('--chunk_size', type=int, default=2048,
                   help='images per chunk written while running; an interrupted run loses at most one chunk '
                        '(default 2048)')
    p.add_argument('--strict', type=int, choices=(0, 1), default=0,
                   help='1: an unreadable or missing image stops the run before anything is written; 0 (default): '
                        'they are listed in <out>/skipped_images.txt and skipped')
    return p


def main(argv=None):
    import torch
    args = get_args_parser().parse_args(argv)
    device = ('cuda' if torch.cuda.is_available() else 'cpu') if args.device == 'auto' else args.device
    try:
        s = extract(args.images, args.out, args.model, args.batch_size, device, bool(args.strict), args.ids,
                    args.workers, args.chunk_size)
    except DataError as e:
        raise SystemExit(f'error: {e}') from None
    print(f'{args.out}: {s["rows"]} images ({s["extracted"]} extracted now, {s["skipped_done"]} already done)')
    if s['unreadable'] or s['missing']:
        print(f'warning: {len(s["unreadable"])} unreadable and {len(s["missing"])} missing images skipped; '
              f'listed in {os.path.join(args.out, SKIPPED_FILE)}')
    return s


if __name__ == '__main__':
    main()
