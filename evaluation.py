"""Evaluation: exact retrieval metrics, score normalisation and fusion (docs/evaluation.md).

Conventions: `sims` is a `[num_captions, num_videos]` similarity matrix (higher = more similar; the references
work on errors = -sims, which ranks identically) and `cap2vid[i]` is the column of caption i's video.

Ranking is exact and deterministic: each query's candidates are ordered by descending similarity, ties by
ascending candidate index (a stable sort of the errors, as `np.argsort(-row, kind='stable')`). A NaN
similarity of a non-ground-truth item ranks last, as NumPy's sort puts it. Ranks are computed by counting
instead of sorting: the 0-based place of item c in row q is
    #{j : s_qj > s_qc} + #{j < c : s_qj == s_qc},
evaluated on blocks of queries so memory stays bounded whatever the gallery size. Work: N_c * N_v comparisons
for t2v and N_c^2 for v2t (each caption against its video's whole row), twice (> and ==). Measured: 15k x 1.5k
about 1 s on one CPU core; 100k x 10k from embeddings about 50 s on two cores; larger galleries want a GPU
(util/bench/metrics.py).

Encoding loops (`encode_videos`, `encode_texts`) run a model in eval mode under inference mode over
batches of dataset indices (consecutive file-order batches unless the caller passes others) and return CPU
tensors in dataset order.
"""
import contextlib

import numpy as np
import torch

from basic import bucketing
from basic.batching import collate, move_to
from basic.progress import track

METRIC_KEYS = ('t2v_r1', 't2v_r5', 't2v_r10', 't2v_medr', 't2v_meanr', 't2v_map',
               'v2t_r1', 'v2t_r5', 'v2t_r10', 'v2t_medr', 'v2t_meanr', 'v2t_map', 'sumr')

# Elements of one (queries x candidates) comparison block when chunk_size is None: ~4M keeps a float64 block
# and its boolean temporaries small on a CPU; a GPU wants far larger launches (128M: 0.5 GiB in float32).
_AUTO_BLOCK_ELEMENTS_CPU, _AUTO_BLOCK_ELEMENTS_CUDA = 1 << 22, 1 << 27


# ============ metrics ============

@torch.no_grad()
def compute_metrics(sims, cap2vid, chunk_size=None):
    """All metrics (docs/evaluation.md) of a similarity matrix, exactly, for both directions.

    sims: `[num_captions, num_videos]` torch tensor or NumPy array (any device, any real dtype; a NumPy array,
    memory-mapped ones included, is converted block by block). cap2vid: `num_captions` video columns.
    chunk_size: queries compared at once (None: sized from the matrix); it never changes the result.

    Returns python floats keyed by METRIC_KEYS:
      `*_r1, *_r5, *_r10`  recall in percent (0..100): 100 * |{q : r_q <= K}| / N_q        ('Recall, MedR, MeanR')
      `*_medr, *_meanr`    median / mean of the 1-based ranks r_q; the median is not floored (x.5 possible)
      `*_map`              mean average precision as a FRACTION in [0, 1] (the READMEs print it x100)  ('mAP')
      `sumr`               the six recalls summed (0..600)                                             ('SumR')
    t2v: one query per caption, its only relevant item is video cap2vid[i]; r = its rank, AP = 1/r.
    v2t: one query per video, relevant = all of its captions (any number, in any rows); r = rank of its
    best-placed caption, AP = (1/R) sum_k k / pos_k over the 1-based places pos_1 < ... < pos_R of its R
    captions. A video without any caption has no relevant item and is left out of the v2t averages (N_q =
    videos with captions; the references never meet one, as their videos are read from the caption file).
    """
    if isinstance(sims, torch.Tensor):
        if sims.dim() != 2:
            raise ValueError(f'sims must be a [num_captions, num_videos] matrix, got shape {tuple(sims.shape)}')
        rows = lambda i0, i1: sims[i0:i1]
        cols = lambda v0, v1: sims[:, v0:v1].T.contiguous()
        device = sims.device
    else:
        sims = np.asarray(sims)
        if sims.ndim != 2:
            raise ValueError(f'sims must be a [num_captions, num_videos] matrix, got shape {sims.shape}')
        rows = lambda i0, i1: _numpy_block(sims[i0:i1])
        cols = lambda v0, v1: _numpy_block(sims[:, v0:v1].T)
        device = torch.device('cpu')
    return _metrics(rows, cols, *sims.shape, cap2vid, chunk_size, device)


