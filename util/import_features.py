"""Import per-video features made by another extractor into a BigFile feature folder.

    python util/import_features.py feats/ --out ~/VisualSearch/mine/FeatureData/clip_b32
    python util/import_features.py feats.h5 --out FEATURE_DIR          # one dataset per video (needs h5py)
    python util/import_features.py feats.npz --out FEATURE_DIR         # one array per video
    python util/import_features.py feats.pkl --out FEATURE_DIR --allow_pickle 1

SRC is one of
  * a folder of `<video>.npy` / `<video>_<feature>.npy` files (and/or one-array `<video>.npz` files), the layout
    of the common extractors; `--strip_suffix auto` (default) drops a `_<feature>` suffix shared by every file;
  * an `.npz` file holding one array per video (key = video id);
  * an HDF5 file (`.h5`, `.hdf5`) with one dataset per video (nested groups are walked; id = the dataset's name);
  * a pickled dict {video id: array} (`.pkl`, `.pickle`), read only with `--allow_pickle 1`, because unpickling
    runs code from the file. A pickle is necessarily loaded whole; every other source is read one video at a time.

Each array is (frames, dims) or (dims,) (one frame). The folder written (docs/data.md, 'BigFile') holds
feature.bin / id.txt / shape.txt with frame ids `<video>_<i>` (i = 0, 1, ...) and video2frames.txt; videos are
written sorted by id, so the same input gives the same files. Rows are streamed to disk as they are read
(basic.bigfile.BigFileWriter), never the whole collection in memory, and the folder appears only when complete.

Every video is checked: readable (a truncated file is caught), numeric, 1-D or 2-D with at least one frame, the
same number of dims as the first good video, all values finite after conversion to float32, and a video id
usable in id.txt (Latin-1, no whitespace). A bad video is named with the reason and skipped; `--strict 1` stops
at the first one instead (nothing is written then).
"""
import argparse
import os
import sys
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from basic.bigfile import FILES, BigFileWriter              # noqa: E402
from basic.errors import DataError                          # noqa: E402
from basic.video2frames import FILENAME as V2F_FILENAME     # noqa: E402
from basic.video2frames import write_video2frames           # noqa: E402

FOLDER_EXTS = ('.npy', '.npz')
H5_EXTS = ('.h5', '.hdf5', '.hdf')
PICKLE_EXTS = ('.pkl', '.pickle')


@dataclass
class ImportReport:
    """What an import wrote and what it skipped: `bad` is a list of (where, reason)."""
    out: str
    videos: int = 0
    frames: int = 0
    dims: int = 0
    bad: list = field(default_factory=list)


# ============ sources: (video id, where, load()) lazily ============

def _strip(stems, strip_suffix):
    """Video ids from file stems: drop `_<suffix>` per `strip_suffix` ('none', 'auto' or a feature name)."""
    if strip_suffix == 'none':
        return list(stems), None
    if strip_suffix == 'auto':
        tails = {s.rpartition('_')[2] for s in stems if '_' in s}
        every = all('_' in s for s in stems)
        suffix = tails.pop() if every and len(tails) == 1 and len(stems) > 1 else None
        if suffix is None or suffix.isdigit():
            return list(stems), None
    else:
        suffix = strip_suffix
    tail = f'_{suffix}'
    return [s[:-len(tail)] if s.endswith(tail) and len(s) > len(tail) else s for s in stems], suffix


def _load_npy(path):
    return np.load(path, allow_pickle=False)


def _load_npz_single(path):
    with np.load(path, allow_pickle=False) as z:
        keys = list(z.keys())
        if len(keys) != 1:
            raise ValueError(f'holds {len(keys)} arrays ({", ".join(keys[:5])}); a per-video .npz must hold one')
        return z[keys[0]]


