"""util/bucketing.py: length-bucketed caption batches cover every caption once, cut padding, and — with
masked pooling — give the same embeddings as the file-order batches (with parity pooling they would not,
which is why parity keeps file order)."""
import contextlib

import numpy as np
import pytest
import torch

import evaluation
import model as models
from test_model import small_cfg
from util import bucketing
from util import data_provider as dp


def table(lengths_by_role, seed=0):
    rng = np.random.default_rng(seed)
    n = len(next(iter(lengths_by_role.values())))
    tokens = {role: [np.concatenate(([101], rng.integers(104, 200, size=k - 2), [102])).astype(np.int32)
                     for k in lengths] for role, lengths in lengths_by_role.items()}
    return dp.CaptionTable(cap_ids=[f'v{i // 2}#enc#{i % 2}' for i in range(n)],
                           video_ids=[f'v{i // 2}' for i in range(n)], tokens=tokens)


def test_batches_sort_longest_first_and_cover_every_caption_once():
    lengths = [5, 9, 3, 9, 7, 4, 8]
    assert bucketing.length_bucketed_batches(lengths, 3) == [[1, 3, 6], [4, 0, 5], [2]]   # ties in file order
    assert bucketing.length_bucketed_batches(lengths, 3, rank=1, world=2) == [[4, 0, 5]]
    parts = [b for r in range(3) for b in bucketing.length_bucketed_batches(lengths, 2, rank=r, world=3)]
    assert sorted(i for b in parts for i in b) == list(range(7))
    assert bucketing.file_order_batches(7, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert bucketing.file_order_batches(7, 3, rank=0, world=2) == [[0, 1, 2], [6]]
    with pytest.raises(ValueError):
        bucketing.length_bucketed_batches(lengths, 0)


def test_caption_batches_choose_by_pooling_and_padding_drops():
    t = table({'primary': [12, 30, 11, 29, 13, 31], 'second': [10, 28, 12, 30, 11, 27]})
    assert bucketing.caption_lengths(t).tolist() == [22, 58, 23, 59, 24, 58]
    parity = bucketing.caption_batches(t, 2, masked_pooling=False)
    bucketed = bucketing.caption_batches(t, 2, masked_pooling=True)
    assert parity == [[0, 1], [2, 3], [4, 5]]
    assert bucketed == [[3, 1], [5, 4], [2, 0]]
    # by hand, parity: primary pads (30+29+31)*2 = 180 for 126 tokens; second (28+30+27)*2 = 170 for 118
    assert bucketing.padding_fraction(t, parity) == pytest.approx(1 - 244 / 350)
    # bucketed: primary (30+31+12)*2 = 146; second (30+27+12)*2 = 138 (the [5, 4] pair is mixed)
    assert bucketing.padding_fraction(t, bucketed) == pytest.approx(1 - 244 / 284)


@contextlib.contextmanager
def encode_batches(make):
    """evaluation._encode with the batches of `make(n, batch_size, rank, world)` (the next phase gives
    _encode a batch parameter; until then the tests swap its batch builder)."""
    real = evaluation._shard_batches
    evaluation._shard_batches = make
    try:
        yield
    finally:
        evaluation._shard_batches = real


@pytest.mark.parametrize('name', ['nrccr', 'mlcmr'])
def test_masked_pooling_embeddings_equal_bucketed_and_file_order(toy_root, name):
    rng = np.random.default_rng(1)
    t = table({'primary': rng.integers(4, 20, size=22).tolist(), 'second': rng.integers(4, 20, size=22).tolist()})
    dataset = dp.TextDataset(t)
    embeddings = {}
    for masked in (True, False):
        torch.manual_seed(0)
        model = models.build_model(small_cfg(toy_root, name, masked_pooling=masked))
        file_order = evaluation.encode_texts(model, dataset, 4, torch.device('cpu'))
        with encode_batches(lambda n, bs, rank, world: bucketing.caption_batches(t, bs, True, rank, world)):
            bucketed = evaluation.encode_texts(model, dataset, 4, torch.device('cpu'))
        embeddings[masked] = file_order, bucketed
    file_order, bucketed = embeddings[True]
    assert set(bucketed) == {'primary', 'second'}
    for role in ('primary', 'second'):
        assert bucketed[role].shape == (22, 48)
        assert torch.allclose(bucketed[role], file_order[role], atol=1e-5, rtol=0)
    # parity pooling averages the padding in: the same bucketing would change its embeddings
    file_order, bucketed = embeddings[False]
    assert not torch.allclose(bucketed['primary'], file_order['primary'], atol=1e-3)
