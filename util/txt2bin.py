"""Convert text features to a BigFile (docs/data.md, 'BigFile').

Each input line is `<id> <v1> ... <vd>`. As in the reference converter, the first line of an id decides
(later lines with the same id are skipped, even when the first one was dropped) and rows holding a NaN are
dropped. The input is streamed: only the ids and one block of rows are in memory.

    python util/txt2bin.py --output VisualSearch/vatex/FeatureData/i3d_kinetics feats_part1.txt feats_part2.txt
"""
import argparse
import os
import sys

if __package__ in (None, ''):          # run as `python util/txt2bin.py` from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from basic.bigfile import BigFileWriter
from basic.errors import DataError

BLOCK = 4096      # rows buffered before each write


def txt2bin(input_files, feature_dir, ndims=None):
    """Write the rows of `input_files` to the BigFile `feature_dir`; returns counts
    {'rows', 'ndims', 'duplicates', 'nan_rows'}. `ndims` defaults to the width of the first row."""
    seen = set()
    stats = {'rows': 0, 'ndims': ndims, 'duplicates': 0, 'nan_rows': 0}
    names, rows = [], []
    with BigFileWriter(feature_dir, ndims) as writer:
        for path in input_files:
            try:
                f = open(path, 'rb')
            except OSError as e:
                raise DataError(f'{path}: cannot read feature text ({e.strerror})') from None
            with f:
                for line_no, line in enumerate(f, start=1):
                    fields = line.split()
                    if not fields:
                        continue
                    name = fields[0].decode('latin-1')      # byte-exact, like id.txt (docs/data.md, 'BigFile')
                    if name in seen:
                        stats['duplicates'] += 1
                        continue
                    seen.add(name)
                    width = len(fields) - 1
                    if stats['ndims'] is None and width > 0:
                        stats['ndims'] = width
                    if width != stats['ndims']:
                        raise DataError(f'{path}:{line_no}: {width} values after id {name!r}, expected '
                                        f'{stats["ndims"] or "at least 1"} ("<id> <v1> ... <vd>"); '
                                        'fix the line or pass the right --ndims')
                    try:
                        values = np.array(fields[1:], dtype=np.float32)
                    except ValueError:
                        raise DataError(f'{path}:{line_no}: a value of id {name!r} is not a number; '
                                        'expected "<id> <v1> ... <vd>" with decimal values') from None
                    if np.isnan(values).any():
                        stats['nan_rows'] += 1
                        continue
                    names.append(name)
                    rows.append(values)
                    if len(rows) == BLOCK:
                        writer.add_rows(names, np.stack(rows))
                        stats['rows'] += len(rows)
                        names, rows = [], []
        if rows:
            writer.add_rows(names, np.stack(rows))
            stats['rows'] += len(rows)
        if stats['ndims'] is None:
            raise DataError(f'{", ".join(input_files)}: no feature lines found; expected "<id> <v1> ... <vd>"')
        writer.ndims = stats['ndims']
    return stats


def main(argv=None):
    parser = argparse.ArgumentParser(description='Convert "<id> <v1> ... <vd>" text features into a BigFile '
                                     '(feature.bin, id.txt, shape.txt; docs/data.md).')
    parser.add_argument('inputs', nargs='+', help='text feature files, read in order')
    parser.add_argument('--output', required=True,
                        help='feature folder to write, e.g. <root>/<C>/FeatureData/<feature>')
    parser.add_argument('--ndims', type=int, default=None, help='expected dims (default: width of the first row)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing feature.bin in --output')
    args = parser.parse_args(argv)
    if os.path.exists(os.path.join(args.output, 'feature.bin')) and not args.overwrite:
        print(f'{args.output} already holds feature.bin; pass --overwrite to replace it', file=sys.stderr)
        return 1
    try:
        stats = txt2bin(args.inputs, args.output, args.ndims)
    except DataError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    print(f'{args.output}: {stats["rows"]} rows x {stats["ndims"]} dims written; '
          f'{stats["duplicates"]} duplicate ids skipped, {stats["nan_rows"]} rows with NaN dropped')
    return 0


if __name__ == '__main__':
    sys.exit(main())