@torch.no_grad()
def compute_metrics_from_embeddings(text_emb, video_emb, cap2vid, chunk_size=None, device=None):
    """compute_metrics(text_emb @ video_emb.T, cap2vid) without ever holding the full matrix.

    text_emb `[N_c, D]`, video_emb `[N_v, D]` (tensors or arrays, any device; not re-normalised here).
    Both are moved once to `device` (None: text_emb's device) in their promoted dtype; t2v then streams
    blocks of captions (`text[i0:i1] @ video.T`) and v2t blocks of videos (`video[v0:v1] @ text.T`), so memory
    is the embeddings plus one block plus O(N_c) ranks. The similarities have the embeddings' precision
    (pass float64 for parity with the references' float64 error matrix; TF32 matmul, when the caller enabled
    it, lowers it). chunk_size as in compute_metrics.
    """
    text, video = torch.as_tensor(text_emb), torch.as_tensor(video_emb)
    if text.dim() != 2 or video.dim() != 2 or text.shape[1] != video.shape[1]:
        raise ValueError(f'expected text_emb [N_c, D] and video_emb [N_v, D], got shapes '
                         f'{tuple(text.shape)} and {tuple(video.shape)}')
    device = text.device if device is None else torch.device(device)
    dtype = torch.promote_types(text.dtype, video.dtype)
    text, video = text.to(device, dtype), video.to(device, dtype)
    rows = lambda i0, i1: text[i0:i1] @ video.T      # (B, N_v)
    cols = lambda v0, v1: video[v0:v1] @ text.T      # (B, N_c)
    return _metrics(rows, cols, text.shape[0], video.shape[0], cap2vid, chunk_size, device)


def _numpy_block(a):
    a = np.ascontiguousarray(a)
    # torch refuses to share read-only memory (np.load(..., mmap_mode='r')) without a warning
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def _metrics(row_block, col_block, num_captions, num_videos, cap2vid, chunk_size, device):
    """Both directions from block providers: row_block(i0, i1) -> sims[i0:i1] (B, N_v),
    col_block(v0, v1) -> sims[:, v0:v1].T (B, N_c)."""
    if num_captions == 0 or num_videos == 0:
        raise ValueError(f'cannot evaluate an empty similarity matrix ({num_captions} x {num_videos})')
    cap2vid = _check_cap2vid(cap2vid, num_captions, num_videos).to(device)
    t2v_chunk = _chunk(chunk_size, num_videos, device)
    v2t_chunk = _chunk(chunk_size, num_captions, device)

    t2v_rank = _t2v_places(row_block, cap2vid, t2v_chunk).double() + 1
    out = _summary('t2v', t2v_rank, 1.0 / t2v_rank)
    out.update(_v2t_summary(_v2t_places(col_block, cap2vid, num_videos, v2t_chunk), cap2vid, num_videos))
    out['sumr'] = sum(out[f'{d}_r{k}'] for d in ('t2v', 'v2t') for k in (1, 5, 10))
    return {k: out[k] for k in METRIC_KEYS}


def _check_cap2vid(cap2vid, num_captions, num_videos):
    c = torch.as_tensor(cap2vid)
    if c.dtype.is_floating_point or c.dtype.is_complex or c.dtype == torch.bool:
        raise ValueError(f'cap2vid must hold integer video columns, got dtype {c.dtype}')
    c = c.reshape(-1).long()
    if c.numel() != num_captions:
        raise ValueError(f'cap2vid has {c.numel()} entries but sims has {num_captions} caption rows; '
                         f'pass one video column per caption')
    lo, hi = int(c.min()), int(c.max())
    if lo < 0 or hi >= num_videos:
        raise ValueError(f'cap2vid values must lie in [0, {num_videos - 1}] (the video columns of sims), '
                         f'found {lo if lo < 0 else hi}')
    return c


