"""Retrieval metrics (docs/evaluation.md) against a slow, literal reference, hand-computed examples, and fusion."""
import warnings

import numpy as np
import pytest
import torch

from evaluation import (METRIC_KEYS, compute_metrics, compute_metrics_from_embeddings, format_table, fuse,
                        norm_score)


# ============ slow reference: one stable argsort per query, AP by its definition ============

def reference_metrics(sims, cap2vid):
    """docs/evaluation.md written out with loops; ties go to the lower index (stable sort of the errors)."""
    errors = -np.asarray(sims, dtype=np.float64)
    num_captions, num_videos = errors.shape
    out = {}
    t2v = []
    for i in range(num_captions):
        order = np.argsort(errors[i], kind='stable')
        rank = int(np.where(order == cap2vid[i])[0][0]) + 1
        t2v.append((rank, 1.0 / rank))
    v2t = []
    for v in range(num_videos):
        relevant = {i for i in range(num_captions) if cap2vid[i] == v}
        if not relevant:
            continue
        order = np.argsort(errors[:, v], kind='stable')
        hits, precision_sum, rank = 0, 0.0, None
        for position, caption in enumerate(order, start=1):
            if caption in relevant:
                hits += 1
                precision_sum += hits / position
                rank = rank or position
        v2t.append((rank, precision_sum / len(relevant)))
    for prefix, results in (('t2v', t2v), ('v2t', v2t)):
        ranks = np.array([r for r, _ in results], dtype=np.float64)
        for k in (1, 5, 10):
            out[f'{prefix}_r{k}'] = 100.0 * np.mean(ranks <= k)
        out[f'{prefix}_medr'] = float(np.median(ranks))
        out[f'{prefix}_meanr'] = float(np.mean(ranks))
        out[f'{prefix}_map'] = float(np.mean([ap for _, ap in results]))
    out['sumr'] = sum(out[f'{p}_r{k}'] for p in ('t2v', 'v2t') for k in (1, 5, 10))
    return out


def random_gallery(rng, num_videos, max_captions=10):
    """1..max_captions captions per video, rows shuffled so a video's captions are scattered."""
    cap2vid = np.repeat(np.arange(num_videos), rng.integers(1, max_captions + 1, num_videos))
    return rng.permutation(cap2vid)


def assert_close(got, expected, tol=1e-6):
    assert tuple(got) == METRIC_KEYS
    for k in METRIC_KEYS:
        assert got[k] == pytest.approx(expected[k], abs=tol), k


# ============ hand-computed ============

# 3 captions x 2 videos; captions 0 and 2 show video 0, caption 1 shows video 1.
HAND_SIMS = [[0.9, 0.5],
             [0.5, 0.5],
             [0.1, 0.3]]
HAND_CAP2VID = [0, 1, 0]
# t2v: caption 0: 0.9 > 0.5                        -> rank 1
#      caption 1: tie 0.5 = 0.5, video 0 goes first -> rank 2
#      caption 2: 0.3 > 0.1                         -> rank 2
#      ranks (1, 2, 2): R@1 = 100/3, R@5 = R@10 = 100, MedR 2, MeanR 5/3, mAP = (1 + 1/2 + 1/2) / 3 = 2/3
# v2t: video 0 column (0.9, 0.5, 0.1) -> order c0, c1, c2; relevant {c0, c2} at places 1 and 3
#      -> rank 1, AP = (1/1 + 2/3) / 2 = 5/6
#      video 1 column (0.5, 0.5, 0.3) -> tie, c0 before c1; relevant {c1} at place 2 -> rank 2, AP = 1/2
#      ranks (1, 2): R@1 = 50, R@5 = R@10 = 100, MedR 1.5 (not floored), MeanR 1.5, mAP = (5/6 + 1/2) / 2 = 2/3
# SumR = 100/3 + 100 + 100 + 50 + 100 + 100
HAND_EXPECTED = dict(t2v_r1=100 / 3, t2v_r5=100.0, t2v_r10=100.0, t2v_medr=2.0, t2v_meanr=5 / 3, t2v_map=2 / 3,
                     v2t_r1=50.0, v2t_r5=100.0, v2t_r10=100.0, v2t_medr=1.5, v2t_meanr=1.5, v2t_map=2 / 3,
                     sumr=100 / 3 + 450)


@pytest.mark.parametrize('as_type', [np.array, torch.tensor, lambda x: torch.tensor(x, dtype=torch.float64)])
def test_hand_computed_3x2(as_type):
    got = compute_metrics(as_type(HAND_SIMS), HAND_CAP2VID)
    assert_close(got, HAND_EXPECTED, tol=1e-12)
    assert_close(reference_metrics(HAND_SIMS, HAND_CAP2VID), HAND_EXPECTED, tol=1e-12)


