"""NRCCR (docs/models.md, docs/losses.md): a video transformer (or an image encoder), a multilingual BERT text
branch over the English caption, its machine translation and back-translation, similarity- and feature-view
self-distillation, and a language discriminator."""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import loss as losses
from basic import image_data
from basic import paths
from nets.common import (COMMON_DEFAULTS, MFC, RetrievalModel, adam, build_bert, common_config,
                         english_fusion_sweep, fused_validation_score, make_config, pool, set_bert_trainable)

# ============ building blocks (docs/models.md, 'NRCCR building blocks') ============

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

# ============ NRCCR (docs/models.md, docs/losses.md) ============

class NRCCR(RetrievalModel):
    name = 'nrccr'
    fusion_normalize = True          # docs/evaluation.md, 'Fusion': min-max normalise before fusing
    CAPTIONS = 'nrccr'               # docs/data.md, 'NRCCR caption files'
    IMAGES = True                    # docs/data.md, 'Image collections'
    RUN_NAME_FLAGS = ('data_type', 'disc_type')
    # per-process training batch, test batch (the tester's 64), run-folder part; validation uses the training
    # batch; the text encoder and its fine-tuning when the flags leave them unset
    RUN_DEFAULTS = dict(batch_size=128, test_batch_size=64, cv_name='MM_2022', bert_name='bert-base-multilingual-cased',
                        frozen='frozen')
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

    @classmethod
    def config_from_args(cls, args, store):
        return make_config(
            cls, **common_config(args, store.dim), text_hidden_size=args.text_hidden_size,
            video_hidden_size=args.video_hidden_size, text_num_attention=args.text_num_attention,
            visual_num_attention=args.visual_num_attention, video_layer=args.video_layer,
            attn_scale_by_key=args.attn_scale == 'key', disc_type=args.disc_type,
            disc_residual_on_relu=args.disc_residual == 'relu', tri_alpha=args.tri_alpha, dtl_beta=args.dtl_beta,
            back_w=args.back_w, l1_gama=args.l1_gama, scale=args.scale, dtl_detach_teacher=args.dtl_detach_teacher,
            feat_detach_teacher=args.feat_detach_teacher, sim_ratio=args.sim_ratio,
            visual_encoder=image_data.visual_encoder(args.img_encoder) if args.model_type == 'img' else 'transformer')

    # ---- optimisation ----
    def configure_optimizers(self, lr, glr=1e-3):
        return {'main': adam(self.main_parameters(), lr),
                'disc': adam(self.discriminator.parameters(), glr, betas=(0.9, 0.999))}

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
        return fused_validation_score(sims, cap2vid, self.cfg['sim_ratio'])

    fusion_sweep = staticmethod(english_fusion_sweep)
