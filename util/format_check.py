"""Check that a collection holds everything NRCCR and MLCMR read, in the expected formats (docs/data.md).

    python util/format_check.py --rootpath ~/VisualSearch --collection vatex
    python util/format_check.py --rootpath toy_data --collection toy --preset toy
    python util/format_check.py --rootpath ~/VisualSearch --collection multi30k --feature resnet_152 --task 1

Prints one line per item, `OK`, `MISSING` or `BAD` (`OPTIONAL`/`SKIP` lines are not problems) with the
expected path, then "collection complete" (exit 0) or "N problems" (exit 1). Checked: the feature folder
(BigFile validation, dims of the preset, no NaN or Inf in feature.bin), video2frames (present and parseable,
or derivable from id.txt), every caption file of NRCCR train/val/test and MLCMR train (each mode)/val/test
(both target languages), partner coverage by (video id, k), and that every caption's video has frames.
"""
import argparse
import os
import sys

if __package__ in (None, ''):          # run as `python util/format_check.py` from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from basic import paths
from basic.bigfile import BigFile
from basic.captions import match_captions, read_captions
from basic.errors import DataError
from basic.video2frames import FILENAME as V2F_FILENAME, read_video2frames, video2frames_from_ids

_SHOW = 5
_PROBLEMS = ('MISSING', 'BAD')


def _first(items):
    return ', '.join(items[:_SHOW]) + (', ...' if len(items) > _SHOW else '')


class _Report:
    def __init__(self, out):
        self.out, self.problems = out, 0

    def __call__(self, status, what, detail):
        self.problems += status in _PROBLEMS
        print(f'{status:<8} {what}: {detail}', file=self.out)


def caption_configs(collection, data_type='google_enc2zh', mlcmr_val_split='val'):
    """(label, streams) for every caption set the two models read; the primary stream first."""
    C = collection
    configs = [(f'NRCCR {s}', paths.nrccr_streams(C, s, data_type)) for s in paths.SPLITS]
    configs += [('MLCMR train parallel/human_label', paths.mlcmr_streams(C, 'train', 'parallel', 'human_label')),
                ('MLCMR train parallel/translate/zh', paths.mlcmr_streams(C, 'train', 'parallel', 'translate', 'zh')),
                ('MLCMR train parallel/translate/en', paths.mlcmr_streams(C, 'train', 'parallel', 'translate', 'en')),
                ('MLCMR train unparallel', paths.mlcmr_streams(C, 'train', 'unparallel')),
                (f'MLCMR val ({mlcmr_val_split} files)', paths.mlcmr_val_streams(C, mlcmr_val_split))]
    configs += [(f'MLCMR test {t}', paths.mlcmr_streams(C, 'test', target_language=t))
                for t in paths.TARGET_LANGUAGES]
    return configs


def check_features(report, fdir, dims):
    """BigFile validation; returns the BigFile or None."""
    missing = [n for n in ('shape.txt', 'id.txt', 'feature.bin') if not os.path.isfile(os.path.join(fdir, n))]
    if missing:
        report('MISSING', 'feature folder', f'{fdir} (no {", ".join(missing)})')
        return None
    try:
        bigfile = BigFile(fdir)
    except DataError as e:
        report('BAD', 'feature folder', str(e))
        return None
    if dims is not None and bigfile.ndims != dims:
        report('BAD', 'feature folder', f'{fdir}: {bigfile.ndims} dims, the preset expects {dims}; '
               'check --feature / --preset')
    else:
        report('OK', 'feature folder', f'{fdir} ({bigfile.nrows} frames x {bigfile.ndims} dims)')
    check_finite(report, bigfile)
    return bigfile


def check_finite(report, bigfile):
    """Every value of feature.bin is finite (read in chunks, so memory stays bounded)."""
    bad = bigfile.nonfinite_rows()
    if bad:
        ids = [f'{bigfile.names[r]} (row {r})' for r in bad]
        report('BAD', 'feature values', f'{os.path.join(bigfile.path, "feature.bin")}: {len(bad)} rows hold NaN or '
               f'Inf (first: {_first(ids)}); training and testing stop at the first of them: re-extract '
               'these frames\' features')
    else:
        report('OK', 'feature values', f'all {bigfile.nrows} rows are finite')


