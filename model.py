"""The two retrieval models, NRCCR and MLCMR (docs/models.md), behind one interface.

Both are built from a plain config dict (`model_cfg`, stored in every checkpoint) by `build_model(cfg)`
and expose the same methods, so one trainer and one tester serve both:

    outputs = model(batch)                        # training forward: every embedding the loss needs
    logs = model.discriminator_step(outputs, optimizers)   # NRCCR: its discriminator's own step; MLCMR: {}
    loss, logs = model.training_loss(outputs)     # scalar loss + dict of detached 0-d tensors to log
    model.embed_videos(video_batch) -> (B, D)     # unit-norm video embeddings
    model.embed_texts(text_batch) -> {role: (B, D)}   # unit-norm embeddings per caption stream
    model.configure_optimizers(lr, glr) -> {name: optimizer}
    model.validation_score(sims, cap2vid) -> (score, logs)
    model.fusion_sweep(...) -> [(label, weight on the primary stream)]

`forward` and `training_loss` are split so that `forward` can run under DistributedDataParallel while the
loss (which may gather embeddings across ranks) runs on the unwrapped model. Nothing here touches argparse,
devices or torch.distributed: the trainer hands in `gather` / `grad_sync` callables with
`model.set_distributed(...)`. One training step, in order, is util/training.py `train_step`.

Each model class also carries RUN_DEFAULTS: the run settings that depend on the model (batch sizes, the
run-folder component `cv_name`), used by the trainer and the tester when the flags leave them unset.

Parity defaults follow docs/parity.md, 'Parity switches'; each clean alternative is a config key (see DEFAULTS).
"""
import copy
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import evaluation
import loss as losses
from basic import paths
from basic.errors import DataError
from util import checkpoint as ckpt

# Config keys shared by both models; each model adds its own (see NRCCR.DEFAULTS / MLCMR.DEFAULTS).
COMMON_DEFAULTS = dict(
    bert_name='bert-base-multilingual-cased',  # hub id or local folder, used only when bert_config is None
    bert_config=None,          # dict of the BERT config; set after the first build so a checkpoint rebuilds offline
    trainable_layers=None,     # BERT parameter-name stems to fine-tune, e.g. ['layer.5', ..., 'layer.11']
    frozen='frozen',           # 'frozen' (only trainable_layers), 'all_frozen', 'finetune' (all of BERT)
    visual_feat_dim=1024,
    mapping_dim=1536,
    mapping_dropout=0.2,
    margin=0.2,
    max_violation=True,
    cost_style='sum',
    direction='all',
    masked_pooling=False,      # parity: mean over all padded positions (docs/models.md, 'NRCCR building blocks')
    dedup_negatives=False,     # parity: captions of the same video in a batch count as negatives
)


# ============ BERT ============

def quiet_transformers():
    """Keep transformers' load reports (e.g. the unused pooler weights) and progress bars out of our logs."""
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_pretrained_bert(name_or_path):
    """`BertModel.from_pretrained` for a hub id or a local folder, with a one-line error on failure."""
    from transformers import BertModel
    quiet_transformers()
    looks_local = os.path.isabs(name_or_path) or name_or_path.startswith('.') or os.path.exists(name_or_path)
    if looks_local and not os.path.isfile(os.path.join(name_or_path, 'config.json')):
        raise DataError(f'--bert_name {name_or_path}: no BERT folder there (config.json missing); '
                        'point --bert_name at a folder holding config.json, vocab.txt and the weights')
    try:
        return BertModel.from_pretrained(name_or_path, add_pooling_layer=False)
    except (OSError, ValueError) as e:
        raise DataError(f'--bert_name {name_or_path}: could not load BERT ({str(e).splitlines()[0]}); '
                        'download it once with network access, or pass a local folder') from None


def build_bert(cfg):
    """BERT from the stored config (offline, weights come from the checkpoint) or from --bert_name."""
    from transformers import BertConfig, BertModel
    if cfg.get('bert_config'):
        return BertModel(BertConfig.from_dict(cfg['bert_config']), add_pooling_layer=False)
    bert = load_pretrained_bert(cfg['bert_name'])
    cfg['bert_config'] = bert.config.to_dict()
    return bert


def set_bert_trainable(bert, frozen, trainable_layers):
    """docs/models.md, 'BERT fine-tuning': 'frozen' trains only the listed layers (exact index match, not the reference's
    substring test), 'all_frozen' none, 'finetune' all."""
    stems = tuple(f'{s}.' for s in (trainable_layers or []))
    for name, p in bert.named_parameters():
        if frozen == 'finetune':
            p.requires_grad = True
        elif frozen == 'all_frozen':
            p.requires_grad = False
        else:
            p.requires_grad = any(stem in f'{name}' for stem in stems)


