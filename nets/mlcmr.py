"""MLCMR (docs/models.md, docs/losses.md): one model for every language, anchored on the videos, with a
multi-level video encoder and masked / frame-dropped views."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import evaluation
import loss as losses
from basic import paths, precision
from nets.common import COMMON_DEFAULTS, MFC, RetrievalModel, adam, build_bert, common_config, make_config, pool, \
    set_bert_trainable

# ============ MLCMR (docs/models.md, docs/losses.md) ============

class MultiLevelVideoEncoder(nn.Module):
    """docs/models.md, 'MLCMR video encoder': [biGRU masked mean | biGRU-CNN max-pooled | frame mean] ('full') or the first two.

    The level-3 convolutions keep the original's `Conv2d(1, K, (k, 2*rnn))` parameters (checkpoint keys and
    shapes), but run as the equal `Conv1d(2*rnn, K, k)` over the GRU states as channels (the same weights,
    viewed (K, 2*rnn, k)): same sums within float rounding, about 2.5x faster on CPU in fp32, and in bf16 it
    avoids oneDNN's one-input-channel backward, which can take seconds per call (docs/models.md, 'MLCMR video
    encoder'). Under CPU autocast the GRU runs in fp32 where the CPU has no fast bf16 GRU
    (basic/precision.py, `cpu_fast_bf16_rnn`)."""

    def __init__(self, feat_dim, rnn_size=512, kernel_num=512, kernel_sizes=(2, 3, 4, 5), dropout=0.2,
                 concate='full', packed_gru=False):
        super().__init__()
        self.rnn = nn.GRU(feat_dim, rnn_size, batch_first=True, bidirectional=True)
        self.convs = nn.ModuleList(nn.Conv2d(1, kernel_num, (k, 2 * rnn_size), padding=(k - 1, 0))
                                   for k in kernel_sizes)
        self.dropout = nn.Dropout(dropout)
        self.concate, self.packed_gru = concate, packed_gru
        self.out_dim = 2 * rnn_size + kernel_num * len(kernel_sizes) + (feat_dim if concate == 'full' else 0)
        self.cpu_rnn_fp32 = not precision.cpu_fast_bf16_rnn()     # decided once, where the model is built

    def forward(self, video):
        frames, mask, lengths = video['frames'], video['mask'], video['lengths']
        out = self._rnn(frames, lengths)                                    # (B, L, 2*rnn)
        m = mask.to(out.dtype).unsqueeze(-1)                               # (B, L, 1)
        g2 = self.dropout((out * m).sum(1) / m.sum(1).clamp_min(1.0))       # (B, 2*rnn)
        x = (out * m).transpose(1, 2)                                       # (B, 2*rnn, L)
        g3 = torch.cat([F.relu(conv1d(x, conv)).amax(dim=2) for conv in self.convs], dim=1)
        g3 = self.dropout(g3)                                               # (B, kernels*len)
        parts = [g2, g3] + ([video['mean']] if self.concate == 'full' else [])
        return torch.cat(parts, dim=1)

    def _rnn(self, frames, lengths):
        """GRU states (B, L, 2*rnn); in fp32 under a CPU autocast where bf16 would be slower."""
        cpu_autocast = frames.device.type == 'cpu' and torch.is_autocast_enabled('cpu')
        if self.cpu_rnn_fp32 and cpu_autocast:
            with torch.autocast('cpu', enabled=False):
                return self._rnn(frames.float(), lengths)
        if cpu_autocast and torch.is_inference_mode_enabled():
            # oneDNN's bf16 GRU is not taken under inference mode (17x slower than fp32 there); outside it,
            # without autograd, the same kernel gives the same numbers as under no_grad
            with torch.inference_mode(False), torch.no_grad():
                return self._rnn(frames, lengths)
        if self.packed_gru:
            packed = nn.utils.rnn.pack_padded_sequence(frames, lengths.cpu(), batch_first=True,
                                                       enforce_sorted=False)
            out, _ = self.rnn(packed)
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=frames.shape[1])
            return out
        out, _ = self.rnn(frames)      # parity: the backward direction reads the padding first
        return out


def conv1d(x, conv):
    """`conv`, a Conv2d(1, K, (k, C)) with padding (k-1, 0) over the one-channel image (B, 1, L, C), computed
    as the Conv1d(C, K, k, padding k-1) with the same weights over x (B, C, L); returns (B, K, L + k - 1):
        y[b, o, t] = bias[o] + sum_{j<k, c<C} W[o, 0, j, c] x[b, c, t + j - (k-1)]   (zero outside 0..L-1)"""
    weight = conv.weight.squeeze(1).transpose(1, 2)                     # (K, 1, k, C) -> (K, C, k), a view
    return F.conv1d(x, weight, conv.bias, padding=conv.padding[0])


class MLCMR(RetrievalModel):
    name = 'mlcmr'
    fusion_normalize = False         # docs/evaluation.md, 'Fusion': raw errors are fused
    CAPTIONS = 'mlcmr'               # docs/data.md, 'MLCMR caption files'
    AUGMENT = True                   # docs/data.md, 'MLCMR augmentations'
    RUN_NAME_FLAGS = ('train_mode', 'label_situation', 'target_language')
    # per-process training batch, test batch (the tester's 16), run-folder part; validation uses the training
    # batch; the text encoder and its fine-tuning when the flags leave them unset
    RUN_DEFAULTS = dict(batch_size=64, test_batch_size=16, cv_name='mlcmr', bert_name='bert-base-multilingual-cased',
                        frozen='frozen')
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

    @classmethod
    def config_from_args(cls, args, store):
        return make_config(
            cls, **common_config(args, store.dim), visual_rnn_size=args.visual_rnn_size,
            visual_kernel_num=args.visual_kernel_num,
            visual_kernel_sizes=[int(k) for k in args.visual_kernel_sizes.split('-')], concate=args.concate,
            packed_gru=args.packed_gru, train_mode=args.train_mode)

    def configure_optimizers(self, lr, glr=None):
        return {'main': adam(self.main_parameters(), lr)}

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