def check_video2frames(report, fdir, bigfile):
    """video2frames.txt parsed (frame ids checked against id.txt) or derived from id.txt; returns it or None."""
    path = os.path.join(fdir, V2F_FILENAME)
    try:
        if os.path.exists(path):
            v2f = read_video2frames(path)
            if bigfile is not None:
                unknown = [f for frames in v2f.values() for f in frames if f not in bigfile]
                if unknown:
                    report('BAD', 'video2frames', f'{path}: {len(unknown)} frame ids not in id.txt '
                           f'(first: {_first(unknown)}); regenerate it with `python -m basic.video2frames {fdir}`')
                    return None
            report('OK', 'video2frames', f'{path} ({len(v2f)} videos)')
            return v2f
        if bigfile is None:
            report('SKIP', 'video2frames', f'{path} absent and id.txt unreadable, cannot derive it')
            return None
        v2f = video2frames_from_ids(bigfile.names, source=os.path.join(fdir, 'id.txt'))
        report('OK', 'video2frames', f'{path} absent; derived from id.txt ({len(v2f)} videos)')
        return v2f
    except DataError as e:
        report('BAD', 'video2frames', str(e))
        return None


def check_captions(report, rootpath, collection, configs):
    """Read every distinct caption file once; returns {candidates: CaptionFile} of the streams read."""
    users = {}                                   # candidates -> (stream, [labels])
    for label, streams in configs:
        for s in streams:
            users.setdefault(s.candidates, (s, []))[1].append(f'{label} {s.role}')
    folder = paths.text_dir(rootpath, collection)
    by_path, loaded, missing = {}, {}, {}        # a file may be named by two candidate orders (zh2enc / zhc2en)
    for candidates, (stream, labels) in users.items():
        try:
            path = paths.resolve_stream(rootpath, collection, stream)
        except DataError:
            missing.setdefault(frozenset(candidates), (stream, []))[1].extend(labels)
            continue
        if path not in by_path:
            try:
                by_path[path] = cf = read_captions(path)
            except DataError as e:
                by_path[path] = None
                report('BAD', f'captions {os.path.basename(path)}', str(e))
            else:
                report('OK', f'captions {os.path.basename(path)}',
                       f'{path} ({len(cf)} captions, {len(set(cf.video_ids))} videos)')
        if by_path[path] is not None:
            loaded[candidates] = by_path[path]
    for stream, labels in missing.values():
        what, (first, *others) = f'captions {stream.candidates[0]}', stream.candidates
        expected = os.path.join(folder, first) + ''.join(f' (or {c})' for c in others)
        if stream.role == 'half':
            report('OPTIONAL', what, f'{expected} absent; MLCMR unparallel training will derive it from '
                   f'{collection}train.caption.txt + {collection}train_zh.caption.txt')
        else:
            report('MISSING', what, f'{expected} [needed by {"; ".join(labels)}]')
    return loaded


def check_partners(report, configs, loaded):
    """For each caption set, how many primary captions lack a partner (same video id and k)."""
    sets = {}                                    # (primary path, partner paths...) -> (files, [labels])
    for label, streams in configs:
        if len(streams) < 2 or any(s.candidates not in loaded for s in streams):
            continue
        files = [loaded[s.candidates] for s in streams]
        sets.setdefault(tuple(cf.path for cf in files), (files, []))[1].append(label)
    for (primary, *partners), labels in sets.values():
        _, _, missing = match_captions(primary, partners)
        what = f'pairing {", ".join(labels)}'
        for partner, rows in zip(partners, missing):
            if rows:
                report('BAD', what, f'{len(rows)} of {len(primary)} captions of {primary.path} have no partner '
                       f'in {partner.path} (first: {_first([primary.cap_ids[r] for r in rows])}); '
                       'training skips them, --strict refuses them')
        if not any(missing):
            report('OK', what, f'all {len(primary)} captions of {primary.path} have partners')


