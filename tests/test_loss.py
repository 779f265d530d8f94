"""Losses (docs/losses.md): hand-computed values, slow loop references, precision and gradients."""
import math

import pytest
import torch

import loss as L


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return (x / x.norm(dim=1, keepdim=True)).float()


# Hand example for the triplet loss (B = 3, 2-d unit vectors, margin 0.25 so no hinge sits exactly at 0):
#   im = v0 (1,0), v1 (0,1), v2 (.8,.6);  s = s0 (1,0), s1 (.6,.8), s2 (0,1)
#   S_ij = <im_i, s_j> = [[1, .6, 0], [0, .8, 1], [.8, .96, .6]],  diag (1, .8, .6)
#   v2t, row i, [.25 + S_ij - S_ii]_+ off-diagonal:
#     row0: j1 .25+.6-1 < 0, j2 < 0            -> max 0,   sum 0
#     row1: j0 .25+0-.8 < 0, j2 .25+1-.8 = .45 -> max .45, sum .45
#     row2: j0 .25+.8-.6 = .45, j1 .25+.96-.6 = .61 -> max .61, sum 1.06
#     v2t hardest = 1.06, v2t all negatives = 1.51
#   t2v, column j, [.25 + S_ij - S_jj]_+ off-diagonal:
#     col0: i1 < 0, i2 .25+.8-1 = .05               -> max .05, sum .05
#     col1: i0 .25+.6-.8 = .05, i2 .25+.96-.8 = .41 -> max .41, sum .46
#     col2: i0 < 0, i1 .25+1-.6 = .65               -> max .65, sum .65
#     t2v hardest = 1.11, t2v all negatives = 1.16
TRI_IM = [[1, 0], [0, 1], [.8, .6]]
TRI_S = [[1, 0], [.6, .8], [0, 1]]


@pytest.mark.parametrize('direction, max_violation, cost_style, expected', [
    ('all', True, 'sum', 1.06 + 1.11),
    ('v2t', True, 'sum', 1.06),
    ('t2v', True, 'sum', 1.11),
    ('all', False, 'sum', 1.51 + 1.16),
    ('v2t', False, 'sum', 1.51),
    ('all', True, 'mean', (1.06 + 1.11) / 3),      # mean of the 3 hardest per part
    ('all', False, 'mean', (1.51 + 1.16) / 9),     # mean over all 3x3 entries per part
])
def test_triplet_hand_values(direction, max_violation, cost_style, expected):
    got = L.triplet_loss(t(TRI_S), t(TRI_IM), margin=0.25, max_violation=max_violation, cost_style=cost_style,
                         direction=direction)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_triplet_same_video_mask_hand_value():
    # items 1 and 2 show the same video: pairs (1,2) and (2,1) are no longer negatives.
    #   v2t: row1 loses j2 (.45) -> 0; row2 loses j1 (.61) -> .45 (j0)      => 0 + 0 + .45 = .45
    #   t2v: col1 loses i2 (.41) -> .05 (i0); col2 loses i1 (.65) -> 0      => .05 + .05 + 0 = .10
    same = torch.zeros(3, 3, dtype=torch.bool)
    same[1, 2] = same[2, 1] = True
    got = L.triplet_loss(t(TRI_S), t(TRI_IM), margin=0.25, same_video=same)
    assert got.item() == pytest.approx(0.55, abs=1e-6)
    no_dups = L.triplet_loss(t(TRI_S), t(TRI_IM), margin=0.25, same_video=torch.zeros(3, 3, dtype=torch.bool))
    assert no_dups.item() == pytest.approx(2.17, abs=1e-6)


def slow_triplet(s, im, margin, max_violation, cost_style, direction, same=None):
    B = len(s)
    S = [[sum(a * b for a, b in zip(im[i], s[j])) for j in range(B)] for i in range(B)]
    negative = [[i != j and not (same is not None and same[i][j]) for j in range(B)] for i in range(B)]
    total = 0.0
    parts = []
    if direction in ('all', 'v2t'):       # video i against captions j
        parts.append([[max(0.0, margin + S[i][j] - S[i][i]) if negative[i][j] else 0.0 for j in range(B)]
                      for i in range(B)])
    if direction in ('all', 't2v'):       # caption j against videos i; stored as rows j
        parts.append([[max(0.0, margin + S[i][j] - S[j][j]) if negative[i][j] else 0.0 for i in range(B)]
                      for j in range(B)])
    for cost in parts:
        values = [max(row) for row in cost] if max_violation else [c for row in cost for c in row]
        total += sum(values) / (1 if cost_style == 'sum' else len(values))
    return total