def pool(x, mask, masked):
    """Mean over the sequence: over all padded positions (parity) or over valid positions only."""
    if not masked:
        return x.mean(dim=1)
    m = mask.to(x.dtype).unsqueeze(-1)                        # (B, L, 1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def l2n(x):
    """Row-wise l2 normalisation; the reference has no epsilon, a tiny one only guards all-zero rows."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


# ============ NRCCR building blocks (docs/models.md, 'NRCCR building blocks') ============

class LinearLayer(nn.Module):
    """y = ReLU(W · Dropout(LayerNorm(x)) + b).  Keys match the reference (`LayerNorm`, `net.1`)."""

    def __init__(self, in_dim, out_dim, dropout=0.1):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(in_dim)
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, out_dim), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.net(self.LayerNorm(x))


class PositionalEncoding(nn.Module):
    """y = Dropout(LayerNorm(x + P[0:L])), a trainable table of `max_len` positions."""

    def __init__(self, hidden, max_len, dropout=0.1):
        super().__init__()
        self.position_embeddings = nn.Embedding(max_len, hidden)
        self.LayerNorm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        L = x.shape[1]
        if L > self.position_embeddings.num_embeddings:
            raise ValueError(f'sequence of {L} positions exceeds the positional table '
                             f'({self.position_embeddings.num_embeddings})')
        pos = self.position_embeddings.weight[:L].unsqueeze(0)   # (1, L, H)
        return self.dropout(self.LayerNorm(x + pos))


class _QKV(nn.Module):
    def __init__(self, hidden, key_size):
        super().__init__()
        self.query = nn.Linear(hidden, key_size)
        self.key = nn.Linear(hidden, key_size)
        self.value = nn.Linear(hidden, hidden)


class _Output(nn.Module):
    def __init__(self, hidden, dropout):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)


class AttentionBlock(nn.Module):
    """One BERT-style attention sub-layer without feed-forward (docs/models.md, 'NRCCR building blocks').

    Q, K: H -> 512 (split into h heads); V: H -> H. Scores are scaled by 1/sqrt(H/h) (the value head size,
    parity) or 1/sqrt(512/h) (`scale_by_key`). Mask M = m_q^T m_k, additive (1 - M) * -10000.
    Self mode: LayerNorm(Dropout(W_o ctx) + Q_in); cross mode: LayerNorm(Dropout(W_o ctx)), no residual.
    """

    def __init__(self, hidden, heads=8, key_size=512, dropout=0.1, scale_by_key=False):
        super().__init__()
        self.heads, self.key_size, self.hidden = heads, key_size, hidden
        self.self = _QKV(hidden, key_size)          # name kept for reference checkpoints
        self.output = _Output(hidden, dropout)
        self.attn_dropout = nn.Dropout(dropout)
        self.scale = 1.0 / math.sqrt((key_size if scale_by_key else hidden) / heads)

    def forward(self, q_in, kv_in, q_mask, k_mask, cross=False):
        B, Lq, H = q_in.shape
        Lk, h = kv_in.shape[1], self.heads
        q = self.self.query(q_in).view(B, Lq, h, -1).transpose(1, 2)     # (B, h, Lq, 512/h)
        k = self.self.key(kv_in).view(B, Lk, h, -1).transpose(1, 2)      # (B, h, Lk, 512/h)
        v = self.self.value(kv_in).view(B, Lk, h, -1).transpose(1, 2)    # (B, h, Lk, H/h)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale       # (B, h, Lq, Lk)
        pair_mask = q_mask.unsqueeze(2) * k_mask.unsqueeze(1)            # (B, Lq, Lk)
        scores = scores + ((1.0 - pair_mask) * -10000.0).unsqueeze(1).to(scores.dtype)
        probs = self.attn_dropout(scores.softmax(dim=-1))
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(B, Lq, H)   # (B, Lq, H)
        z = self.output.dropout(self.output.dense(ctx))
        return self.output.LayerNorm(z if cross else z + q_in)


class MFC(nn.Module):
    """Latent mapping (docs/models.md, 'Latent mapping'): Linear (Xavier-uniform, zero bias) -> BatchNorm1d -> Dropout -> l2n."""

    def __init__(self, in_dim, out_dim, dropout=0.2):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.bn_1 = nn.BatchNorm1d(out_dim)
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.fc1.weight)
        nn.init.zeros_(self.fc1.bias)

    def forward(self, x):
        return l2n(self.dropout(self.bn_1(self.fc1(x))))


class VideoTransformerEncoder(nn.Module):
    """docs/models.md, 'NRCCR video encoder': LinearLayer -> positional encoding (80) -> self-attention -> mean pool."""

    def __init__(self, feat_dim, hidden, heads, layers=1, max_len=80, scale_by_key=False, masked_pooling=False):
        super().__init__()
        self.input_proj_layer = LinearLayer(feat_dim, hidden)
        self.pos_embed_layer = PositionalEncoding(hidden, max_len)
        self.encoder_layer = AttentionBlock(hidden, heads, scale_by_key=scale_by_key)
        # The reference kept extra layers in a plain list (untrained); here they are registered.
        self.extra_layers = nn.ModuleList(copy.deepcopy(self.encoder_layer) for _ in range(layers - 1))
        self.masked_pooling = masked_pooling

    def forward(self, frames, mask):
        x = self.pos_embed_layer(self.input_proj_layer(frames))          # (B, L, H_v)
        for layer in [self.encoder_layer, *self.extra_layers]:
            x = layer(x, x, mask, mask)
        return pool(x, mask, self.masked_pooling)


class ImageFeatureEncoder(nn.Module):
    """ResNet-152 image encoder (docs/models.md, 'Image encoders'): y = ReLU(W x + b), W: D -> D on the
    pre-extracted pooled feature (2048-d), so the visual mapping reads D dims. Key `proj` as the original."""

    def __init__(self, feat_dim):
        super().__init__()
        self.proj = nn.Linear(feat_dim, feat_dim)
        self.out_dim = feat_dim

    def forward(self, frames, mask):
        return F.relu(self.proj(image_features(frames, mask)))


class ClipEmbeddingEncoder(nn.Module):
    """CLIP image encoder (docs/models.md, 'Image encoders'): y = W e + b, W: 512 -> video_hidden_size (1024),
    on the CLIP ViT-B/32 image embedding e (projected, not normalised). The original ran CLIP on the JPEGs every
    step but cut its gradient (its output was re-wrapped as a new leaf tensor), so embeddings extracted once
    (util/extract_image_features.py) give the same computation without a CLIP forward per step."""

    def __init__(self, feat_dim, hidden):
        super().__init__()
        self.proj = nn.Linear(feat_dim, hidden)
        self.out_dim = hidden

    def forward(self, frames, mask):
        return self.proj(image_features(frames, mask))


def image_features(frames, mask):
    """(B, D) image features from the one-frame video batch (B, 1, D): the masked mean over frames, which is
    the single frame itself."""
    m = mask.to(frames.dtype).unsqueeze(-1)                   # (B, L, 1)
    return (frames * m).sum(1) / m.sum(1).clamp_min(1.0)


IMAGE_ENCODERS = ('resnet', 'clip')


def build_image_encoder(cfg):
    kind = cfg['visual_encoder']
    if kind == 'resnet':
        return ImageFeatureEncoder(cfg['visual_feat_dim'])
    if kind == 'clip':
        return ClipEmbeddingEncoder(cfg['visual_feat_dim'], cfg['video_hidden_size'])
    raise ValueError(f"unknown visual_encoder {kind!r} ('transformer', 'resnet', 'clip')")


class NRCCRTextEncoder(nn.Module):
    """docs/models.md, 'NRCCR text encoder' (`Text_share`): one BERT, one projection, one positional table (250) and one attention
    block shared by every text stream."""

    def __init__(self, bert, hidden, heads, max_len=250, scale_by_key=False, masked_pooling=False):
        super().__init__()
        self.bert = bert
        self.input_proj_layer = LinearLayer(bert.config.hidden_size, hidden)
        self.pos_embed_layer = PositionalEncoding(hidden, max_len)
        self.encoder_layer = AttentionBlock(hidden, heads, scale_by_key=scale_by_key)
        self.masked_pooling = masked_pooling

    def features(self, stream):
        """(E, F): raw BERT states (B, L, 768) and projected + positional features (B, L, H_t)."""
        mask = stream['mask']
        E = self.bert(input_ids=stream['ids'], attention_mask=mask.long()).last_hidden_state
        return E, self.pos_embed_layer(self.input_proj_layer(E))

    def self_pool(self, F_s, mask):
        return pool(self.encoder_layer(F_s, F_s, mask, mask), mask, self.masked_pooling)


class ResBlock(nn.Module):
    """y = r + 0.3 * conv2(ReLU(conv1(ReLU(x)))), r = ReLU(x) (parity: the reference's in-place ReLU) or x."""

    def __init__(self, dim, residual_on_relu=True):
        super().__init__()
        self.conv1 = nn.Conv1d(dim, dim, 5, padding=2)
        self.conv2 = nn.Conv1d(dim, dim, 5, padding=2)
        self.residual_on_relu = residual_on_relu

    def forward(self, x):
        a = F.relu(x)
        return (a if self.residual_on_relu else x) + 0.3 * self.conv2(F.relu(self.conv1(a)))


class Discriminator(nn.Module):
    """Language discriminator on BERT states (docs/models.md, 'Discriminator'); outputs (B, 2) logits after a mean over L."""

    def __init__(self, in_dim, kind='weak', residual_on_relu=True, masked_pooling=False):
        super().__init__()
        self.kind, self.masked_pooling = kind, masked_pooling
        if kind == 'weak':
            self.model = nn.Linear(in_dim, 2)
        elif kind == 'not-so-weak':
            self.model = nn.Sequential(nn.Linear(in_dim, 256), nn.Tanh(), nn.Linear(256, 128), nn.Tanh(),
                                       nn.Linear(128, 2))
        elif kind == 'strong':
            self.convolve = nn.Sequential(nn.Conv1d(in_dim, 128, 1),
                                          *[ResBlock(128, residual_on_relu) for _ in range(3)])
            self.model = nn.Linear(128, 2)
        else:
            raise ValueError(f'unknown disc_type {kind!r} (weak, not-so-weak, strong)')

    def forward(self, hidden, mask):
        if self.kind == 'strong':
            hidden = self.convolve(hidden.transpose(1, 2)).transpose(1, 2)    # (B, L, 128)
        return self.model(pool(hidden, mask, self.masked_pooling))


class RetrievalModel(nn.Module):
    """What the trainer relies on, shared by both models.

    Under DDP the trainer calls `set_distributed` with `gather` (all-gather with gradient, so in-batch
    negatives come from the global batch), `grad_sync` and `world_size`: terms computed on gathered
    embeddings are multiplied by `world_size` before backward, because DDP averages gradients over ranks while each rank back-propagates only
    through its own slice — the product gives exactly the single-process gradient of the global batch.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.gather = lambda x: x
        self.grad_sync = None
        self.world_size = 1

    def set_distributed(self, gather, grad_sync, world_size):
        """Run under DDP: `gather(x)` all-gathers embeddings with gradient, `grad_sync(grads)` averages a list
        of gradients in place over the ranks (for parameters DDP does not manage, the discriminator), and
        `world_size` scales the terms computed on gathered embeddings."""
        self.gather, self.grad_sync, self.world_size = gather, grad_sync, int(world_size)

    def discriminator_step(self, out, optimizers):
        """The step a model takes on its own before the main loss (NRCCR: the language discriminator);
        returns its logs (MLCMR has no such step: {})."""
        return {}

    def main_parameters(self):
        """Parameters of the main optimiser and of gradient clipping (everything trainable but the
        discriminator, which has its own optimiser)."""
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith('discriminator.')]

    def _tri_kwargs(self, out):
        cfg = self.cfg
        return dict(margin=cfg['margin'], max_violation=cfg['max_violation'], cost_style=cfg['cost_style'],
                    direction=cfg['direction'], same_video=self.gather_mask(out) if cfg['dedup_negatives'] else None)

    def gather_mask(self, out):
        """Same-video mask of the (gathered) batch; under DDP rebuilt from gathered video indices."""
        if self.world_size == 1:
            return out['same_video']
        vid = self.gather(out['video_index'].unsqueeze(1).float()).squeeze(1)
        return (vid.unsqueeze(0) == vid.unsqueeze(1)) & ~torch.eye(len(vid), dtype=torch.bool, device=vid.device)


# ============ NRCCR (docs/models.md, docs/losses.md) ============

class NRCCR(RetrievalModel):
    name = 'nrccr'
    fusion_normalize = True          # docs/evaluation.md, 'Fusion': min-max normalise before fusing
    # per-process training batch, validation batch, test batch (the references' values), run-folder part
    RUN_DEFAULTS = dict(batch_size=128, val_batch_size=128, test_batch_size=64, cv_name='MM_2022')
    DEFAULTS = dict(
        COMMON_DEFAULTS,
        trainable_layers=[f'layer.{i}' for i in range(5, 12)],
        text_hidden_size=768, video_hidden_size=1024,
        text_num_attention=8, visual_num_attention=8, video_layer=1,
        attn_scale_by_key=False,     # parity: scale by the value head size
        disc_type='weak', disc_residual_on_relu=True,
        visual_encoder='transformer',  # 'transformer' (frames), 'resnet' or 'clip' (one feature per image)
        tri_alpha=0.6, dtl_beta=0.4, back_w=1.0, l1_gama=1.0, scale=0.001,
        dtl_tau=0.07, smooth_l1_beta=4.0,
        dtl_detach_teacher=False, feat_detach_teacher=False,
        sim_ratio=0.2,
    )

    def __init__(self, cfg):
        super().__init__(cfg)
        bert = build_bert(cfg)
        set_bert_trainable(bert, cfg['frozen'], cfg['trainable_layers'])
        mp = cfg['masked_pooling']
        if cfg.get('visual_encoder', 'transformer') == 'transformer':   # checkpoints before images lack the key
            self.video_encoder = VideoTransformerEncoder(
                cfg['visual_feat_dim'], cfg['video_hidden_size'], cfg['visual_num_attention'], cfg['video_layer'],
                scale_by_key=cfg['attn_scale_by_key'], masked_pooling=mp)
        else:
            self.video_encoder = build_image_encoder(cfg)
        self.text_encoder = NRCCRTextEncoder(bert, cfg['text_hidden_size'], cfg['text_num_attention'],
                                             scale_by_key=cfg['attn_scale_by_key'], masked_pooling=mp)
        self.video_mapping = MFC(getattr(self.video_encoder, 'out_dim', cfg['video_hidden_size']),
                                 cfg['mapping_dim'], cfg['mapping_dropout'])
        self.text_mapping = MFC(cfg['text_hidden_size'], cfg['mapping_dim'], cfg['mapping_dropout'])
        self.discriminator = Discriminator(bert.config.hidden_size, cfg['disc_type'],
                                           cfg['disc_residual_on_relu'], masked_pooling=mp)

    # ---- optimisation ----
    def configure_optimizers(self, lr, glr=1e-3):
        return {'main': torch.optim.Adam(self.main_parameters(), lr=lr),
                'disc': torch.optim.Adam(self.discriminator.parameters(), lr=glr, betas=(0.9, 0.999))}

    # ---- training ----
    def forward(self, batch):
        """Training forward (docs/models.md, 'NRCCR text encoder' steps 1-5): mapped embeddings and the raw BERT states."""
        te = self.text_encoder
        video = batch['video']
        v = self.video_mapping(self.video_encoder(video['frames'], video['mask']))
        text = batch['text']
        src, tr, bt = text[paths.ROLE_SRC], text[paths.ROLE_TR], text[paths.ROLE_BT]
        E_src, F_src = te.features(src)
        E_tr, F_tr = te.features(tr)
        _, F_bt = te.features(bt)
        t_src = te.self_pool(F_src, src['mask'])
        t_tr = te.self_pool(F_tr, tr['mask'])
        X = te.encoder_layer(F_src, F_tr, src['mask'], tr['mask'], cross=True)    # (B, L_src, H_t)
        cross_mask = torch.cat([src['mask'], tr['mask']], dim=1)
        t_cross = pool(torch.cat([X, F_tr], dim=1), cross_mask, te.masked_pooling)
        t_bt = te.self_pool(F_bt, bt['mask'])
        m = self.text_mapping
        return dict(v=v, c_src=m(t_src), c_tr=m(t_tr), c_cross=m(t_cross), c_bt=m(t_bt),
                    E_src=E_src, E_tr=E_tr, m_src=src['mask'], m_tr=tr['mask'],
                    same_video=batch.get('same_video'), video_index=batch.get('video_index'))

    def discriminator_step(self, out, optimizers):
        """One Adam step (`optimizers['disc']`) of the discriminator on detached BERT states, in fp32
        (docs/losses.md, 'Adversarial term'). It comes before `training_loss`, whose generator term then sees
        the updated discriminator."""
        D, opt = self.discriminator, optimizers['disc']
        with torch.autocast(out['E_src'].device.type, enabled=False):
            real = D(out['E_src'].detach().float(), out['m_src'])
            fake = D(out['E_tr'].detach().float(), out['m_tr'])
            loss_d = 0.5 * (losses.gan_loss(real, True) + losses.gan_loss(fake, False))
        params = list(D.parameters())
        grads = torch.autograd.grad(loss_d, params)
        if self.grad_sync is not None:
            self.grad_sync(grads)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        return {'loss_disc': loss_d.detach(), 'real_acc': losses.gan_accuracy(real, True),
                'fake_acc': losses.gan_accuracy(fake, False)}

    def training_loss(self, out):
        """docs/losses.md: L = Tri(c_src,v) + α Tri(c_tr,v) + β L_dtl + w_bt L_bt + scale·BCE(D(E_tr),1) + γ L_feat."""
        cfg, g = self.cfg, self.gather
        logs = {}
        v, c_src, c_tr, c_cross, c_bt = (g(out[k]) for k in ('v', 'c_src', 'c_tr', 'c_cross', 'c_bt'))
        tri = self._tri_kwargs(out)
        l_src = losses.triplet_loss(c_src, v, **tri)
        l_tr = losses.triplet_loss(c_tr, v, **tri)
        l_dtl = losses.dtl_loss(c_tr, c_cross, v, tau=cfg['dtl_tau'],
                                detach_video_in_teacher=cfg['dtl_detach_teacher'])
        l_bt = losses.triplet_loss(c_src, c_bt, **tri)
        l_feat = losses.feature_distill_loss(c_tr, c_cross, beta=cfg['smooth_l1_beta'],
                                             detach_teacher=cfg['feat_detach_teacher'])
        with torch.autocast(out['E_tr'].device.type, enabled=False):
            l_gen = losses.gan_loss(self.discriminator(out['E_tr'].float(), out['m_tr']), True)
        global_terms = (l_src + cfg['tri_alpha'] * l_tr + cfg['dtl_beta'] * l_dtl + cfg['back_w'] * l_bt
                        + cfg['l1_gama'] * l_feat)
        local_terms = cfg['scale'] * l_gen          # BERT states of this rank only (mean over its batch)
        loss = global_terms * self.world_size + local_terms
        logs.update(loss=(global_terms + local_terms).detach(), tri_src=l_src.detach(), tri_trans=l_tr.detach(),
                    dtl=l_dtl.detach(), back_trans=l_bt.detach(), feat=l_feat.detach(), gen=l_gen.detach())
        return loss, logs

    # ---- inference ----
    def embed_videos(self, video):
        return self.video_mapping(self.video_encoder(video['frames'], video['mask']))

    def embed_texts(self, text):
        """Inference (docs/models.md, 'NRCCR text encoder'): each stream through self-attention only."""
        te, out = self.text_encoder, {}
        for role, stream in text.items():
            _, F_s = te.features(stream)
            out[role] = self.text_mapping(te.self_pool(F_s, stream['mask']))
        return out

    def validation_score(self, sims, cap2vid):
        """docs/training.md, 'Validation score': t2v R@1+R@5+R@10 on the min-max fused matrix (sim_ratio on the English MT)."""
        fused = evaluation.fuse(sims[paths.ROLE_PRIMARY], sims[paths.ROLE_SECOND], self.cfg['sim_ratio'])
        m = evaluation.compute_metrics(fused, cap2vid)
        return m['t2v_r1'] + m['t2v_r5'] + m['t2v_r10'], {f'val/{k}': x for k, x in m.items()}

    @staticmethod
    def fusion_sweep(**_):
        """docs/evaluation.md, 'Testers': weights on the English-MT (primary) matrix; 0.2 is the validation setting."""
        return [(f'w={w}', w) for w in (1.0, 0.8, 0.5, 0.2, 0.0)]


# ============ MLCMR (docs/models.md, docs/losses.md) ============

class MultiLevelVideoEncoder(nn.Module):
    """docs/models.md, 'MLCMR video encoder': [biGRU masked mean | biGRU-CNN max-pooled | frame mean] ('full') or the first two."""

    def __init__(self, feat_dim, rnn_size=512, kernel_num=512, kernel_sizes=(2, 3, 4, 5), dropout=0.2,
                 concate='full', packed_gru=False):
        super().__init__()
        self.rnn = nn.GRU(feat_dim, rnn_size, batch_first=True, bidirectional=True)
        self.convs = nn.ModuleList(nn.Conv2d(1, kernel_num, (k, 2 * rnn_size), padding=(k - 1, 0))
                                   for k in kernel_sizes)
        self.dropout = nn.Dropout(dropout)
        self.concate, self.packed_gru = concate, packed_gru
        self.out_dim = 2 * rnn_size + kernel_num * len(kernel_sizes) + (feat_dim if concate == 'full' else 0)

    def forward(self, video):
        frames, mask, lengths = video['frames'], video['mask'], video['lengths']
        if self.packed_gru:
            packed = nn.utils.rnn.pack_padded_sequence(frames, lengths.cpu(), batch_first=True,
                                                       enforce_sorted=False)
            out, _ = self.rnn(packed)
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=frames.shape[1])
        else:
            out, _ = self.rnn(frames)      # parity: the backward direction reads the padding first
        m = mask.to(out.dtype).unsqueeze(-1)                               # (B, L, 1)
        g2 = self.dropout((out * m).sum(1) / m.sum(1).clamp_min(1.0))       # (B, 2*rnn)
        x = (out * m).unsqueeze(1)                                          # (B, 1, L, 2*rnn)
        g3 = torch.cat([F.relu(conv(x)).squeeze(3).amax(dim=2) for conv in self.convs], dim=1)
        g3 = self.dropout(g3)                                               # (B, kernels*len)
        parts = [g2, g3] + ([video['mean']] if self.concate == 'full' else [])
        return torch.cat(parts, dim=1)


class MLCMR(RetrievalModel):
    name = 'mlcmr'
    fusion_normalize = False         # docs/evaluation.md, 'Fusion': raw errors are fused
    RUN_DEFAULTS = dict(batch_size=64, val_batch_size=16, test_batch_size=16, cv_name='mlcmr')
    DEFAULTS = dict(
        COMMON_DEFAULTS,
        trainable_layers=[f'layer.{i}' for i in range(6, 12)],
        visual_rnn_size=512, visual_kernel_num=512, visual_kernel_sizes=[2, 3, 4, 5],
        concate='full', packed_gru=False,
        train_mode='parallel', nce_tau=0.07,
    )

    def __init__(self, cfg):
        super().__init__(cfg)
        self.bert = build_bert(cfg)
        set_bert_trainable(self.bert, cfg['frozen'], cfg['trainable_layers'])
        self.video_encoder = MultiLevelVideoEncoder(
            cfg['visual_feat_dim'], cfg['visual_rnn_size'], cfg['visual_kernel_num'],
            cfg['visual_kernel_sizes'], cfg['mapping_dropout'], cfg['concate'], cfg['packed_gru'])
        self.video_mapping = MFC(self.video_encoder.out_dim, cfg['mapping_dim'], cfg['mapping_dropout'])
        self.text_mapping = MFC(self.bert.config.hidden_size, cfg['mapping_dim'], cfg['mapping_dropout'])

    def configure_optimizers(self, lr, glr=None):
        return {'main': torch.optim.Adam(self.main_parameters(), lr=lr)}

    def _text(self, stream):
        E = self.bert(input_ids=stream['ids'], attention_mask=stream['mask'].long()).last_hidden_state
        return self.text_mapping(pool(E, stream['mask'], self.cfg['masked_pooling']))

    def embed_videos(self, video):
        return self.video_mapping(self.video_encoder(video))

    def embed_texts(self, text):
        return {role: self._text(stream) for role, stream in text.items()}

    def forward(self, batch):
        """Training forward: full and frame-dropped video, each caption stream and its masked copy."""
        out = {'v': self.embed_videos(batch['video']), 'v_aug': self.embed_videos(batch['video_aug']),
               'same_video': batch.get('same_video'), 'video_index': batch.get('video_index')}
        out.update(self.embed_texts(batch['text']))
        return out

    def training_loss(self, out):
        """docs/losses.md, 'MLCMR objective', per caption stream t in (en, zh) or (half,):
        L = Σ_t [Tri(t, v) + ½(NCE(t, t̄) + NCE(t̄, t))] + ½(NCE(v, v̄) + NCE(v̄, v))."""
        cfg, g = self.cfg, self.gather
        tri = self._tri_kwargs(out)
        v = g(out['v'])
        l_vid = losses.symmetric_info_nce(v, g(out['v_aug']), tau=cfg['nce_tau'])
        loss, logs = l_vid, {'nce_video': l_vid.detach()}
        for role in [r for r in out if r in paths.MLCMR_TRAIN_ROLES]:
            t, t_masked = g(out[role]), g(out[paths.masked_role(role)])
            l_tri = losses.triplet_loss(t, v, **tri)
            l_nce = losses.symmetric_info_nce(t, t_masked, tau=cfg['nce_tau'])
            loss = loss + l_tri + l_nce
            logs.update({f'tri_{role}': l_tri.detach(), f'nce_{role}': l_nce.detach()})
        logs['loss'] = loss.detach()
        return loss * self.world_size, logs

    def validation_score(self, sims, cap2vid):
        """docs/training.md, 'Validation score': sum of the 12 recalls (t2v and v2t R@1,5,10 on the en and the zh matrix)."""
        score, logs = 0.0, {}
        for role, lang in ((paths.ROLE_PRIMARY, 'en'), (paths.ROLE_SECOND, 'zh')):
            m = evaluation.compute_metrics(sims[role], cap2vid)
            score += sum(m[k] for k in ('t2v_r1', 't2v_r5', 't2v_r10', 'v2t_r1', 'v2t_r5', 'v2t_r10'))
            logs.update({f'val_{lang}/{k}': x for k, x in m.items()})
        return score, logs

    @staticmethod
    def fusion_sweep(target_language='zh', train_mode='parallel', label_situation='translate'):
        """docs/evaluation.md, 'Fusion': w = 0.85 (parallel/human_label) or 0.55 on the target-language matrix; the primary
        stream is the English one, so its weight is 1 - w for target zh and w for target en."""
        w = 0.85 if (train_mode, label_situation) == ('parallel', 'human_label') else 0.55
        return [(f'w_{target_language}={w}', 1.0 - w if target_language == 'zh' else w)]


MODELS = {'nrccr': NRCCR, 'mlcmr': MLCMR}


def model_config(name, **overrides):
    """Full config dict for `name`: its defaults updated with `overrides` (unknown keys are an error)."""
    cls = MODELS[name]
    unknown = set(overrides) - set(cls.DEFAULTS)
    if unknown:
        raise KeyError(f'unknown {name} config keys: {sorted(unknown)}')
    cfg = dict(copy.deepcopy(cls.DEFAULTS), **overrides)
    cfg['model'] = name
    return cfg


def build_model(cfg):
    return MODELS[cfg['model']](cfg)


# ============ original release checkpoints (docs/models.md, 'Checkpoint formats') ============

def _strip_wrapper(key):
    """The key without the `module.` prefix DataParallel adds."""
    return key[len('module.'):] if key.startswith('module.') else key


def _unused_bert_key(key):
    """Entries of the originals' BERT that our model does not have: the pooler (never used) and the
    position / token-type id buffers (rebuilt by BertModel)."""
    return '.pooler.' in key or key.endswith(('embeddings.position_ids', 'embeddings.token_type_ids'))


def _legacy_key(component, key):
    """Our parameter name for `key` of component `component` of the reference's 5-part state list."""
    key = _strip_wrapper(key)
    if component == 'text_encoder' and key.startswith('text_bert.text_bert.'):
        key = 'bert.' + key[len('text_bert.text_bert.'):]
    elif component in ('video_mapping', 'text_mapping'):
        key = key[len('mapping.'):] if key.startswith('mapping.') else key
    elif component == 'discriminator':
        key = key[len('discriminator.'):] if key.startswith('discriminator.') else key
    return f'{component}.{key}'


LEGACY_COMPONENTS = ('video_encoder', 'text_encoder', 'video_mapping', 'text_mapping', 'discriminator')
LEGACY_MLCMR_COMPONENTS = ('video_encoder', 'text_encoder', 'video_mapping', 'text_mapping')


def _legacy_mlcmr_key(component, key):
    """Our MLCMR parameter name for `key` of component `component` of the MLCMR reference's 4-part list:
    `convs1.*` -> `video_encoder.convs.*`, `text_bert.text_bert.*` -> `bert.*`, `mapping.*` ->
    `{video,text}_mapping.*`."""
    key = _strip_wrapper(key)
    if component == 'video_encoder':
        key = 'convs.' + key[len('convs1.'):] if key.startswith('convs1.') else key
        return f'video_encoder.{key}'
    if component == 'text_encoder':
        if not key.startswith('text_bert.text_bert.'):
            raise DataError(f'legacy MLCMR checkpoint: unexpected text-encoder entry {key!r} (expected '
                            '"text_bert.text_bert.<BERT parameter>"); is it an MLCMR release checkpoint?')
        return 'bert.' + key[len('text_bert.text_bert.'):]
    return f'{component}.{key[len("mapping."):] if key.startswith("mapping.") else key}'


def _legacy_parts(saved, components, model):
    parts = saved['model']
    if not isinstance(parts, (list, tuple)) or len(parts) != len(components):
        raise DataError(f'legacy {model.upper()} checkpoint: expected a list of {len(components)} state dicts under '
                        f'"model", found {type(parts).__name__}; is it a {model.upper()} release checkpoint?')
    return parts


def _legacy_bert_config(state, prefix, bert_name):
    """The BERT config of `bert_name` (the originals used mBERT), with the layer count of the weights."""
    from transformers import BertConfig
    try:
        bert_config = BertConfig.from_pretrained(bert_name).to_dict()
    except (OSError, ValueError):
        raise DataError(f'legacy checkpoint needs the BERT config of {bert_name}; pass --bert_name with a local '
                        'mBERT folder (config.json and vocab.txt)') from None
    depth = len(prefix.split('.')) - 1          # index of the layer number in a key split at '.'
    n_layers = len({k.split('.')[depth] for k in state if k.startswith(prefix)})
    bert_config['num_hidden_layers'] = n_layers or bert_config['num_hidden_layers']
    return bert_config


def _legacy_loss_options(opt):
    """Loss and mapping options both originals store in `opt` (their scripts pass --max_violation)."""
    out = dict(margin=opt.get('margin', 0.2), max_violation=bool(opt.get('max_violation', True)),
               cost_style=opt.get('cost_style', 'sum'), direction=opt.get('direction', 'all'))
    if opt.get('dropout') is not None:
        out['mapping_dropout'] = float(opt['dropout'])
    return out


def _legacy_image_encoder(opt, state, clip_keys):
    """(visual_encoder, visual_feat_dim, encoder output size) of an original NRCCR image checkpoint, whose
    video-encoder part is `proj.{weight,bias}` (+ the CLIP model under `encoder.*` for CLIP runs): the kind comes
    from its options (`img_encoder`), else from the weights (CLIP keys present, or a non-square `proj`)."""
    out_dim, in_dim = state['video_encoder.proj.weight'].shape
    named = opt.get('img_encoder') if opt.get('model_type') == 'img' else None
    if named is not None:
        kind = 'clip' if 'clip' in str(named).lower() else 'resnet'
    else:
        kind = 'clip' if clip_keys or out_dim != in_dim else 'resnet'
    if kind == 'resnet' and out_dim != in_dim:
        raise DataError(f'legacy NRCCR image checkpoint: its options say img_encoder {named!r} (ResNet-152, a square '
                        f'Linear) but proj maps {in_dim} -> {out_dim} values; the weights and options disagree')
    return kind, int(in_dim), int(out_dim)


def convert_legacy_nrccr(saved, bert_name=None):
    """(model_cfg, state_dict) from a checkpoint in the original NRCCR release format: `model` is a list of
    five state dicts [video encoder, text encoder, video mapping, text mapping, adversarial agent] with
    DataParallel `module.` prefixes, `opt` the training options (a plain dict here).

    An image checkpoint (docs/models.md, 'Checkpoint formats') has `proj.*` as its video encoder; a CLIP run
    also saved the whole CLIP model under `encoder.*`, which is dropped (CLIP got no gradient, so those are the
    pretrained weights that util/extract_image_features.py runs once)."""
    opt = saved['opt']
    parts = _legacy_parts(saved, LEGACY_COMPONENTS, 'nrccr')
    state, clip_keys = {}, 0
    for component, part in zip(LEGACY_COMPONENTS, parts):
        for key, value in part.items():
            if _unused_bert_key(key):
                continue
            if component == 'video_encoder' and _strip_wrapper(key).startswith('encoder.'):
                clip_keys += 1
                continue
            state[_legacy_key(component, key)] = value
    image = 'video_encoder.proj.weight' in state
    if image:
        visual_encoder, feat_dim, video_hidden = _legacy_image_encoder(opt, state, clip_keys)
    elif 'video_encoder.input_proj_layer.net.1.weight' in state:
        visual_encoder, feat_dim = 'transformer', state['video_encoder.input_proj_layer.net.1.weight'].shape[1]
        video_hidden = state['video_mapping.fc1.weight'].shape[1]
    else:
        raise DataError('legacy NRCCR checkpoint: its video encoder holds neither input_proj_layer.* (video) nor '
                        'proj.* (image) weights; is it an NRCCR release checkpoint?')
    if image and state['video_mapping.fc1.weight'].shape[1] != video_hidden:
        raise DataError(f'legacy NRCCR image checkpoint: the image encoder gives {video_hidden} values but the '
                        f'video mapping reads {state["video_mapping.fc1.weight"].shape[1]}; the weights are '
                        'inconsistent')
    layer_list = opt.get('layer_list') or NRCCR.DEFAULTS['trainable_layers']
    if isinstance(layer_list, str):
        layer_list = layer_list.split('-') if '-' in layer_list else layer_list.split()
    video_layer = 1 if image else int(opt.get('video_layer') or 1)
    if video_layer > 1 and not any(k.startswith('video_encoder.extra_layers.') for k in state):
        raise DataError(f'legacy NRCCR checkpoint trained with video_layer {video_layer}: the original code kept '
                        'the extra video attention layers outside the model (untrained, not saved), so this '
                        'checkpoint cannot be evaluated as it was; only video_layer 1 converts')
    name = bert_name or opt.get('bert_name') or 'bert-base-multilingual-cased'
    cfg = model_config(
        'nrccr', bert_name=name, bert_config=_legacy_bert_config(state, 'text_encoder.bert.encoder.layer.', name),
        trainable_layers=list(layer_list), frozen=opt.get('frozen', 'frozen'), visual_feat_dim=int(feat_dim),
        mapping_dim=state['video_mapping.fc1.weight'].shape[0],
        text_hidden_size=state['text_mapping.fc1.weight'].shape[1],
        video_hidden_size=int(video_hidden), video_layer=video_layer, visual_encoder=visual_encoder,
        text_num_attention=opt.get('text_num_attention', 8), visual_num_attention=opt.get('visual_num_attention', 8),
        disc_type=opt.get('disc_type', 'weak'), sim_ratio=opt.get('sim_ratio', 0.2),
        tri_alpha=opt.get('tri_alpha', 0.6), dtl_beta=opt.get('dtl_beta', 0.4),
        back_w=opt.get('back_w', 1.0), l1_gama=opt.get('l1_gama', 1.0), scale=opt.get('scale', 0.001),
        **_legacy_loss_options(opt))
    return cfg, state


def convert_legacy_mlcmr(saved, bert_name=None):
    """(model_cfg, state_dict) from a checkpoint in the original MLCMR release format: `model` is a list of
    four state dicts [multi-level video encoder, text encoder (BERT), video mapping, text mapping] (a
    DataParallel `module.` prefix is dropped when present), `opt` the training options (a plain dict here).

    The sizes (feature dims, GRU size, kernels, joint space, concatenation) come from the weights; the loss
    options, dropout and training mode from `opt`. The original fine-tuned BERT layers 6-11 whatever its
    options said, which is our MLCMR default."""
    opt = saved['opt']
    parts = _legacy_parts(saved, LEGACY_MLCMR_COMPONENTS, 'mlcmr')
    state = {}
    for component, part in zip(LEGACY_MLCMR_COMPONENTS, parts):
        for key, value in part.items():
            if component == 'text_encoder' and _unused_bert_key(key):
                continue
            state[_legacy_mlcmr_key(component, key)] = value
    if opt.get('gru_pool', 'mean') != 'mean':
        raise DataError(f'legacy MLCMR checkpoint with gru_pool {opt["gru_pool"]!r}: only the default "mean" '
                        'pooling of the GRU states is implemented')
    try:
        w_ih, w_hh = state['video_encoder.rnn.weight_ih_l0'], state['video_encoder.rnn.weight_hh_l0']
        video_in = state['video_mapping.fc1.weight'].shape[1]
        mapping_dim = state['video_mapping.fc1.weight'].shape[0]
    except KeyError as e:
        raise DataError(f'legacy MLCMR checkpoint: no {e.args[0]} in its weights; is it an MLCMR release '
                        'checkpoint?') from None
    conv_keys = sorted((k for k in state if k.startswith('video_encoder.convs.') and k.endswith('.weight')),
                       key=lambda k: int(k.split('.')[2]))
    feat_dim, rnn_size = w_ih.shape[1], w_hh.shape[1]
    kernel_sizes = [state[k].shape[2] for k in conv_keys]
    kernel_num = state[conv_keys[0]].shape[0] if conv_keys else 0
    reduced = 2 * rnn_size + kernel_num * len(kernel_sizes)
    if video_in not in (reduced, reduced + feat_dim):
        raise DataError(f'legacy MLCMR checkpoint: the video mapping reads {video_in} values, but the encoder '
                        f'gives {reduced} (reduced) or {reduced + feat_dim} (full); the weights are inconsistent')
    name = bert_name or opt.get('bert_name') or 'bert-base-multilingual-cased'
    cfg = model_config(
        'mlcmr', bert_name=name, bert_config=_legacy_bert_config(state, 'bert.encoder.layer.', name),
        frozen='frozen', visual_feat_dim=feat_dim, mapping_dim=mapping_dim, visual_rnn_size=rnn_size,
        visual_kernel_num=kernel_num, visual_kernel_sizes=kernel_sizes,
        concate='full' if video_in == reduced + feat_dim else 'reduced',
        train_mode=opt.get('train_mode', 'parallel'), **_legacy_loss_options(opt))
    return cfg, state


# ============ loading any supported checkpoint ============

def load_model(path, bert_name=None):
    """(model, train_args dict) from one of our checkpoints or an original NRCCR / MLCMR release checkpoint."""
    saved = ckpt.load_checkpoint(path)
    if saved.get('legacy'):
        kind = saved['legacy_model']
        convert = convert_legacy_mlcmr if kind == 'mlcmr' else convert_legacy_nrccr
        cfg, state = convert(saved, bert_name)
        train_args = dict(saved['opt'], model=kind)
    else:
        cfg, state, train_args = saved['model_cfg'], saved['model'], saved['args']
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DataError(f'{path}: checkpoint does not fit the model (missing {missing[:3]}, unexpected '
                        f'{unexpected[:3]}); is it an NRCCR/MLCMR checkpoint of this codebase?')
    return model, train_args