def check_frames(report, loaded, v2f):
    """Every caption's video must have at least one frame."""
    files = {cf.path: cf for cf in loaded.values()}
    bad = 0
    for cf in files.values():
        videos = [v for v in dict.fromkeys(cf.video_ids) if not v2f.get(v)]
        if videos:
            bad += 1
            report('BAD', 'frames', f'{len(videos)} videos of {cf.path} have no frames (first: {_first(videos)}); '
                   'check the feature folder and video2frames.txt')
    if files and not bad:
        report('OK', 'frames', f'every caption video of the {len(files)} caption files has frames')


# ============ image collections (Multi-30K, MSCOCO, toyimg) ============

def image_caption_configs(collection, data_types, tasks):
    """(label, streams, split, data_type) for every caption set NRCCR reads on an image collection."""
    out = []
    for dt in data_types:
        for task in tasks:
            for split in paths.SPLITS:
                if split != 'train' and task == 2 and paths.image_suffix(dt, 1) == '':
                    continue                    # task 2 val/test files are the task 1 ones but for German
                label = f'NRCCR {split} {paths.image_target(dt)[1]}' + (f' task {task}' if len(tasks) > 1 else '')
                out.append((label, paths.image_streams(collection, split, dt, task), split, dt))
    return out


def check_image_features(report, rootpath, collection, feature, data_types, dims):
    """Feature store of every (split, language): a BigFile (split id files optional) or id file + .npy.
    Returns {(split, data_type): ImageStore or None}."""
    from basic.image_data import ImageStore, has_bigfile, read_image_ids
    fdir = paths.feature_dir(rootpath, collection, feature)
    bigfile = check_features(report, fdir, dims) if has_bigfile(fdir) else None
    stores, seen = {}, {}
    for split in paths.SPLITS:
        for dt in data_types:
            id_file = paths.image_id_file(rootpath, collection, split, feature, dt)
            candidates = paths.image_npy_candidates(rootpath, collection, split, feature, dt)
            npy = next((p for p in candidates if os.path.isfile(p)), None)
            key = (id_file, npy)
            if key in seen:
                stores[split, dt] = seen[key]
                continue
            store = None
            try:
                if has_bigfile(fdir):
                    if bigfile is not None:
                        store = ImageStore.from_bigfile(fdir, id_file if os.path.isfile(id_file) else None)
                        report('OK', f'{split} images', f'{id_file if os.path.isfile(id_file) else fdir} '
                               f'({len(store)} images with features)')
                elif not os.path.isfile(id_file):
                    report('MISSING', f'{split} image ids', id_file)
                elif npy is None:
                    report('MISSING', f'{split} features', candidates[0] + ''.join(f' (or {os.path.basename(c)})'
                                                                                  for c in candidates[1:]))
                    report('OK', f'{split} image ids', f'{id_file} ({len(read_image_ids(id_file))} ids)')
                else:
                    store = ImageStore.from_npy(id_file, npy)
                    if dims is not None and store.dim != dims:
                        report('BAD', f'{split} features', f'{npy}: {store.dim} dims, the preset expects {dims}; '
                               'check --feature / --preset')
                    else:
                        report('OK', f'{split} features', f'{npy} + {os.path.basename(id_file)} '
                               f'({len(store)} images x {store.dim} dims)')
            except DataError as e:
                report('BAD', f'{split} features', str(e))
                store = None
            seen[key] = stores[split, dt] = store
    return stores


def check_image_frames(report, configs, loaded, stores):
    """Every caption's image must have features in its split's store."""
    checked, bad = set(), 0
    for label, streams, split, dt in configs:
        store = stores.get((split, dt))
        for s in streams:
            cf = loaded.get(s.candidates)
            if store is None or cf is None or (cf.path, id(store)) in checked:
                continue
            checked.add((cf.path, id(store)))
            missing = [v for v in dict.fromkeys(cf.video_ids) if v not in store]
            if missing:
                bad += 1
                report('BAD', 'image features', f'{len(missing)} images of {cf.path} have no features in '
                       f'{store.path} (first: {_first(missing)}); extract them or check the id file')
    if checked and not bad:
        report('OK', 'image features', f'every caption image of {len(checked)} caption files has features')