def _chunk(chunk_size, width, device):
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise ValueError(f'chunk_size must be a positive number of queries, got {chunk_size}')
        return int(chunk_size)
    budget = _AUTO_BLOCK_ELEMENTS_CUDA if device.type == 'cuda' else _AUTO_BLOCK_ELEMENTS_CPU
    return max(1, budget // width)


def _places(rows, thr, col):
    """0-based places of targets in their rows' tie-broken descending order.

    rows (P, N); col (P,) target columns; thr (P,) = rows[p, col[p]].
    place_p = #{j : rows_pj > thr_p} + #{j < col_p : rows_pj == thr_p}.
    """
    if thr.dtype.is_floating_point and bool(torch.isnan(thr).any()):
        raise ValueError('a ground-truth similarity is NaN; the model produced non-finite embeddings')
    t = thr.unsqueeze(1)
    place = torch.count_nonzero(rows > t, dim=1)
    equal = rows == t                                                   # (P, N)
    # only rows where something besides the target itself ties need the index rule; usually none do
    tied = (torch.count_nonzero(equal, dim=1) > 1).nonzero().squeeze(1)
    if tied.numel():
        before = torch.arange(rows.shape[1], device=rows.device) < col[tied].unsqueeze(1)
        place[tied] += torch.count_nonzero(equal[tied] & before, dim=1)
    return place


def _t2v_places(row_block, cap2vid, chunk):
    """(N_c,) 0-based place of each caption's video in the caption's row."""
    places = []
    for i0 in range(0, cap2vid.numel(), chunk):
        col = cap2vid[i0:i0 + chunk]
        block = row_block(i0, i0 + col.numel()).to(cap2vid.device)     # (B, N_v)
        places.append(_places(block, block.gather(1, col.unsqueeze(1)).squeeze(1), col))
    return torch.cat(places)


def _v2t_places(col_block, cap2vid, num_videos, chunk):
    """(N_c,) 0-based place of caption i in the row of its own video cap2vid[i] (each caption is relevant
    to exactly one video, so one place per caption holds all of v2t)."""
    device = cap2vid.device
    by_video = torch.argsort(cap2vid, stable=True)          # captions grouped by video, ascending within
    counts = torch.bincount(cap2vid, minlength=num_videos)
    ends = counts.cumsum(0)
    starts = ends - counts
    ends_host = ends.tolist()
    places = torch.empty_like(cap2vid)
    for v0 in range(0, num_videos, chunk):
        v1 = min(v0 + chunk, num_videos)
        lo, hi = (ends_host[v0 - 1] if v0 else 0), ends_host[v1 - 1]
        if lo == hi:                                         # no captions: nothing to rank
            continue
        caps = by_video[lo:hi]
        # order pairs by their slot within the video (1st captions of all videos, then 2nd, ...) so that a
        # run of B pairs is usually exactly one caption per video and the block is used without a gather
        slot = torch.arange(lo, hi, device=device) - starts[cap2vid[caps]]
        caps = caps[torch.argsort(slot, stable=True)]
        vloc = cap2vid[caps] - v0
        block = col_block(v0, v1).to(device)                 # (B, N_c)
        n = v1 - v0
        every_video = torch.arange(n, device=device)
        for p0 in range(0, caps.numel(), n):
            c, r = caps[p0:p0 + n], vloc[p0:p0 + n]
            rows = block if r.numel() == n and bool((r == every_video).all()) else block[r]
            places[c] = _places(rows, block[r, c], c)
    return places


def _v2t_summary(places, cap2vid, num_videos):
    """Per-video best rank and AP (docs/evaluation.md, 'mAP') from each caption's place in its video's row."""
    num_captions = cap2vid.numel()
    counts = torch.bincount(cap2vid, minlength=num_videos)
    starts = counts.cumsum(0) - counts
    # sort by (video, place): within a video, places are distinct, so k = 1..R follows directly
    order = torch.argsort(cap2vid * num_captions + places)
    vid = cap2vid[order]
    pos = places[order].double() + 1                          # 1-based, ascending within each video
    k = (torch.arange(num_captions, device=cap2vid.device) - starts[vid] + 1).double()
    ap_sum = torch.zeros(num_videos, dtype=torch.float64, device=cap2vid.device).index_add_(0, vid, k / pos)
    has = counts > 0
    return _summary('v2t', pos[starts[has]], ap_sum[has] / counts[has])


def _summary(prefix, ranks, ap):
    """Recalls (percent), MedR (no floor), MeanR of 1-based float64 ranks; mAP (fraction) from per-query AP."""
    n = ranks.numel()
    s = ranks.sort().values
    out = {f'{prefix}_r{k}': 100.0 * int(torch.count_nonzero(ranks <= k)) / n for k in (1, 5, 10)}
    out[f'{prefix}_medr'] = float((s[(n - 1) // 2] + s[n // 2]) / 2)
    out[f'{prefix}_meanr'] = float(ranks.mean())
    out[f'{prefix}_map'] = float(ap.mean())
    return out


# ============ normalisation and fusion ============

def norm_score(sims):
    """Global min-max (docs/evaluation.md), on similarities: (s - min(s)) / max(s - min(s)) over the whole matrix -> [0, 1].

    The reference applies `-norm(-E)` to errors E = -s with the same arithmetic, so this is bit-identical to
    `-norm_score_reference(-s)` and ranks the same. A constant matrix (max = min) maps to zeros instead of
    the reference's 0/0 = NaN (every item ties either way). Integer input is promoted to float64.
    """
    s = torch.as_tensor(sims)
    if not s.dtype.is_floating_point:
        s = s.double()
    s = s - s.min()
    top = s.max()
    return s / top if top > 0 else s


def fuse(sims_a, sims_b, w):
    """w * norm_score(sims_a) + (1 - w) * norm_score(sims_b): the NRCCR fusion (docs/evaluation.md, 'Fusion')."""
    a, b = torch.as_tensor(sims_a), torch.as_tensor(sims_b)
    if a.shape != b.shape:
        raise ValueError(f'cannot fuse similarity matrices of shapes {tuple(a.shape)} and {tuple(b.shape)}')
    return w * norm_score(a) + (1 - w) * norm_score(b)


@torch.no_grad()
def similarity_range(text_emb, video_emb, chunk_rows=4096, device=None):
    """(min, max) of text_emb @ video_emb.T, streamed over blocks of captions (never the whole matrix)."""
    device = device or text_emb.device
    v = video_emb.to(device)
    lo, hi = float('inf'), float('-inf')
    for i in range(0, len(text_emb), chunk_rows):
        block = text_emb[i:i + chunk_rows].to(device) @ v.T
        lo, hi = min(lo, block.min().item()), max(hi, block.max().item())
    return lo, hi


def fusion_embeddings(text_a, text_b, video_emb, w, normalize, device=None):
    """Embeddings whose dot products rank exactly like the fused matrix, for galleries too large to hold it.

    fused = w * f(A) + (1 - w) * f(B) with A = text_a @ V.T, B = text_b @ V.T and f the global min-max
    (`normalize`, NRCCR) or the identity (MLCMR). Since f(S) = (S - lo) / (hi - lo), fused equals
    [w/r_a * text_a | (1-w)/r_b * text_b] @ [V | V].T minus a constant, and a constant changes no ranking.
    """
    scale_a, scale_b = w, 1.0 - w
    if normalize:
        lo_a, hi_a = similarity_range(text_a, video_emb, device=device)
        lo_b, hi_b = similarity_range(text_b, video_emb, device=device)
        scale_a /= (hi_a - lo_a) or 1.0
        scale_b /= (hi_b - lo_b) or 1.0
    return torch.cat([scale_a * text_a, scale_b * text_b], dim=1), torch.cat([video_emb, video_emb], dim=1)


# ============ reporting ============

_TABLE_COLUMNS = (('t2v R@1', 't2v_r1', 1, 1), ('R@5', 't2v_r5', 1, 1), ('R@10', 't2v_r10', 1, 1),
                  ('MedR', 't2v_medr', 1, 1), ('mAP', 't2v_map', 100, 2),
                  ('v2t R@1', 'v2t_r1', 1, 1), ('R@5', 'v2t_r5', 1, 1), ('R@10', 'v2t_r10', 1, 1),
                  ('MedR', 'v2t_medr', 1, 1), ('mAP', 'v2t_map', 100, 2), ('SumR', 'sumr', 1, 1))


def format_table(metrics, title=None):
    """The paper table (docs/evaluation.md, 'Published results') as markdown: t2v R@1 R@5 R@10 MedR mAP | v2t the same | SumR.

    Recalls, MedR and SumR with one decimal, mAP x100 with two (the README convention).
    """
    heads = [h for h, *_ in _TABLE_COLUMNS]
    cells = [f'{metrics[key] * scale:.{digits}f}' for _, key, scale, digits in _TABLE_COLUMNS]
    widths = [max(len(h), len(c)) for h, c in zip(heads, cells)]
    line = lambda items: '| ' + ' | '.join(x.rjust(w) for x, w in zip(items, widths)) + ' |'
    rule = '|' + '|'.join('-' * (w + 1) + ':' for w in widths) + '|'
    return '\n'.join(([title] if title else []) + [line(heads), rule, line(cells)])


# ============ encoding loops ============

@torch.inference_mode()
def _encode(model, embed, dataset, batch_size, device, workers, autocast, dist, desc, unit, batches=None):
    """Run `embed(batch)` over `batches` (lists of dataset indices; default consecutive file-order batches of
    `batch_size`) in eval mode, each rank taking every world-th batch; outputs on CPU in dataset order.
    Progress: a bar on a terminal, log lines elsewhere (basic/progress.py), on rank 0."""
    from torch.utils.data import DataLoader
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)
    batches = bucketing.file_order_batches(len(dataset), batch_size) if batches is None else batches
    loader = DataLoader(dataset, batch_sampler=batches[rank::world], collate_fn=collate, num_workers=workers,
                        pin_memory=device.type == 'cuda')
    was_training = model.training
    model.eval()
    index, parts = [], []
    try:
        for batch in track(loader, len(loader), desc, unit=unit, count=lambda b: len(b['index']),
                           enabled=rank == 0):
            with autocast():
                out = embed(move_to(batch, device))
            index.append(batch['index'])
            parts.append({k: v.float().cpu() for k, v in out.items()} if isinstance(out, dict)
                         else out.float().cpu())
    finally:
        model.train(was_training)
    if world > 1:
        gathered = dist.all_gather_object((index, parts))
        index = [i for idx, _ in gathered for i in idx]
        parts = [p for _, ps in gathered for p in ps]
    order = torch.cat(index).argsort()
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts])[order] for k in parts[0]}
    return torch.cat(parts)[order]