def folder_sources(folder, strip_suffix='auto'):
    """(sources, note) for a folder of per-video .npy / .npz files (sorted by file name)."""
    names = sorted(n for n in os.listdir(folder) if n.endswith(FOLDER_EXTS)
                   and os.path.isfile(os.path.join(folder, n)))
    if not names:
        raise DataError(f'{folder}: no .npy or .npz files there; expected one <video>.npy (or <video>_<feature>.npy) '
                        'per video')
    stems = [os.path.splitext(n)[0] for n in names]
    ids, suffix = _strip(stems, strip_suffix)
    note = f'video ids: file names without "_{suffix}"' if suffix else None
    sources = []
    for name, vid in zip(names, ids):
        path = os.path.join(folder, name)
        load = _load_npy if name.endswith('.npy') else _load_npz_single
        sources.append((vid, path, lambda p=path, f=load: f(p)))
    return sources, note


def npz_sources(path):
    z = np.load(path, allow_pickle=False)       # lazy: each member is read when indexed
    return [(key, f'{path}[{key}]', lambda k=key: z[k]) for key in sorted(z.keys())], None


def h5_sources(path):
    try:
        import h5py
    except ImportError:
        raise DataError(f'{path}: reading HDF5 needs h5py (pip install h5py, see requirements-optional.txt)') from None
    try:
        f = h5py.File(path, 'r')
    except OSError as e:
        raise DataError(f'{path}: cannot open as HDF5 ({e}); is the file complete?') from None
    datasets = []
    f.visititems(lambda name, obj: datasets.append(name) if isinstance(obj, h5py.Dataset) else None)
    return [(name.rpartition('/')[2], f'{path}:{name}', lambda n=name: f[n][()]) for name in sorted(datasets)], None


def pickle_sources(path, allow_pickle):
    if not allow_pickle:
        raise DataError(f'{path}: a pickle file can run code when loaded; pass --allow_pickle 1 only if you trust '
                        'it, or convert it to .npz / .npy files')
    import pickle
    try:
        with open(path, 'rb') as f:
            data = pickle.load(f)       # noqa: S301 -- explicit user opt-in above
    except Exception as e:              # any unpickling failure is bad data here
        raise DataError(f'{path}: cannot unpickle ({type(e).__name__}: {e}); is the file complete?') from None
    if not isinstance(data, dict):
        raise DataError(f'{path}: holds a {type(data).__name__}, expected a dict {{video id: array}}')
    return [(str(k), f'{path}[{k!r}]', lambda v=v: v) for k, v in sorted(data.items(), key=lambda kv: str(kv[0]))], None


def open_sources(src, allow_pickle=False, strip_suffix='auto'):
    """(list of (video id, where, load), note) for any supported SRC."""
    if os.path.isdir(src):
        return folder_sources(src, strip_suffix)
    if not os.path.isfile(src):
        raise DataError(f'{src}: no such file or folder; give a folder of .npy files, an .npz, .h5 or .pkl file')
    ext = os.path.splitext(src)[1].lower()
    if ext == '.npz':
        try:
            return npz_sources(src)
        except (OSError, ValueError) as e:
            raise DataError(f'{src}: cannot read as .npz ({e}); is the file complete?') from None
    if ext in H5_EXTS:
        return h5_sources(src)
    if ext in PICKLE_EXTS:
        return pickle_sources(src, allow_pickle)
    if ext == '.npy':
        raise DataError(f'{src}: a single .npy holds one video; put the per-video .npy files in a folder and pass it')
    raise DataError(f'{src}: unknown input type {ext!r}; expected a folder of .npy/.npz, .npz, .h5/.hdf5 or .pkl')


# ============ checks ============

def check_video_id(vid):
    """None if `vid` can be a BigFile id prefix, else the reason."""
    if not vid:
        return 'empty video id'
    try:
        raw = vid.encode('latin-1')
    except UnicodeEncodeError:
        return f'video id {vid!r} is not Latin-1 (id.txt is read as Latin-1); rename it'
    if raw.split() != [raw]:
        return f'video id {vid!r} contains whitespace (id.txt is whitespace separated); rename it'
    return None


def check_array(arr, dims):
    """(frames (n, d) float32, None) or (None, reason)."""
    arr = np.asarray(arr)
    if arr.dtype.kind not in 'fiu':
        return None, f'dtype {arr.dtype} is not numeric'
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        return None, f'shape {arr.shape}: expected (frames, dims) or (dims,)'
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        return None, f'shape {arr.shape}: no frames or no dims'
    if dims is not None and arr.shape[1] != dims:
        return None, f'{arr.shape[1]} dims, but the first video has {dims}'
    with np.errstate(over='ignore', invalid='ignore'):
        out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        bad = np.argwhere(~np.isfinite(out))[0]
        return None, (f'{int((~np.isfinite(out)).sum())} non-finite values (NaN/inf, or too large for float32), '
                      f'first at frame {bad[0]}, dim {bad[1]}')
    return out, None


