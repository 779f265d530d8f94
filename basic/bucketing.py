"""Batches for the evaluation encoders: file order (parity) or captions grouped by length.

With parity pooling (`masked_pooling` off) a caption's embedding is the mean over every padded position of
its batch, so it depends on which captions share its batch: evaluation must keep the original consecutive
batches in file order to reproduce the papers' numbers (docs/evaluation.md). With masked pooling, padding
changes nothing (attention masks the padded keys, pooling skips them), so captions can be batched by
length: sorted longest first and cut into batches, each batch is padded only to the longest caption in it.
On a VATEX-like split (10-30 word pieces) this removes most of the padded positions the encoder would
otherwise compute (`padding_fraction`). The encoder returns rows with their dataset index, and the encode
loop puts them back in dataset order, so the caller sees the same matrix either way.

Videos keep file order: the MLCMR video GRU reads the padding (parity), so padding is not neutral there.
"""
import numpy as np


def file_order_batches(n, batch_size, rank=0, world=1):
    """Consecutive batches in file order, dealt round-robin to the ranks (the parity batches)."""
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)][rank::world]


def caption_lengths(table):
    """(N,) tokens per caption summed over the table's streams (a batch holds every stream, each padded to
    its own maximum; translations of one caption have similar lengths, so the sum orders both)."""
    total = np.zeros(len(table), dtype=np.int64)
    for toks in table.tokens.values():
        total += np.fromiter((len(t) for t in toks), dtype=np.int64, count=len(toks))
    return total


def length_bucketed_batches(lengths, batch_size, rank=0, world=1):
    """Dataset indices sorted by length, longest first (ties in file order), cut into batches of
    `batch_size` and dealt round-robin to the ranks. The longest batch comes first, so an out-of-memory
    shows at once. Every index appears in exactly one batch of one rank."""
    if batch_size < 1:
        raise ValueError(f'batch_size must be positive, got {batch_size}')
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind='stable')
    return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)][rank::world]


def caption_batches(table, batch_size, masked_pooling, rank=0, world=1):
    """The evaluation batches of a caption table: grouped by length when `masked_pooling` is on, where
    padding does not change an embedding; file order otherwise, where batch composition changes the padded
    mean pooling and only the original batches reproduce the papers' numbers."""
    if masked_pooling:
        return length_bucketed_batches(caption_lengths(table), batch_size, rank, world)
    return file_order_batches(len(table), batch_size, rank, world)


def padding_fraction(table, batches):
    """Share of the encoded token positions that are padding, for these batches (each stream of a batch
    padded to its own longest caption)."""
    real = padded = 0
    for toks in table.tokens.values():
        lengths = np.fromiter((len(t) for t in toks), dtype=np.int64, count=len(toks))
        for b in batches:
            part = lengths[b]
            real += int(part.sum())
            padded += int(part.max()) * len(b)
    return 1.0 - real / padded if padded else 0.0