def encode_videos(model, dataset, batch_size, device, workers=0, autocast=contextlib.nullcontext, dist=None,
                  batches=None):
    """Unit-norm video embeddings (N_v, D) on CPU, in dataset order (docs/evaluation.md, 'Similarity matrices').
    `batches`: lists of dataset indices (default file order; the MLCMR video GRU reads the padding, so keep
    file order for parity)."""
    return _encode(model, lambda b: model.embed_videos(b['video']), dataset, batch_size, device, workers,
                   autocast, dist, 'encode videos', 'videos', batches)


def encode_texts(model, dataset, batch_size, device, workers=0, autocast=contextlib.nullcontext, dist=None,
                 batches=None):
    """{role: (N_c, D)} unit-norm caption embeddings on CPU, in dataset order. `batches`: lists of dataset
    indices, default consecutive file-order batches; with masked pooling basic/bucketing.caption_batches
    groups captions by length (less padding, the same embeddings)."""
    return _encode(model, lambda b: model.embed_texts(b['text']), dataset, batch_size, device, workers,
                   autocast, dist, 'encode captions', 'captions', batches)


def encode_split(model, data, batch_size, device, workers=0, autocast=contextlib.nullcontext, dist=None):
    """(texts, videos) of an evaluation split (basic/data_provider.py EvalData): {role: (N_c, D)} caption and
    (N_v, D) video embeddings on CPU. Captions go in length buckets when the model pools over valid positions
    only (less padding, same embeddings), else in the original file-order batches, which padded mean pooling
    depends on (basic/bucketing.py)."""
    videos = encode_videos(model, data.video_set, batch_size, device, workers, autocast, dist)
    batches = bucketing.caption_batches(data.table, batch_size, model.cfg.get('masked_pooling', False))
    texts = encode_texts(model, data.text_set, batch_size, device, workers, autocast, dist, batches=batches)
    return texts, videos


def l2_normalize(x):
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def similarity(text_emb, video_emb):
    """[captions, videos] cosine similarities in float64, rows re-l2-normalised (docs/evaluation.md,
    'Similarity matrices'): the references build this matrix in float64, and at 7,500 x 750 float32 moves
    a rank. The streamed path (`compute_metrics_from_embeddings` on the embeddings as given, float32 in the
    tester) skips this matrix and keeps the embeddings' precision."""
    text, video = torch.as_tensor(text_emb).double(), torch.as_tensor(video_emb).double()
    return l2_normalize(text) @ l2_normalize(video).T
