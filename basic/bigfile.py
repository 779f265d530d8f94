"""BigFile: the VisualSearch frame-feature store (SPEC §1.2).

A feature folder holds ``shape.txt`` ("<rows> <dims>"), ``id.txt`` (row ids,
whitespace separated, Latin-1) and ``feature.bin`` (rows x dims float32,
little-endian, row-major, no header).
"""
import os

import numpy as np

from basic.errors import DataError


class BigFile:
    """Read-only, memory-mapped view of one feature folder."""

    def __init__(self, feature_dir):
        self.path = feature_dir
        with open(os.path.join(feature_dir, 'shape.txt')) as f:
            self.nrows, self.ndims = (int(x) for x in f.readline().split()[:2])
        with open(os.path.join(feature_dir, 'id.txt'), 'rb') as f:
            self.names = [x.decode('latin-1') for x in f.read().split()]
        self.name2index = {name: i for i, name in enumerate(self.names)}
        self.data = np.memmap(os.path.join(feature_dir, 'feature.bin'), dtype='<f4',
                              mode='r', shape=(self.nrows, self.ndims))

    def __len__(self):
        return self.nrows

    def __contains__(self, name):
        return name in self.name2index

    def read(self, names):
        """Rows for `names`, in request order, as a (len(names), ndims) float32 array."""
        rows = np.fromiter((self.name2index[n] for n in names), dtype=np.int64, count=len(names))
        return np.asarray(self.data[rows], dtype=np.float32)

    def read_one(self, name):
        return np.asarray(self.data[self.name2index[name]], dtype=np.float32)


def write_bigfile(feature_dir, names, features):
    """Write `features` (rows x dims, any float dtype) with row ids `names` as a BigFile."""
    features = np.ascontiguousarray(features, dtype='<f4')
    if features.ndim != 2 or features.shape[0] != len(names):
        raise ValueError(f'features must be (len(names), dims), got {features.shape} for {len(names)} names')
    os.makedirs(feature_dir, exist_ok=True)
    features.tofile(os.path.join(feature_dir, 'feature.bin'))
    with open(os.path.join(feature_dir, 'id.txt'), 'w', encoding='latin-1') as f:
        f.write(' '.join(names))
    with open(os.path.join(feature_dir, 'shape.txt'), 'w') as f:
        f.write(f'{features.shape[0]} {features.shape[1]}')