@pytest.mark.parametrize('max_violation', [True, False])
@pytest.mark.parametrize('cost_style', ['sum', 'mean'])
@pytest.mark.parametrize('direction', ['all', 't2v', 'v2t'])
def test_triplet_matches_slow_loop(max_violation, cost_style, direction):
    s, im = unit(6, 5, seed=1), unit(6, 5, seed=2)
    vids = [0, 1, 0, 2, 1, 3]
    same = torch.tensor([[a == b and i != j for j, b in enumerate(vids)] for i, a in enumerate(vids)])
    for mask in (None, same):
        got = L.triplet_loss(s, im, margin=0.2, max_violation=max_violation, cost_style=cost_style,
                             direction=direction, same_video=mask)
        ref = slow_triplet(s.tolist(), im.tolist(), 0.2, max_violation, cost_style, direction,
                           None if mask is None else mask.tolist())
        assert got.item() == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_triplet_rejects_unknown_direction():
    with pytest.raises(ValueError, match='direction'):
        L.triplet_loss(t(TRI_S), t(TRI_IM), direction='i2t')


# ============ DTL (docs/losses.md) ============

def test_dtl_hand_value():
    # tau = 1; v = I, teacher c_cross = I, student c_tr = rows swapped.
    #   v c_cross^T = I -> T_v2t rows: [p, q], [q, p] with p = e/(e+1), q = 1/(e+1); T_t2v identical.
    #   v c_tr^T = [[0,1],[1,0]] -> log_softmax row0 = [-lse, 1-lse], lse = log(1+e); row1 mirrored.
    #   row0: -(p(-lse) + q(1-lse)) = lse - q; row1 the same -> L_v2t = lse - q; L_t2v (c_tr v^T, same
    #   matrix) = lse - q  =>  L_dtl = log(1+e) - 1/(1+e) = 1.313262 - 0.268941 = 1.044321
    v = t([[1, 0], [0, 1]])
    c_cross = t([[1, 0], [0, 1]])
    c_tr = t([[0, 1], [1, 0]])
    expected = math.log(1 + math.e) - 1 / (1 + math.e)
    assert L.dtl_loss(c_tr, c_cross, v, tau=1.0).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(1.044321, abs=1e-6)


def slow_dtl(c_tr, c_cross, v, tau):
    B = len(v)
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))

    def softmax(row):
        m = max(row)
        e = [math.exp(x - m) for x in row]
        return [x / sum(e) for x in e]

    def cross_entropy(teacher_rows, student_rows):
        total = 0.0
        for tr, sr in zip(teacher_rows, student_rows):
            total -= sum(p * math.log(q) for p, q in zip(softmax(tr), softmax(sr)))
        return total / B

    l_v2t = cross_entropy([[dot(v[i], c_cross[j]) / tau for j in range(B)] for i in range(B)],
                          [[dot(v[i], c_tr[j]) / tau for j in range(B)] for i in range(B)])
    l_t2v = cross_entropy([[dot(c_cross[i], v[j]) / tau for j in range(B)] for i in range(B)],
                          [[dot(c_tr[i], v[j]) / tau for j in range(B)] for i in range(B)])
    return 0.5 * (l_v2t + l_t2v)


def test_dtl_matches_slow_loop():
    c_tr, c_cross, v = unit(5, 4, seed=3), unit(5, 4, seed=4), unit(5, 4, seed=5)
    for tau in (0.07, 0.5):
        ref = slow_dtl(c_tr.tolist(), c_cross.tolist(), v.tolist(), tau)
        for flag in (False, True):       # the flag changes gradients, not the value
            got = L.dtl_loss(c_tr, c_cross, v, tau=tau, detach_video_in_teacher=flag)
            assert got.item() == pytest.approx(ref, rel=1e-5)


