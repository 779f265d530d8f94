"""Losses of NRCCR, MLCMR and the multilingual CLIP model (docs/losses.md), as pure functions on tensors.

Embeddings may arrive in fp16/bf16 under autocast. Similarities are computed in float32 with autocast
switched off locally, so the softmaxes, logs and hinges that follow are float32 too: `exp(1/0.07)` overflows
fp16, and a bf16 similarity is too coarse for margins of 0.2 at temperature 0.07. Gradients still flow back
to the low-precision inputs.

Convention throughout: `S = im @ s.T`, i.e. `S_ij = <im_i, s_j>` (rows = videos / anchors, columns = captions /
candidates).
"""
import torch
import torch.nn.functional as F


def _fp32(x):
    """Context that switches autocast off on `x`'s device (autocast would run a matmul in fp16/bf16)."""
    return torch.autocast(x.device.type, enabled=False)


def _sims(im, s):
    """S = im @ s.T in float32, (B_im, B_s)."""
    with _fp32(im):
        return im.float() @ s.float().t()


def triplet_loss(s, im, margin=0.2, max_violation=True, cost_style='sum', direction='all', same_video=None):
    """Bidirectional hinge loss `Tri(s, im)` (docs/losses.md, 'Triplet ranking loss'), with `S = im @ s.T` (float32):

        v2t part (rows, direction 'v2t'):    C^s_ij  = [margin + S_ij - S_ii]_+, reduced over j per row i
        t2v part (columns, direction 't2v'): C^im_ij = [margin + S_ij - S_jj]_+, reduced over i per column j

    The diagonal is zeroed. `max_violation`: only the hardest negative per row/column counts (every
    reference script); otherwise all negatives do. `cost_style` 'sum' sums what is left, 'mean' averages it
    (over the B hardest values, or over all B*B entries). direction 'all' adds both parts.

    `same_video`: optional (B, B) bool, True where items i != j show the same video; such pairs are not
    negatives (zeroed like the diagonal). None = the reference, which treats them as negatives.
    """
    if direction not in ('all', 't2v', 'v2t'):
        raise ValueError(f"direction must be 'all', 't2v' or 'v2t', got {direction!r}")
    if cost_style not in ('sum', 'mean'):
        raise ValueError(f"cost_style must be 'sum' or 'mean', got {cost_style!r}")
    S = _sims(im, s)                                            # (B, B)
    diag = S.diag()
    not_negative = torch.eye(S.shape[0], dtype=torch.bool, device=S.device)
    if same_video is not None:
        not_negative = not_negative | same_video.to(S.device, torch.bool)
    reduce = torch.sum if cost_style == 'sum' else torch.mean
    total = S.new_zeros(())
    if direction in ('all', 'v2t'):
        cost_s = (margin + S - diag.view(-1, 1)).clamp(min=0).masked_fill(not_negative, 0)
        total = total + reduce(cost_s.max(dim=1).values if max_violation else cost_s)
    if direction in ('all', 't2v'):
        cost_im = (margin + S - diag.view(1, -1)).clamp(min=0).masked_fill(not_negative, 0)
        total = total + reduce(cost_im.max(dim=0).values if max_violation else cost_im)
    return total


def dtl_loss(c_tr, c_cross, v, tau=0.07, detach_video_in_teacher=False):
    """Similarity-view self-distillation (docs/losses.md), float32:

        T_v2t = softmax_row(v c_cross^T / tau),   T_t2v = softmax_row(c_cross v^T / tau)
        L_v2t = -(1/B) sum_ij T_v2t[i,j] log_softmax_row(v c_tr^T / tau)[i,j]
        L_t2v = -(1/B) sum_ij T_t2v[i,j] log_softmax_row(c_tr v^T / tau)[i,j]
        L_dtl = (L_v2t + L_t2v) / 2

    `c_cross` is always detached. Reference: `v` is not detached inside the teacher, so the video embeddings
    also get gradient through the target distributions; `detach_video_in_teacher` detaches the whole teacher.
    """
    teacher = _sims(v.detach() if detach_video_in_teacher else v, c_cross.detach()) / tau  # (B, B), rows = videos
    student = _sims(v, c_tr) / tau
    l_v2t = -(teacher.softmax(1) * student.log_softmax(1)).sum(1).mean()
    l_t2v = -(teacher.t().softmax(1) * student.t().log_softmax(1)).sum(1).mean()
    return 0.5 * (l_v2t + l_t2v)


