"""video2frames: which BigFile rows (frame ids) make up each video (docs/data.md, 'video2frames').

`video2frames.txt` is the text of a dict literal `{video_id: [frame_id, ...]}`. The reference parses it with
`eval`; here it is parsed as data only (JSON, else `ast.literal_eval`), so a file holding code is refused and
nothing in it runs. Without the file, the mapping is derived from the frame ids `<video_id>_<frame_no>`.

    python -m basic.video2frames FEATURE_DIR      # writes FEATURE_DIR/video2frames.txt from id.txt

(the Python 3 replacement of the reference's `util/get_frameInfo.py`).
"""
import argparse
import ast
import json
import os
import sys

from basic.bigfile import BigFile
from basic.errors import DataError

FILENAME = 'video2frames.txt'


def read_video2frames(path):
    """Parse a video2frames file into {video_id: [frame_id, ...]}; anything else is a DataError."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as e:
        raise DataError(f'{path}: cannot read video2frames ({e.strerror}); '
                        'regenerate it with `python -m basic.video2frames FEATURE_DIR`') from None
    expected = ('expected a dict literal {video_id: [frame_id, ...]} of strings; '
                'regenerate it with `python -m basic.video2frames FEATURE_DIR`')
    try:
        text = data.decode('utf-8-sig')
    except UnicodeDecodeError as e:
        raise DataError(f'{path}: invalid UTF-8 at byte {e.start}; {expected}') from None
    try:
        mapping = json.loads(text)          # fast path; the reference's single-quoted dicts fall through
    except ValueError:
        try:
            mapping = ast.literal_eval(text.strip())
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
            raise DataError(f'{path}: not a literal ({type(e).__name__}); {expected}') from None
    if not isinstance(mapping, dict):
        raise DataError(f'{path}: holds a {type(mapping).__name__}, not a dict; {expected}')
    for video_id, frames in mapping.items():
        if not (isinstance(video_id, str) and isinstance(frames, (list, tuple))
                and all(isinstance(x, str) for x in frames)):
            raise DataError(f'{path}: entry {video_id!r} is not str -> list of str; {expected}')
    return {video_id: list(frames) for video_id, frames in mapping.items()}


def split_frame_id(frame_id):
    """`<video_id>_<frame_no>` -> (video_id, int frame_no), split at the LAST underscore (video ids may
    contain underscores). Raises ValueError otherwise."""
    video_id, sep, number = frame_id.rpartition('_')
    if not (sep and video_id and number.isascii() and number.isdigit()):
        raise ValueError(f'frame id {frame_id!r} is not "<video_id>_<frame_no>" with an integer frame_no')
    return video_id, int(number)


def video2frames_from_ids(frame_ids, source='frame ids'):
    """Group frame ids by video (first-appearance order), each video's frames sorted by frame number.

    The original frame-id strings (zero padding included) are kept. `source` names the origin of the ids
    (e.g. id.txt) in the DataError raised for an id without `_<integer>`."""
    grouped = {}
    for frame_id in frame_ids:
        try:
            video_id, number = split_frame_id(frame_id)
        except ValueError as e:
            raise DataError(f'{source}: {e}; provide a video2frames.txt for ids of another form') from None
        grouped.setdefault(video_id, []).append((number, frame_id))
    return {video_id: [fid for _, fid in sorted(frames, key=lambda x: x[0])]
            for video_id, frames in grouped.items()}


def load_video2frames(feature_dir, frame_ids=None):
    """`<feature_dir>/video2frames.txt` if present, else derived from `frame_ids` (default: the folder's id.txt)."""
    path = os.path.join(feature_dir, FILENAME)
    if os.path.exists(path):
        return read_video2frames(path)
    source = os.path.join(feature_dir, 'id.txt')
    if frame_ids is None:
        frame_ids = BigFile(feature_dir).names
    return video2frames_from_ids(frame_ids, source=source)


def write_video2frames(path, mapping):
    """Write `mapping` as a dict literal, one video per line, videos sorted by id (deterministic).

    The text is ASCII JSON, which is also a Python dict literal, so the reference's `eval` reads it."""
    lines = [f'{json.dumps(v)}: {json.dumps(list(mapping[v]))}' for v in sorted(mapping)]
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w', encoding='ascii') as f:
        f.write('{' + ',\n'.join(lines) + '}\n')
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description='Write FEATURE_DIR/video2frames.txt from FEATURE_DIR/id.txt '
                                     '(frame ids <video_id>_<frame_no>, docs/data.md).')
    parser.add_argument('feature_dir', help='a BigFile folder (feature.bin, id.txt, shape.txt)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing video2frames.txt')
    args = parser.parse_args(argv)
    path = os.path.join(args.feature_dir, FILENAME)
    if os.path.exists(path) and not args.overwrite:
        print(f'{path} exists; pass --overwrite to replace it')
        return 0
    try:
        mapping = video2frames_from_ids(BigFile(args.feature_dir).names,
                                        source=os.path.join(args.feature_dir, 'id.txt'))
    except DataError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    write_video2frames(path, mapping)
    print(f'{path}: {len(mapping)} videos, {sum(len(v) for v in mapping.values())} frames')
    return 0


if __name__ == '__main__':
    sys.exit(main())
