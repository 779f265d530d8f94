"""Multilingual CLIP (docs/models.md, 'Multilingual CLIP'; docs/losses.md, 'Multilingual CLIP objective'): CLIP frame
features pooled over time into the CLIP space, a multilingual text tower (nets/text_towers.py), CLIP's symmetric
InfoNCE with a learnable temperature, and, behind flags, C2KD distillation from the English caption to its
translation and NRCCR's back-translation and feature-view terms.

Untrained, with a tower aligned to the CLIP of the features and no video projection, the model is zero-shot
retrieval: a video is the mean of its l2-normalised frame embeddings, a query the tower's embedding, the score
their cosine. util/searcher.py (`Searcher.zero_shot`) and tester.py (`--text_model`) build exactly that model
(`zero_shot_config`), so a fine-tuned run starts from the zero-shot numbers.
"""
import logging
import math
import os

import torch
import torch.nn as nn

import loss as losses
from basic import data_provider as dp
from basic import paths
from basic import runs
from basic.clip_encoder import clip_mismatch, feature_clip
from basic.errors import DataError
from nets import text_towers as towers
from nets.common import (COMMON_DEFAULTS, RetrievalModel, adam, common_config, english_fusion_sweep,
                         fused_validation_score, l2n, make_config, pool, set_bert_trainable)

logger = logging.getLogger(__name__)


# ============ temporal pooling ============

class TemporalTransformer(nn.Module):
    """Pre-norm transformer blocks over the frames, x + Attn(LN(x)) then x + MLP(LN(x)), with a learned position
    table; the position table and both output projections start at zero, so at initialisation every block is the
    identity and the pooled video is exactly the mean pooling."""

    def __init__(self, dim, layers=1, heads=8, max_len=dp.VIDEO_MAX_LEN):
        super().__init__()
        self.position = nn.Parameter(torch.zeros(max_len, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))

    def forward(self, x, mask):
        x = x + self.position[:x.shape[1]].to(x.dtype)                     # (B, L, D)
        for block in self.blocks:
            x = block(x, mask)
        return x


class _Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        for linear in (self.attn.out_proj, self.mlp[-1]):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x, mask):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, key_padding_mask=~mask.bool(), need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


# ============ the model ============