def image_main(args, out, preset_name):
    """format_check of an image collection: every language of the preset (or --data_type) and task."""
    preset = paths.IMAGE_PRESETS.get(preset_name, {})
    feature = args.feature or preset.get('feature') or 'clip_vit_b32'
    dims = paths.IMAGE_FEATURE_DIMS.get(feature, preset.get('dims') if feature == preset.get('feature') else None)
    languages = preset.get('languages', ())
    data_types = [args.data_type] if args.data_type else [f'google_enc2{x}' for x in languages]
    tasks = [args.task] if args.task else list(preset.get('tasks', (1,)))
    report = _Report(out)
    print(f'checking {paths.collection_dir(args.rootpath, args.collection)} (image collection, feature {feature}, '
          f'preset {preset_name or "none"}, {", ".join(data_types)}, task {", ".join(map(str, tasks))})', file=out)
    configs = image_caption_configs(args.collection, data_types, tasks)
    stores = check_image_features(report, args.rootpath, args.collection, feature, data_types, dims)
    loaded = check_captions(report, args.rootpath, args.collection, [(c[0], c[1]) for c in configs])
    check_partners(report, [(c[0], c[1]) for c in configs], loaded)
    check_image_frames(report, configs, loaded, stores)
    n = report.problems
    print('collection complete' if n == 0 else f'{n} problem{"s" if n > 1 else ""}', file=out)
    return 0 if n == 0 else 1


def get_args_parser():
    parser = argparse.ArgumentParser('format_check', description=__doc__.split('\n')[0])
    parser.add_argument('--rootpath', default=os.path.join(os.path.expanduser('~'), 'VisualSearch'),
                        help='VisualSearch root (default $HOME/VisualSearch)')
    parser.add_argument('--collection', required=True, help='collection folder, e.g. vatex, msrvttcn, toy')
    parser.add_argument('--preset', choices=sorted(paths.PRESETS) + sorted(paths.IMAGE_PRESETS), default=None,
                        help='feature name and dims to expect (default: the collection name when it is a preset)')
    parser.add_argument('--feature', default=None, help="feature folder name (default: the preset's)")
    parser.add_argument('--data_type', default=None,
                        help='NRCCR data_type (default google_enc2zh; image presets: every language of the preset)')
    parser.add_argument('--task', type=int, choices=(1, 2), default=None,
                        help='Multi-30K task to check (default: both)')
    parser.add_argument('--mlcmr_val_split', choices=('val', 'test'), default=None,
                        help='split of the MLCMR validation files (default: test for msrvtt* collections, the '
                             "reference's parity quirk, else val)")
    return parser


def main(argv=None, out=None):
    out = out or sys.stdout
    parser = get_args_parser()
    args = parser.parse_args(argv)
    preset_name = args.preset or (args.collection if args.collection in {**paths.PRESETS, **paths.IMAGE_PRESETS}
                                  else None)
    if preset_name in paths.IMAGE_PRESETS:
        try:
            return image_main(args, out, preset_name)
        except ValueError as e:
            parser.error(str(e))
    args.data_type = args.data_type or 'google_enc2zh'
    preset = paths.PRESETS.get(preset_name, {'feature': None, 'dims': None})
    feature = args.feature or preset['feature']
    if feature is None:
        parser.error(f'--feature is needed: {args.collection!r} is not a preset ({", ".join(sorted(paths.PRESETS))})')
    val_split = args.mlcmr_val_split or ('test' if args.collection.startswith('msrvtt') else 'val')

    report = _Report(out)
    print(f'checking {paths.collection_dir(args.rootpath, args.collection)} (feature {feature}, '
          f'preset {preset_name or "none"})', file=out)
    fdir = paths.feature_dir(args.rootpath, args.collection, feature)
    bigfile = check_features(report, fdir, preset['dims'] if args.feature in (None, preset['feature']) else None)
    v2f = check_video2frames(report, fdir, bigfile)
    try:
        configs = caption_configs(args.collection, args.data_type, val_split)
    except ValueError as e:
        parser.error(str(e))
    loaded = check_captions(report, args.rootpath, args.collection, configs)
    check_partners(report, configs, loaded)
    if v2f is not None:
        check_frames(report, loaded, v2f)
    n = report.problems
    print('collection complete' if n == 0 else f'{n} problem{"s" if n > 1 else ""}', file=out)
    return 0 if n == 0 else 1


if __name__ == '__main__':
    sys.exit(main())
