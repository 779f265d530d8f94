"""BigFile: the VisualSearch frame-feature store (docs/data.md, 'BigFile').

A feature folder holds ``shape.txt`` ("<rows> <dims>"), ``id.txt`` (row ids,
whitespace separated, Latin-1) and ``feature.bin`` (rows x dims float32,
little-endian, row-major, no header).

Unlike the reference (docs/parity.md, 'Defects fixed without a switch'), the folder is validated once on open, the
features are one memory map (no file opened per frame), `read` gathers in
request order, and an unknown id, or a row holding NaN or Inf, is a `DataError`
naming it.
"""
import os

import numpy as np

from basic.errors import DataError

FILES = ('feature.bin', 'id.txt', 'shape.txt')
_SHOW = 5          # how many offending ids an error message lists


def _first(items):
    return ', '.join(items[:_SHOW]) + (', ...' if len(items) > _SHOW else '')


class BigFile:
    """Read-only, memory-mapped view of one feature folder."""

    def __init__(self, feature_dir):
        self.path = feature_dir
        shape_file, id_file, bin_file = (os.path.join(feature_dir, n) for n in ('shape.txt', 'id.txt', FILES[0]))
        hint = ('a feature folder holds feature.bin, id.txt and shape.txt (docs/data.md, "BigFile"); '
                'check --rootpath and the feature name')
        for f in (shape_file, id_file, bin_file):
            if not os.path.isfile(f):
                raise DataError(f'{f}: missing; {hint}')

        with open(shape_file, 'rb') as f:
            first = f.readline()
        fields = first.split()
        try:
            self.nrows, self.ndims = int(fields[0]), int(fields[1])
        except (IndexError, ValueError):
            self.nrows = self.ndims = -1
        if self.nrows < 0 or self.ndims <= 0:
            raise DataError(f'{shape_file}:1: expected "<rows> <dims>" (two integers, dims > 0), got {first[:80]!r}; '
                            'regenerate the folder with util/txt2bin.py')

        with open(id_file, 'rb') as f:
            self.names = [x.decode('latin-1') for x in f.read().split()]
        if len(self.names) != self.nrows:
            raise DataError(f'{id_file}: {len(self.names)} ids but {shape_file} says {self.nrows} rows; '
                            'the folder is inconsistent, regenerate it with util/txt2bin.py')
        self.name2index = {name: i for i, name in enumerate(self.names)}
        if len(self.name2index) != self.nrows:
            first = {}
            dups = list(dict.fromkeys(n for i, n in enumerate(self.names) if first.setdefault(n, i) != i))
            raise DataError(f'{id_file}: {len(dups)} duplicate ids (first: {_first(dups)}); '
                            'each row id must be unique, regenerate the folder with util/txt2bin.py')

        expected, actual = self.nrows * self.ndims * 4, os.path.getsize(bin_file)
        if actual != expected:
            raise DataError(f'{bin_file}: {actual} bytes, expected {expected} (= {self.nrows} rows x '
                            f'{self.ndims} dims x 4 bytes); truncated download? fetch or regenerate it')
        if expected == 0:     # np.memmap cannot map an empty file
            self.data = np.zeros((0, self.ndims), dtype='<f4')
        else:
            self.data = np.memmap(bin_file, dtype='<f4', mode='r', shape=(self.nrows, self.ndims))

    def __len__(self):
        return self.nrows

    def __contains__(self, name):
        return name in self.name2index

    def _unknown(self, names):
        missing = list(dict.fromkeys(n for n in names if n not in self.name2index))
        return DataError(f'{self.path}: {len(missing)} unknown ids (first: {_first(missing)}); '
                         'the ids must appear in id.txt — check video2frames.txt and the feature name')

    def read(self, names):
        """Rows for `names`, in request order (duplicates repeated): (len(names), ndims) float32.

        One vectorised gather from the memory map."""
        rows = np.fromiter((self.name2index.get(n, -1) for n in names), dtype=np.int64, count=len(names))
        if (rows < 0).any():
            raise self._unknown(names)
        block = np.asarray(self.data[rows], dtype=np.float32)
        self._check_finite(block, rows)
        return block

    def read_one(self, name):
        """The row of `name` as a (ndims,) float32 array."""
        i = self.name2index.get(name)
        if i is None:
            raise self._unknown([name])
        row = np.array(self.data[i], dtype=np.float32)
        self._check_finite(row[None], [i])
        return row

    def _check_finite(self, block, rows):
        """A NaN or Inf in the rows just read is a DataError naming feature.bin, the row and its frame id.

        One `np.isfinite` pass over the gathered block: cheap next to the read itself, and it stops corrupt
        features before they turn into a non-finite loss or NaN similarities far from their cause."""
        finite = np.isfinite(block)
        if finite.all():
            return
        first = int(np.flatnonzero(~finite.all(axis=1))[0])
        raise self.non_finite_error(int(rows[first]))

    def non_finite_error(self, row, count=None):
        """The DataError for a NaN / Inf in `row` (`count`: how many bad rows in all, when known)."""
        more = f' ({count} rows in all)' if count and count > 1 else ''
        return DataError(f'{os.path.join(self.path, FILES[0])}: row {row} (frame id {self.names[row]}) holds NaN '
                         f'or Inf values{more}; the features are corrupt: re-extract them (`python '
                         'util/format_check.py` lists every bad row)')

    def nonfinite_rows(self, chunk_bytes=64 << 20):
        """Indices of every row holding a NaN or Inf, reading feature.bin sequentially in chunks of about
        `chunk_bytes` (memory stays bounded whatever the file size)."""
        bad = []
        step = max(1, chunk_bytes // (4 * self.ndims))
        with open(os.path.join(self.path, FILES[0]), 'rb') as f:
            for start in range(0, self.nrows, step):
                n = min(step, self.nrows - start)
                chunk = np.fromfile(f, dtype='<f4', count=n * self.ndims).reshape(n, self.ndims)
                finite = np.isfinite(chunk)
                if not finite.all():
                    bad.extend((start + np.flatnonzero(~finite.all(axis=1))).tolist())
        return bad


class BigFileWriter:
    """Writes a BigFile row block by row block, so a converter never holds all features in memory.

    Everything goes to hidden temporary files inside `feature_dir`; `close()` then moves them into place
    with `os.replace` (shape.txt last), so an interrupted write leaves no half-written feature.bin,
    id.txt or shape.txt behind. Use as a context manager: an exception discards the temporary files.
    """

    def __init__(self, feature_dir, ndims=None):
        self.feature_dir, self.ndims = feature_dir, ndims
        self.names, self._seen = [], set()
        os.makedirs(feature_dir, exist_ok=True)
        self._tmp = {n: os.path.join(feature_dir, f'.{n}.tmp{os.getpid()}') for n in FILES}
        self._bin = open(self._tmp['feature.bin'], 'wb')

    def add_rows(self, names, rows):
        """Append `rows` (len(names) x dims, any float dtype) with ids `names` (unique, no whitespace)."""
        rows = np.ascontiguousarray(rows, dtype='<f4')
        names = list(names)
        if rows.ndim != 2 or rows.shape[0] != len(names):
            raise ValueError(f'features must be (len(names), dims), got {rows.shape} for {len(names)} names')
        if self.ndims is None:
            self.ndims = rows.shape[1]
        if rows.shape[1] != self.ndims:
            raise ValueError(f'rows have {rows.shape[1]} dims, expected {self.ndims}')
        for name in names:
            try:
                raw = name.encode('latin-1')
            except UnicodeEncodeError:
                raise ValueError(f'row id {name!r} is not Latin-1 (id.txt is read as Latin-1)') from None
            if raw.split() != [raw]:
                raise ValueError(f'row id {name!r} is empty or contains whitespace (id.txt is whitespace separated)')
            if name in self._seen:
                raise ValueError(f'duplicate row id {name!r}')
            self._seen.add(name)
        self.names.extend(names)
        rows.tofile(self._bin)

    def close(self):
        """Publish the folder: write id.txt and shape.txt, then move the three files into place."""
        self._bin.close()
        if self.ndims is None:
            raise ValueError('the number of dims is unknown: pass ndims or add at least one row')
        with open(self._tmp['id.txt'], 'wb') as f:
            f.write(' '.join(self.names).encode('latin-1'))     # Latin-1 like the reader (docs/data.md, 'BigFile')
        with open(self._tmp['shape.txt'], 'w') as f:
            f.write(f'{len(self.names)} {self.ndims}')
        for name in FILES:      # shape.txt last: until then a reader sees the old folder or a size mismatch
            os.replace(self._tmp[name], os.path.join(self.feature_dir, name))

    def abort(self):
        self._bin.close()
        for path in self._tmp.values():
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self.close()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


def write_bigfile(feature_dir, names, features):
    """Write `features` (rows x dims, any float dtype) with row ids `names` as a BigFile."""
    features = np.asarray(features)
    ndims = features.shape[1] if features.ndim == 2 else None
    with BigFileWriter(feature_dir, ndims) as writer:
        writer.add_rows(names, features)