class MCLIP(RetrievalModel):
    name = 'mclip'
    fusion_normalize = True          # docs/evaluation.md, 'Fusion': the NRCCR protocol
    CAPTIONS = 'nrccr'               # English caption, its translation and back-translation; primary / second
    RUN_NAME_FLAGS = ('data_type', 'temporal')
    RUN_DEFAULTS = dict(batch_size=128, test_batch_size=128, cv_name='mclip', bert_name=towers.DEFAULT_TEXT_MODEL,
                        frozen='finetune')
    DEFAULTS = dict(
        COMMON_DEFAULTS,
        bert_name=towers.DEFAULT_TEXT_MODEL,   # the text tower: sentence-transformers, CLIP or transformers encoder
        tower_format=None,         # set at the first build (nets/text_towers.py)
        frozen='finetune', trainable_layers=None,
        masked_pooling=True,       # the towers pool over valid tokens only: captions go in length buckets
        feature_clip=None,         # the CLIP recorded in the training feature folder (basic/clip_encoder.py)
        feature_dir=None,          # that folder (named in errors)
        video_projection='auto',   # learned Linear(visual_feat_dim -> joint) per frame; auto: unless the features
                                   # are the tower's CLIP's (resolved to True/False at the first build)
        joint_dim=None,            # set at the first build: the tower's size, or mapping_dim for an encoder tower
        temporal='mean', temporal_layers=1, temporal_heads=8,
        init_temperature=0.07, learn_temperature=True, max_logit_scale=100.0,   # CLIP's values
        c2kd_w=0.0, bt_w=0.0, feat_w=0.0, smooth_l1_beta=4.0,
        sim_ratio=0.2,
        zero_shot=False,           # built for zero-shot retrieval: the tower must be aligned to the features' CLIP
    )
    OWN_ARGS_TITLE = 'Multilingual CLIP (--model mclip; docs/models.md, \'Multilingual CLIP\')'
    OWN_ARGS = (
        ('--temporal', dict(default='mean', choices=['mean', 'transformer'],
                            help='temporal pooling of the frames: mean (default; zero-shot CLIP) or a small '
                                 'transformer that starts out equal to the mean')),
        ('--temporal_layers', dict(type=int, default=1, help='transformer blocks of --temporal transformer (1)')),
        ('--video_projection', dict(default='auto', choices=['auto', '0', '1'],
                                    help='learned projection of the frame features into the text tower\'s space: '
                                         'auto (default) = unless the feature folder records the CLIP the tower is '
                                         'aligned to (util/extract_features.py); 1 always; 0 never')),
        ('--init_temperature', dict(type=float, default=0.07, help='initial InfoNCE temperature (0.07, CLIP)')),
        ('--learn_temperature', dict(type=runs.bool_flag, default=True, help='1: learn the temperature (default)')),
        ('--c2kd_w', dict(type=float, default=0.0,
                          help='weight of C2KD distillation from the English caption to its translation (0: off)')),
        ('--bt_w', dict(type=float, default=0.0,
                        help='weight of NRCCR\'s back-translation triplet term Tri(c_src, c_bt) (0: off)')),
        ('--feat_w', dict(type=float, default=0.0,
                          help='weight of the feature-view term SmoothL1(c_tr, c_src detached) (0: off)')),
    )

    def __init__(self, cfg):
        super().__init__(cfg)
        fmt = cfg['tower_format'] or towers.tower_format(cfg['bert_name'])
        self.text_tower = towers.load_tower(cfg['bert_name'], fmt, cfg.get('bert_config'))
        cfg['tower_format'] = fmt
        if fmt == towers.ENCODER_FORMAT:
            cfg['bert_config'] = self.text_tower.encoder.config.to_dict()
        set_bert_trainable(self.text_tower, cfg['frozen'], cfg['trainable_layers'])
        for p in self.text_tower.unused_parameters():
            p.requires_grad = False
        aligned = fmt != towers.ENCODER_FORMAT         # the tower has an output space of its own
        if cfg['zero_shot'] and not aligned:
            raise DataError(f'{cfg["bert_name"]}: a transformers encoder aligned to no CLIP cannot search with no '
                            f'training; use a multilingual CLIP text model (e.g. {towers.DEFAULT_TEXT_MODEL}) or a '
                            'CLIP model, or fine-tune this one with trainer.py --model mclip')
        cfg['video_projection'] = self._resolve_video_projection(cfg, aligned)
        if cfg['joint_dim'] is None:
            cfg['joint_dim'] = (self.text_tower.dim if aligned else
                                cfg['mapping_dim'] if cfg['video_projection'] else cfg['visual_feat_dim'])
        joint = cfg['joint_dim']
        self.text_projection = None if aligned else nn.Linear(self.text_tower.dim, joint)
        self.video_projection = nn.Linear(cfg['visual_feat_dim'], joint) if cfg['video_projection'] else None
        self.temporal = (TemporalTransformer(joint, cfg['temporal_layers'], _heads(joint, cfg['temporal_heads']))
                         if cfg['temporal'] == 'transformer' else None)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg['init_temperature'])),
                                        requires_grad=bool(cfg['learn_temperature']))

    def _resolve_video_projection(self, cfg, aligned):
        """True/False from 'auto' or the flag: an aligned tower reads raw features only when they are its CLIP's
        (checked here: one-line errors); an encoder tower maps into raw CLIP features, else both sides project."""
        choice = cfg['video_projection']
        if cfg['joint_dim'] is not None or choice is True:      # rebuilt from a checkpoint, or asked for
            return bool(choice)
        feat = cfg['feature_clip']
        if not aligned:
            return feat is None if choice == 'auto' else False
        if choice == 'auto' and feat is None:
            return True
        self._check_raw_features(cfg)
        return False

    def _check_raw_features(self, cfg):
        """Raw features must come from the CLIP the tower is aligned to: same size, and no recorded identity
        that says otherwise (basic/clip_encoder.py clip_mismatch); an unknown side is a warning."""
        tower_clip, feat = self.text_tower.aligned_to, cfg['feature_clip']
        name, dim, tower_dim = cfg['bert_name'], cfg['visual_feat_dim'], self.text_tower.dim
        where = cfg['feature_dir'] or 'the features'
        made = f'features of {feat["clip"]}' if feat else f'{dim}-d features'
        fix = '' if cfg['zero_shot'] else ', or train with --video_projection 1'
        extract = f'util/extract_features.py --model {_clip_name(tower_clip, "<the CLIP of the text model>")}'
        if dim != tower_dim:
            raise DataError(f'{where}: {made} ({dim}-d), but the text model {name} embeds into {tower_dim} dims '
                            f'(aligned to {_clip_name(tower_clip)}); extract the features with {extract}, or use a '
                            f'text model aligned to {_clip_name(feat, "the CLIP of the features")}{fix}')
        mismatch = clip_mismatch(tower_clip, feat)
        if mismatch:
            raise DataError(f'{where}: {made} ({mismatch}), but the text model {name} is aligned to '
                            f'{tower_clip["clip"]}; extract the features with {extract}, or use a text model '
                            f'aligned to {feat["clip"]}{fix}')
        if tower_clip is None or feat is None:
            logger.warning('%s: cannot check that the text model %s comes from the CLIP of these features (%s); '
                           'the scores mean nothing if it does not', where, name,
                           'the text model names no CLIP' if tower_clip is None else 'the folder records no CLIP')

    # ---- configuration ----
    @classmethod
    def config_from_args(cls, args, store):
        path = getattr(store, 'path', None)
        folder = path if path is None or os.path.isdir(path) else os.path.dirname(path)
        common = dict(common_config(args, store.dim), masked_pooling=True)     # the towers pool valid tokens
        return make_config(
            cls, **common, feature_clip=feature_clip(folder) if folder else None,
            feature_dir=folder,
            video_projection={'0': False, '1': True}.get(args.video_projection, 'auto'), temporal=args.temporal,
            temporal_layers=args.temporal_layers, init_temperature=args.init_temperature,
            learn_temperature=args.learn_temperature, c2kd_w=args.c2kd_w, bt_w=args.bt_w, feat_w=args.feat_w,
            sim_ratio=args.sim_ratio)

    @classmethod
    def zero_shot_config(cls, text_model, feature_dir, feat_dim):
        """The untrained model that retrieves with no training: mean pooling, no projection."""
        return make_config(cls, bert_name=text_model, visual_feat_dim=feat_dim, video_projection=False,
                           feature_clip=feature_clip(feature_dir), feature_dir=feature_dir, zero_shot=True)

    @classmethod
    def check_inputs(cls, args):
        """The text tower is a known format, and sentence-transformers is installed when it needs it."""
        if towers.tower_format(args.bert_name) == towers.ST_FORMAT:
            towers.require_sentence_transformers()

    @classmethod
    def build_tokenizer(cls, data_cfg):
        return towers.tower_tokenizer(data_cfg['bert_name'])

    @classmethod
    def config_for_loading(cls, cfg, bert_name=None):
        return dict(cfg, bert_name=bert_name) if bert_name else cfg

    def configure_optimizers(self, lr, glr=None):
        return {'main': adam(self.main_parameters(), lr)}

    # ---- inference ----
    def embed_videos(self, video):
        """Frames (projected when the features are not the tower's CLIP's) -> l2n per frame -> temporal pooling
        (the masked mean, after the transformer when there is one) -> l2n."""
        x, mask = video['frames'], video['mask']                            # (B, L, F), (B, L)
        if self.video_projection is not None:
            x = self.video_projection(x)
        x = l2n(x)
        if self.temporal is not None:
            x = self.temporal(x, mask)
        return l2n(pool(x, mask, masked=True))                               # (B, D)

    def _text(self, stream):
        mask = stream['mask'].long()
        ids = stream['ids'].masked_fill(mask == 0, self.text_tower.pad_id)   # the tower's own padding id
        t = self.text_tower(ids, mask)
        return l2n(t if self.text_projection is None else self.text_projection(t))

    def embed_texts(self, text):
        return {role: self._text(stream) for role, stream in text.items()}

    # ---- training ----
    def forward(self, batch):
        text = batch['text']
        out = {'v': self.embed_videos(batch['video']), 'c_src': self._text(text[paths.ROLE_SRC]),
               'c_tr': self._text(text[paths.ROLE_TR]),
               'same_video': batch.get('same_video'), 'video_index': batch.get('video_index')}
        if self.cfg['bt_w']:
            out['c_bt'] = self._text(text[paths.ROLE_BT])
        return out

    def scale(self):
        """exp(logit_scale), at most max_logit_scale (CLIP's clamp). Under DDP every rank computes the loss of the
        global batch, so the temperature's gradient is shared out over the ranks (1/world each): DDP's average
        then is the single-process gradient, as for the embeddings (RetrievalModel)."""
        s = self.logit_scale.clamp(max=math.log(self.cfg['max_logit_scale']))
        if self.world_size > 1:
            s = s / self.world_size + (s * (1 - 1 / self.world_size)).detach()
        return s.exp()

    def training_loss(self, out):
        """docs/losses.md, 'Multilingual CLIP objective':
        L = NCE(c_src, v) + NCE(c_tr, v) + w_kd C2KD(c_tr | c_src, v) + w_bt Tri(c_src, c_bt) + w_f SmoothL1(c_tr, c_src)."""
        cfg, g = self.cfg, self.gather
        v, src, tr = g(out['v']), g(out['c_src']), g(out['c_tr'])
        scale = self.scale()
        same = self.gather_mask(out) if cfg['dedup_negatives'] else None
        l_src = losses.clip_info_nce(src, v, scale, same)
        l_tr = losses.clip_info_nce(tr, v, scale, same)
        loss = l_src + l_tr
        logs = {'nce_src': l_src.detach(), 'nce_tr': l_tr.detach(), 'temperature': (1 / scale).detach()}
        if cfg['c2kd_w']:
            l_kd = losses.c2kd_loss(tr, src, v, scale)
            loss = loss + cfg['c2kd_w'] * l_kd
            logs['c2kd'] = l_kd.detach()
        if cfg['bt_w']:
            l_bt = losses.triplet_loss(src, g(out['c_bt']), **self._tri_kwargs(out))
            loss = loss + cfg['bt_w'] * l_bt
            logs['back_trans'] = l_bt.detach()
        if cfg['feat_w']:
            l_feat = losses.feature_distill_loss(tr, src, beta=cfg['smooth_l1_beta'], detach_teacher=True)
            loss = loss + cfg['feat_w'] * l_feat
            logs['feat'] = l_feat.detach()
        logs['loss'] = loss.detach()
        return loss * self.world_size, logs

    def validation_score(self, sims, cap2vid):
        return fused_validation_score(sims, cap2vid, self.cfg['sim_ratio'])

    fusion_sweep = staticmethod(english_fusion_sweep)


def _heads(dim, wanted):
    """The largest head count <= wanted that divides dim."""
    return max(h for h in range(1, wanted + 1) if dim % h == 0)


def _clip_name(identity, default='its CLIP'):
    return identity['clip'] if identity and identity.get('clip') else default