def test_dtl_gradients_reference_and_detached_teacher():
    c_tr0, c_cross0, v0 = unit(4, 3, seed=6), unit(4, 3, seed=7), unit(4, 3, seed=8)

    def grads(flag):
        c_tr, c_cross, v = (x.clone().requires_grad_() for x in (c_tr0, c_cross0, v0))
        L.dtl_loss(c_tr, c_cross, v, tau=0.1, detach_video_in_teacher=flag).backward()
        return c_tr.grad, c_cross.grad, v.grad

    g_tr_ref, g_cross_ref, g_v_ref = grads(False)
    g_tr_det, g_cross_det, g_v_det = grads(True)
    assert g_cross_ref is None and g_cross_det is None         # teacher c_cross is always detached
    assert torch.allclose(g_tr_ref, g_tr_det)                    # the student side is the same
    # With the whole teacher detached, v's gradient is the student path alone: rebuild it with fixed targets.
    v = v0.clone().requires_grad_()
    with torch.no_grad():
        T = v0 @ c_cross0.t() / 0.1
        T_v2t, T_t2v = T.softmax(1), T.t().softmax(1)
    student = v @ c_tr0.t() / 0.1
    manual = -0.5 * ((T_v2t * student.log_softmax(1)).sum(1).mean()
                     + (T_t2v * student.t().log_softmax(1)).sum(1).mean())
    manual.backward()
    assert torch.allclose(g_v_det, v.grad, atol=1e-6)
    # the reference also sends gradient to v through the target softmax
    assert (g_v_ref - g_v_det).abs().max() > 1e-3


# ============ feature-view distillation (docs/losses.md) ============

def test_feature_distill_hand_values():
    # x = c_tr - c_cross = [[.4, -.8], [0, 0]]
    # beta 4: every |x| < 4 -> x^2/8: .16/8 + .64/8 = .10; mean over 4 elements = .025
    # beta .5: .4 < .5 -> .5*.16/.5 = .16; .8 >= .5 -> .8 - .25 = .55; (.16 + .55)/4 = .1775
    c_tr, c_cross = t([[1, 0], [0, 1]]), t([[.6, .8], [0, 1]])
    assert L.feature_distill_loss(c_tr, c_cross).item() == pytest.approx(0.025, abs=1e-7)
    assert L.feature_distill_loss(c_tr, c_cross, beta=0.5).item() == pytest.approx(0.1775, abs=1e-7)


def test_feature_distill_gradients():
    c_tr, c_cross = unit(3, 4, seed=9).requires_grad_(), unit(3, 4, seed=10).requires_grad_()
    L.feature_distill_loss(c_tr, c_cross).backward()
    # reference: both sides get gradient, opposite; with beta 4 and |x| < 4 it is (c_tr - c_cross)/(4 * 12)
    assert torch.allclose(c_tr.grad, (c_tr - c_cross).detach() / 48, atol=1e-7)
    assert torch.allclose(c_cross.grad, -c_tr.grad)
    c_tr.grad = c_cross.grad = None
    L.feature_distill_loss(c_tr, c_cross, detach_teacher=True).backward()
    assert c_cross.grad is None and c_tr.grad.abs().sum() > 0


# ============ InfoNCE (docs/losses.md) ============

def test_info_nce_hand_value():
    # tau = 1; im = (1,0), (0,1); s = (1,0), (.6,.8) -> S = im s^T = [[1, .6], [0, .8]]
    #   row0: -log(e^1 / (e^1 + e^.6)) = log(1 + e^-.4) = 0.513015
    #   row1: -log(e^.8 / (e^0 + e^.8)) = log(1 + e^-.8) = 0.371101         sum = 0.884116
    # swapped roles (S^T = [[1, 0], [.6, .8]]): log(1 + e^-1) + log(1 + e^-.2) = 0.313262 + 0.598139 = 0.911401
    im, s = t([[1, 0], [0, 1]]), t([[1, 0], [.6, .8]])
    nce = math.log(1 + math.exp(-.4)) + math.log(1 + math.exp(-.8))
    swapped = math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-.2))
    assert nce == pytest.approx(0.884116, abs=1e-6) and swapped == pytest.approx(0.911401, abs=1e-6)
    assert L.info_nce(s, im, tau=1.0).item() == pytest.approx(nce, abs=1e-6)
    assert L.info_nce(im, s, tau=1.0).item() == pytest.approx(swapped, abs=1e-6)
    assert L.symmetric_info_nce(s, im, tau=1.0).item() == pytest.approx(0.5 * (nce + swapped), abs=1e-6)