def test_read_only_array_is_accepted_without_warnings():
    sims = np.array(HAND_SIMS)
    sims.setflags(write=False)          # as np.load(..., mmap_mode='r') returns
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert_close(compute_metrics(sims, np.array(HAND_CAP2VID)), HAND_EXPECTED, tol=1e-12)


def test_video_without_captions_is_left_out_of_v2t():
    sims = np.hstack([np.array(HAND_SIMS), np.full((3, 1), -1.0)])   # video 2: no caption, ranked last
    assert_close(compute_metrics(sims, HAND_CAP2VID), HAND_EXPECTED, tol=1e-12)


def test_perfect_diagonal():
    n = 37
    sims = torch.eye(n) + 0.01 * torch.rand(n, n, generator=torch.Generator().manual_seed(0))
    m = compute_metrics(sims, torch.arange(n))
    for d in ('t2v', 'v2t'):
        assert (m[f'{d}_r1'], m[f'{d}_r10'], m[f'{d}_medr'], m[f'{d}_meanr'], m[f'{d}_map']) == (100, 100, 1, 1, 1)
    assert m['sumr'] == 600


def test_worst_case_ranks_and_units():
    # every caption's video is the least similar of 20: rank 20, AP 1/20
    n = 20
    sims = -torch.eye(n)
    m = compute_metrics(sims, list(range(n)))
    assert all(isinstance(m[k], float) for k in METRIC_KEYS)
    assert (m['t2v_r10'], m['t2v_medr'], m['t2v_meanr']) == (0.0, 20.0, 20.0)
    assert m['t2v_map'] == pytest.approx(1 / 20) and m['v2t_map'] == pytest.approx(1 / 20)


# ============ against the reference ============

@pytest.mark.parametrize('seed', range(6))
@pytest.mark.parametrize('quantised', [False, True])
def test_matches_reference_on_random_galleries(seed, quantised):
    rng = np.random.default_rng(seed)
    cap2vid = random_gallery(rng, num_videos=int(rng.integers(2, 30)))
    sims = rng.standard_normal((len(cap2vid), cap2vid.max() + 1))
    if quantised:   # only 5 distinct values: ties everywhere, so the index rule decides most ranks
        sims = np.round(sims * 2) / 2
    expected = reference_metrics(sims, cap2vid)
    assert_close(compute_metrics(sims, cap2vid), expected)
    assert_close(compute_metrics(torch.from_numpy(sims).float(), torch.from_numpy(cap2vid)), expected)


def test_chunk_size_never_changes_the_result():
    rng = np.random.default_rng(7)
    cap2vid = random_gallery(rng, num_videos=23)
    sims = np.round(rng.standard_normal((len(cap2vid), 23)), 1)
    full = compute_metrics(sims, cap2vid)
    assert_close(full, reference_metrics(sims, cap2vid))
    for chunk in (1, 2, 3, 5, 8, 22, 23, 1000):
        assert compute_metrics(sims, cap2vid, chunk_size=chunk) == full, chunk
    with pytest.raises(ValueError, match='chunk_size'):
        compute_metrics(sims, cap2vid, chunk_size=0)


def test_nan_off_the_ground_truth_ranks_last_like_numpy():
    rng = np.random.default_rng(3)
    cap2vid = random_gallery(rng, num_videos=12)
    sims = rng.standard_normal((len(cap2vid), 12))
    off_gt = rng.random(sims.shape) < 0.3
    off_gt[np.arange(len(cap2vid)), cap2vid] = False
    sims[off_gt] = np.nan
    assert_close(compute_metrics(sims, cap2vid), reference_metrics(sims, cap2vid))
    sims[0, cap2vid[0]] = np.nan
    with pytest.raises(ValueError, match='NaN'):
        compute_metrics(sims, cap2vid)


