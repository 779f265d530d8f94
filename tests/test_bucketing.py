"""basic/bucketing.py: length-bucketed caption batches cover every caption once, cut padding, and — with
masked pooling — give the same embeddings as the file-order batches (with parity pooling they would not,
which is why parity keeps file order)."""
import numpy as np
import pytest
import torch

import evaluation
import model as models
from test_model import small_cfg
from basic import bucketing
from basic import data_provider as dp


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
        batches = bucketing.caption_batches(t, 4, masked_pooling=True)
        assert batches != bucketing.file_order_batches(len(t), 4)        # the order really differs
        bucketed = evaluation.encode_texts(model, dataset, 4, torch.device('cpu'), batches=batches)
        embeddings[masked] = file_order, bucketed
    file_order, bucketed = embeddings[True]
    assert set(bucketed) == {'primary', 'second'}
    for role in ('primary', 'second'):
        assert bucketed[role].shape == (22, 48)
        assert torch.allclose(bucketed[role], file_order[role], atol=1e-5, rtol=0)
    # parity pooling averages the padding in: the same bucketing would change its embeddings
    file_order, bucketed = embeddings[False]
    assert not torch.allclose(bucketed['primary'], file_order['primary'], atol=1e-3)



class FakeDist:
    """The dist interface _encode uses, rank `rank` of 2: all_gather_object keeps what this rank sends and
    returns it beside `peer`, the other rank's part."""

    def __init__(self, rank, peer):
        self.rank, self.peer, self.sent = rank, peer, None

    def get_rank(self):
        return self.rank

    def get_world_size(self):
        return 2

    def all_gather_object(self, obj):
        self.sent = obj
        return [obj, self.peer] if self.rank == 0 else [self.peer, obj]


def test_encode_deals_the_given_batches_to_the_ranks_and_returns_dataset_order():
    """A stand-in model whose embedding is the caption's first word piece: each of 2 ranks encodes every
    other given batch, and the gathered result is in dataset order whatever the batches' order."""
    t = table({'primary': [5, 9, 3, 9, 7, 4, 8]})
    dataset = dp.TextDataset(t)
    seen = []

    class FirstToken(torch.nn.Module):
        def embed_texts(self, text):
            seen.append(text['primary']['ids'].shape[0])
            return {r: s['ids'][:, 1:2].float() for r, s in text.items()}
    model, cpu = FirstToken(), torch.device('cpu')
    first = torch.tensor([[float(ids[1])] for ids in t.tokens['primary']])
    batches = bucketing.caption_batches(t, 2, masked_pooling=True)
    assert batches == [[1, 3], [6, 4], [0, 5], [2]]
    assert torch.equal(evaluation.encode_texts(model, dataset, 2, cpu, batches=batches)['primary'], first)
    assert seen == [2, 2, 2, 1]

    seen.clear()
    rank1 = FakeDist(1, peer=([], []))
    evaluation.encode_texts(model, dataset, 2, cpu, dist=rank1, batches=batches)
    assert seen == [2, 1] and torch.cat(rank1.sent[0]).tolist() == [6, 4, 2]      # batches 1 and 3
    seen.clear()
    gathered = evaluation.encode_texts(model, dataset, 2, cpu, dist=FakeDist(0, peer=rank1.sent), batches=batches)
    assert seen == [2, 2] and torch.equal(gathered['primary'], first)