def plain_exp_nce(s, im, tau):
    """The reference's form: sum_i -log(exp(S_ii/tau) / sum_j exp(S_ij/tau)), no log-sum-exp."""
    E = torch.exp(im @ s.t() / tau)
    return -torch.log(E.diag() / E.sum(1)).sum()


def test_info_nce_matches_plain_exp_and_slow_loop():
    s, im = unit(6, 8, seed=11), unit(6, 8, seed=12)
    got = L.info_nce(s, im, tau=0.07)
    assert got.item() == pytest.approx(plain_exp_nce(s.double(), im.double(), 0.07).item(), rel=1e-5)
    slow = 0.0
    for i in range(6):
        logits = [sum(a * b for a, b in zip(im[i].tolist(), s[j].tolist())) / 0.07 for j in range(6)]
        slow += -logits[i] + math.log(sum(math.exp(x) for x in logits))
    assert got.item() == pytest.approx(slow, rel=1e-5)


def test_info_nce_finite_where_plain_exp_overflows_in_half():
    s, im = unit(4, 8, seed=13), unit(4, 8, seed=14)
    s[0], im[0] = 1.0 / math.sqrt(8), 1.0 / math.sqrt(8)      # S_00 = 1 -> exp(1/0.07) ~ 1.6e6 > fp16 max
    ref = L.info_nce(s, im).item()
    assert not torch.isfinite(plain_exp_nce(s.half(), im.half(), 0.07))
    got = L.info_nce(s.half(), im.half())
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert got.item() == pytest.approx(ref, rel=1e-2)          # only the fp16 rounding of the inputs differs


def test_losses_stay_float32_under_bf16_autocast():
    # Under CPU autocast a plain matmul runs in bf16 (about 3 significant digits); ours must not.
    s, im, c = unit(8, 16, seed=15), unit(8, 16, seed=16), unit(8, 16, seed=17)
    ref = [L.info_nce(s, im), L.triplet_loss(s, im), L.dtl_loss(s, c, im)]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert (im @ s.t()).dtype == torch.bfloat16            # autocast really is active here
        got = [L.info_nce(s, im), L.triplet_loss(s, im), L.dtl_loss(s, c, im)]
    for r, g in zip(ref, got):
        assert g.dtype == torch.float32 and g.item() == pytest.approx(r.item(), rel=1e-6)


# ============ adversarial (docs/losses.md) ============

def test_gan_loss_hand_values():
    # logits (0, 0): log 2 either way
    # logits (2, -1), real (target 1,1): [log(1+e^-2) + log(1+e^1)]/2 = (0.126928 + 1.313262)/2 = 0.720095
    #                 fake (target 0,0): [log(1+e^2) + log(1+e^-1)]/2 = (2.126928 + 0.313262)/2 = 1.220095
    assert L.gan_loss(t([[0, 0]]), True).item() == pytest.approx(math.log(2), abs=1e-6)
    assert L.gan_loss(t([[2, -1]]), True).item() == pytest.approx(0.720095, abs=1e-6)
    assert L.gan_loss(t([[2, -1]]), False).item() == pytest.approx(1.220095, abs=1e-6)
    # batch mean over both rows and both logits
    both = L.gan_loss(t([[0, 0], [2, -1]]), True).item()
    assert both == pytest.approx((math.log(2) + 0.720095) / 2, abs=1e-6)


def test_gan_accuracy():
    logits = t([[2, -1], [0, 3], [-1, 1], [1, 1]])   # argmax 0, 1, 1, 0 (a tie picks the first)
    assert L.gan_accuracy(logits, True) == pytest.approx(0.5)
    assert L.gan_accuracy(logits, False) == pytest.approx(0.5)
    assert L.gan_accuracy(t([[0, 1], [0, 2], [3, 0]]), True) == pytest.approx(2 / 3)