def feature_distill_loss(c_tr, c_cross, beta=4.0, detach_teacher=False):
    """Feature-view self-distillation (docs/losses.md): SmoothL1(c_tr, c_cross; beta), mean over all elements,

        l(x) = 0.5 x^2 / beta if |x| < beta else |x| - 0.5 beta,   x = c_tr - c_cross.

    Reference: neither side detached (c_cross gets gradient here only); `detach_teacher` detaches c_cross.
    """
    teacher = c_cross.detach() if detach_teacher else c_cross
    return F.smooth_l1_loss(c_tr.float(), teacher.float(), beta=beta, reduction='mean')


def info_nce(s, im, tau=0.07):
    """InfoNCE as in MLCMR (docs/losses.md, 'InfoNCE'), one direction, summed over the batch:

        NCE(s, im) = sum_i -log softmax_j(S_ij / tau)[i],   S = im @ s.T  (rows = `im` anchors)

    Computed as `cross_entropy(S / tau, arange(B), reduction='sum')` in float32: the same value as the
    reference's plain-`exp` form, without its overflow in fp16/bf16.
    """
    logits = _sims(im, s) / tau                                 # (B, B)
    target = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, target, reduction='sum')


def symmetric_info_nce(a, b, tau=0.07):
    """0.5 * (NCE(a, b) + NCE(b, a)), the form of every InfoNCE term (docs/losses.md, 'MLCMR objective')."""
    return 0.5 * (info_nce(a, b, tau) + info_nce(b, a, tau))


def clip_info_nce(text, video, logit_scale, same_video=None):
    """CLIP's symmetric InfoNCE (docs/losses.md, 'Multilingual CLIP objective'), mean over the batch, float32:

        Z = s · text @ video.T   (B, B), s = exp(logit_scale) the learnable inverse temperature
        L = ( CE(Z, arange(B)) + CE(Z.T, arange(B)) ) / 2

    `same_video`: optional (B, B) bool, True where rows i != j show the same video; those pairs are removed
    from the softmaxes (Z_ij = -inf) instead of counting as negatives.
    """
    logits = logit_scale * _sims(text, video)                     # (B, B), rows = captions
    if same_video is not None:
        logits = logits.masked_fill(same_video.to(logits.device, torch.bool), float('-inf'))
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def c2kd_loss(student_text, teacher_text, video, logit_scale):
    """Cross-lingual cross-modal distillation (C2KD, Rouditchenko et al., ICASSP 2023; docs/losses.md,
    'Multilingual CLIP objective'): the student's distribution over the batch's videos for a translated caption
    is trained towards the teacher's for its English caption, by cross-entropy, teacher detached, float32:

        P = softmax_row(s · teacher_text @ video.T)   (detached)
        L = -(1/B) sum_ij P_ij log softmax_row(s · student_text @ video.T)_ij
    """
    with torch.no_grad():
        teacher = (logit_scale * _sims(teacher_text, video)).softmax(dim=1)      # (B, B)
    student = (logit_scale * _sims(student_text, video)).log_softmax(dim=1)
    return -(teacher * student).sum(dim=1).mean()


def gan_loss(logits, real: bool):
    """docs/losses.md, 'Adversarial term': BCEWithLogits(logits, target), the target of the logits' shape (B, 2)
    filled with 1 (real = source language) or 0 (fake = translation), so both logits are pushed the same
    way (reference behaviour); mean over all elements, float32."""
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, float(real)))


def gan_accuracy(logits, real: bool) -> torch.Tensor:
    """Fraction of rows whose argmax over the 2 logits equals the label (1 real, 0 fake); logged only. A 0-d
    tensor on the logits' device: reading it (`float(...)`) is left to the logger, so the training step does
    not wait for the device."""
    return (logits.detach().argmax(dim=1) == int(real)).float().mean()