def test_from_embeddings_matches_reference():
    rng = np.random.default_rng(11)
    cap2vid = random_gallery(rng, num_videos=25)
    # small integers: every dot product is exact in any summation order, and ties are frequent
    text = torch.from_numpy(rng.integers(-2, 3, (len(cap2vid), 4))).float()
    video = torch.from_numpy(rng.integers(-2, 3, (25, 4))).float()
    expected = reference_metrics((text @ video.T).numpy(), cap2vid)
    for chunk in (None, 1, 4, 25, 10_000):
        assert_close(compute_metrics_from_embeddings(text, video, cap2vid, chunk_size=chunk), expected)
    # generic float64 embeddings (no ties) and numpy inputs
    text, video = rng.standard_normal((len(cap2vid), 8)), rng.standard_normal((25, 8))
    assert_close(compute_metrics_from_embeddings(text, video, cap2vid, chunk_size=3),
                 reference_metrics(text @ video.T, cap2vid))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_matches_cpu():
    rng = np.random.default_rng(5)
    cap2vid = random_gallery(rng, num_videos=300)
    sims = torch.from_numpy(np.round(rng.standard_normal((len(cap2vid), 300)), 1))
    expected = compute_metrics(sims, cap2vid)
    assert compute_metrics(sims.cuda(), cap2vid) == expected
    text = torch.from_numpy(rng.integers(-2, 3, (len(cap2vid), 6))).double()
    video = torch.from_numpy(rng.integers(-2, 3, (300, 6))).double()
    assert compute_metrics_from_embeddings(text, video, cap2vid, device='cuda') == \
        compute_metrics(text @ video.T, cap2vid)


def test_bad_arguments_are_refused():
    sims = np.zeros((3, 2))
    with pytest.raises(ValueError, match='3 caption rows'):
        compute_metrics(sims, [0, 1])
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        compute_metrics(sims, [0, 1, 2])
    with pytest.raises(ValueError, match='integer'):
        compute_metrics(sims, [0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match='matrix'):
        compute_metrics(np.zeros(3), [0, 0, 0])
    with pytest.raises(ValueError, match='shapes'):
        compute_metrics_from_embeddings(np.zeros((3, 4)), np.zeros((2, 5)), [0, 1, 1])


# ============ normalisation, fusion, table ============

def norm_score_spec(errors):
    """docs/evaluation.md, 'Fusion', verbatim, on errors."""
    s = -errors
    s = s - s.min()
    s = s / s.max()
    return -s


def test_norm_score_hand_values_and_spec_equivalence():
    s = torch.tensor([[1.0, 3.0], [5.0, 2.0]])
    assert torch.equal(norm_score(s), torch.tensor([[0.0, 0.5], [1.0, 0.25]]))
    assert torch.equal(norm_score(np.array([[1, 3], [5, 2]])), torch.tensor([[0.0, 0.5], [1.0, 0.25]],
                                                                            dtype=torch.float64))
    rand = torch.randn(40, 9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(-norm_score_spec(-rand), norm_score(rand))
    assert torch.equal(norm_score(norm_score(rand)), norm_score(rand))           # idempotent
    assert torch.equal(norm_score(torch.full((2, 3), 0.7)), torch.zeros(2, 3))   # constant: no 0/0


def test_fuse_hand_values_and_spec_equivalence():
    a = torch.tensor([[1.0, 3.0], [5.0, 2.0]], dtype=torch.float64)    # -> [[0, .5], [1, .25]]
    b = torch.tensor([[0.0, 10.0], [5.0, 0.0]], dtype=torch.float64)   # -> [[0, 1], [.5, 0]]
    fused = fuse(a, b, 0.2)
    assert torch.allclose(fused, torch.tensor([[0.0, 0.9], [0.6, 0.05]], dtype=torch.float64), atol=1e-15)
    # the reference fuses errors: E = w * norm(E1) + (1 - w) * norm(E2); it is -fuse on similarities
    assert torch.equal(0.2 * norm_score_spec(-a) + 0.8 * norm_score_spec(-b), -fused)
    with pytest.raises(ValueError, match='shapes'):
        fuse(a, b[:1], 0.5)


def test_format_table_readme_row():
    row = dict(t2v_r1=30.8, t2v_r5=64.4, t2v_r10=74.6, t2v_medr=3.0, t2v_meanr=9.1, t2v_map=0.4578,
               v2t_r1=43.1, v2t_r5=72.3, v2t_r10=81.4, v2t_medr=2.0, v2t_meanr=5.2, v2t_map=0.3257, sumr=366.6)
    lines = format_table(row, title='VATEX en2cn').splitlines()
    assert lines[0] == 'VATEX en2cn'
    cells = lambda line: [c.strip() for c in line.strip('|').split('|')]
    assert cells(lines[1]) == ['t2v R@1', 'R@5', 'R@10', 'MedR', 'mAP', 'v2t R@1', 'R@5', 'R@10', 'MedR', 'mAP',
                               'SumR']
    assert set(lines[2]) <= set('|-:')
    assert cells(lines[3]) == ['30.8', '64.4', '74.6', '3.0', '45.78', '43.1', '72.3', '81.4', '2.0', '32.57',
                               '366.6']
    assert len({len(line) for line in lines[1:]}) == 1                          # columns line up
    assert format_table(row).splitlines()[0].startswith('| t2v R@1')