# ============ import ============

def import_features(src, out, allow_pickle=False, strict=False, strip_suffix='auto', overwrite=False,
                    progress=True, log=print):
    """Convert `src` into the BigFile folder `out`; returns an ImportReport. DataError on fatal problems."""
    if any(os.path.exists(os.path.join(out, n)) for n in FILES) and not overwrite:
        raise DataError(f'{out}: a feature folder exists there; pass --overwrite 1 to replace it')
    sources, note = open_sources(src, allow_pickle, strip_suffix)
    if note:
        log(note)
    report = ImportReport(out=out)

    def bad(where, reason):
        if strict:
            raise DataError(f'{where}: {reason}; fix or remove it, or drop --strict to skip bad videos')
        report.bad.append((where, reason))

    seen, mapping = {}, {}
    from tqdm import tqdm
    with BigFileWriter(out) as writer:
        for vid, where, load in tqdm(sorted(sources, key=lambda s: s[0]), desc='import', unit='video',
                                     disable=not progress, dynamic_ncols=True):
            reason = check_video_id(vid)
            if reason is None and vid in seen:
                reason = f'video id {vid!r} already read from {seen[vid]}'
            if reason:
                bad(where, reason)
                continue
            try:
                arr = load()
            except Exception as e:       # truncated / corrupt file: name it, whatever the reader raised
                bad(where, f'unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else "no detail"})')
                continue
            frames, reason = check_array(arr, writer.ndims)
            if reason:
                bad(where, reason)
                continue
            seen[vid] = where
            names = [f'{vid}_{i}' for i in range(len(frames))]
            writer.add_rows(names, frames)
            mapping[vid] = names
            report.frames += len(names)
        if not mapping:
            raise DataError(f'{src}: no usable video ({len(report.bad)} bad, first: '
                            f'{report.bad[0][0] + ": " + report.bad[0][1] if report.bad else "none found"})')
        report.dims = writer.ndims
    write_video2frames(os.path.join(out, V2F_FILENAME), mapping)
    report.videos = len(mapping)
    return report


def get_args_parser():
    p = argparse.ArgumentParser('import_features', add_help=False)
    p.add_argument('src', help='folder of <video>[_<feature>].npy/.npz files, or an .npz, .h5/.hdf5 or .pkl file')
    p.add_argument('--out', required=True, help='feature folder to write, e.g. ROOT/C/FeatureData/<feature>')
    p.add_argument('--allow_pickle', type=int, default=0, choices=[0, 1],
                   help='1: read a pickle SRC (unpickling runs code from the file: only for files you trust)')
    p.add_argument('--strict', type=int, default=0, choices=[0, 1],
                   help='1: stop at the first bad video (default 0: name it and skip it)')
    p.add_argument('--strip_suffix', default='auto',
                   help='folder SRC: "auto" drops a _<feature> suffix shared by all file names, "none" keeps the '
                        'names, or give the suffix (e.g. i3d) to drop')
    p.add_argument('--overwrite', type=int, default=0, choices=[0, 1], help='1: replace an existing feature folder')
    return p


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], parents=[get_args_parser()])
    args = parser.parse_args(argv)
    try:
        report = import_features(args.src, args.out, allow_pickle=bool(args.allow_pickle), strict=bool(args.strict),
                                 strip_suffix=args.strip_suffix, overwrite=bool(args.overwrite))
    except DataError as e:
        raise SystemExit(f'error: {e}') from None
    for where, reason in report.bad:
        print(f'skipped {where}: {reason}', file=sys.stderr)
    print(f'{args.out}: {report.videos} videos, {report.frames} frames x {report.dims} dims'
          + (f'; {len(report.bad)} bad videos skipped (listed above)' if report.bad else ''))
    return report


if __name__ == '__main__':
    main()
