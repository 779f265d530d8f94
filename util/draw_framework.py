"""Draw `framework.png`: the three models as built by `model.py`, labelled from the modules themselves.

    python util/draw_framework.py                          # writes framework.png in the repo root
    python util/draw_framework.py --out /tmp/fw.png --set nrccr.back_w=0.5 --set mclip.temporal=transformer

Every model is built from `model.model_config(name, **overrides)`, so every dimension, head count, kernel size,
trainable layer and loss weight in the labels is read from the built modules or their config: change the code
or pass `--set`, re-run, and the picture follows.

* NRCCR and MLCMR are built on PyTorch's meta device (shapes only, no memory, no weights, no download) with the
  paper-size defaults of `NRCCR.DEFAULTS` / `MLCMR.DEFAULTS`. The BERT geometry is `transformers.BertConfig()`'s
  default (12 layers, 768-d), which is also the geometry of bert-base-multilingual-cased; pass a `bert_config`
  key through `--set` to draw another one.
* mclip needs a text tower to load (nets/text_towers.py), and nothing may be downloaded: unless `--set
  mclip.bert_name=FOLDER` names one, it is drawn with a tiny local stand-in written to a temporary folder, with
  the module layout of the default tower (sentence-transformers/clip-ViT-B-32-multilingual-v1: Transformer ->
  mean Pooling -> Dense to its CLIP's size, no bias, no activation) and declared aligned to that CLIP
  (`KNOWN_ALIGNMENTS`); the frame features have that CLIP's size. Everything after the tower is the default's
  size; the tower's own transformer is the stand-in's, and the picture says so.

matplotlib and sentence-transformers (the stand-in's format) are needed by this script only.
"""
import argparse
import ast
import math
import os
import re
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import model  # noqa: E402
from nets import nrccr  # noqa: E402
from nets import text_towers as towers  # noqa: E402
from nets.common import quiet_transformers  # noqa: E402
from basic import paths  # noqa: E402
from basic.data_provider import FRAME_DROP_RATIO, MASK_RATIO  # noqa: E402
from util.make_toy_data import write_tiny_bert  # noqa: E402

NEEDED = (('matplotlib', 'matplotlib'), ('sentence_transformers', 'sentence-transformers'))   # (import, pip name)
MISSING = 'pip install {} to redraw framework.png'
PANELS = ('nrccr', 'mlcmr', 'mclip')
# the stand-in text tower of mclip: the default tower's CLIP and size, a tiny transformer of its own
STAND_IN_CLIP, STAND_IN_DIM = towers.KNOWN_ALIGNMENTS[towers.DEFAULT_TEXT_MODEL]
STAND_IN_HIDDEN, STAND_IN_LAYERS = 32, 2


# ============ models and the labels derived from them ============

def build_models(nrccr=None, mlcmr=None):
    """(NRCCR, MLCMR) built on the meta device from their defaults updated with the given override dicts."""
    from transformers import BertConfig
    models = []
    for name, overrides in (('nrccr', nrccr), ('mlcmr', mlcmr)):
        overrides = dict(overrides or {})
        overrides.setdefault('bert_config', BertConfig().to_dict())
        with torch.device('meta'):
            models.append(model.build_model(model.model_config(name, **overrides)))
    return tuple(models)


def write_stand_in_tower(folder):
    """A tiny sentence-transformers folder with the default tower's layout (Transformer -> mean Pooling -> Dense
    to STAND_IN_DIM, no bias, identity activation), declared aligned to STAND_IN_CLIP; returns its path."""
    from sentence_transformers import SentenceTransformer
    try:
        from sentence_transformers.sentence_transformer.modules import Dense, Pooling, Transformer
    except ImportError:                     # older sentence-transformers
        from sentence_transformers.models import Dense, Pooling, Transformer
    quiet_transformers()
    bert_dir, tower_dir = os.path.join(folder, 'bert'), os.path.join(folder, 'tower')
    write_tiny_bert(bert_dir, hidden=STAND_IN_HIDDEN, layers=STAND_IN_LAYERS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layers = [Transformer(bert_dir), Pooling(STAND_IN_HIDDEN, 'mean'),
                  Dense(STAND_IN_HIDDEN, STAND_IN_DIM, bias=False, activation_function=nn.Identity())]
        SentenceTransformer(modules=layers, device='cpu').save(tower_dir)
    towers.write_alignment(tower_dir, {'clip': STAND_IN_CLIP, 'dim': STAND_IN_DIM, 'fingerprint': None})
    return tower_dir


def build_mclip(overrides=None, stand_in=None):
    """MCLIP (on the CPU: its tower is loaded) from its defaults updated with `overrides`; without a `bert_name`
    there, with the stand-in tower folder `stand_in` and frame features of its CLIP's size."""
    overrides = dict(overrides or {})
    if 'bert_name' not in overrides:
        overrides.update(bert_name=stand_in, visual_feat_dim=overrides.get('visual_feat_dim', STAND_IN_DIM))
    with torch.random.fork_rng(devices=[]):          # the caller's random numbers stay as they were
        return model.build_model(model.model_config('mclip', **overrides))


def _io(a, b):
    return f'{a}→{b}'


def _layer_chain(module):
    """Readable left-to-right list of the layers of `module` ('Linear 768→2', '3× ResBlock 128', ...)."""
    chain, skip = [], 0
    for m in module.modules():
        if skip:                            # a ResBlock's own convolutions are part of it, not stages
            skip -= 1
            continue
        if isinstance(m, nrccr.ResBlock):
            chain.append(f'ResBlock {m.conv1.in_channels}')
            skip = sum(1 for _ in m.modules()) - 1
        elif isinstance(m, nn.Linear):
            chain.append(f'Linear {_io(m.in_features, m.out_features)}')
        elif isinstance(m, nn.Conv1d):
            chain.append(f'Conv1d {_io(m.in_channels, m.out_channels)} k={m.kernel_size[0]}')
        elif isinstance(m, (nn.Tanh, nn.ReLU)):
            chain.append(type(m).__name__)
    out = []
    for item in chain:                      # collapse repeats: 3 equal ResBlocks -> '3× ResBlock 128'
        if out and out[-1][1] == item:
            out[-1][0] += 1
        else:
            out.append([1, item])
    return [item if n == 1 else f'{n}× {item}' for n, item in out]


def _trainable(encoder, n_layers):
    """'layers 5–11 trained' etc., from requires_grad of the parameters of a transformer encoder with `n_layers`
    layers, BERT or a text tower around one (docs/models.md, 'BERT fine-tuning')."""
    layers = sorted({int(m.group(1)) for n, p in encoder.named_parameters()
                     if p.requires_grad and (m := re.search(r'(?:^|\.)layers?\.(\d+)\.', n))})
    embeddings = any(p.requires_grad for n, p in encoder.named_parameters()
                     if re.search(r'(?:^|\.)embeddings\.', n))
    if not layers:
        return 'embeddings trained' if embeddings else 'all frozen'
    if embeddings and len(layers) == n_layers:
        return 'fully fine-tuned'
    if layers == list(range(layers[0], layers[-1] + 1)):
        text = f'layers {layers[0]}–{layers[-1]} trained' if len(layers) > 1 else f'layer {layers[0]} trained'
    else:
        text = 'layers ' + ','.join(map(str, layers)) + ' trained'
    return text + (' + embeddings' if embeddings else '')


def _bert(bert, cfg):
    c = bert.config
    return dict(name=_wrap_name(cfg['bert_name']), layers=c.num_hidden_layers, hidden=c.hidden_size,
                label=f'BERT {c.num_hidden_layers}×{c.hidden_size}\n{_trainable(bert, c.num_hidden_layers)}')


def _source(m):
    """The file that defines the class of module `m`: 'nets/nrccr.py'."""
    return type(m).__module__.replace('.', '/') + '.py'


def _wrap_name(name, width=18):
    """Break a long model id after hyphens so it fits a narrow box."""
    lines = ['']
    for part in filter(None, re.findall(r'[^-/]*[-/]?', name)):
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append('')
        lines[-1] += part
    return '\n'.join(lines)


def _mfc(mfc):
    return f'MFC {_io(mfc.fc1.in_features, mfc.fc1.out_features)}'


def _pooling(masked):
    return 'masked mean' if masked else 'mean over L'


def _tri_note(cfg):
    hardest = 'hardest negative' if cfg['max_violation'] else 'all negatives'
    return f'Tri: margin {cfg["margin"]:g}, {hardest}, {cfg["cost_style"]}'


def describe_nrccr(m):
    """Labels and numbers of an NRCCR model (docs/models.md, docs/losses.md), read from its modules and config.

    Keys: `dims` (numbers read from the modules), `streams` (caption roles), `bert`, `losses`
    ([(weight, term, note)]) and one label string per block of the drawing."""
    cfg, ve, te = m.cfg, m.video_encoder, m.text_encoder
    v_proj, t_proj = ve.input_proj_layer.net[1], te.input_proj_layer.net[1]
    v_attn, t_attn = ve.encoder_layer, te.encoder_layer
    dims = dict(visual_feat_dim=v_proj.in_features, video_hidden=v_proj.out_features,
                text_in=t_proj.in_features, text_hidden=t_proj.out_features,
                video_pos=ve.pos_embed_layer.position_embeddings.num_embeddings,
                text_pos=te.pos_embed_layer.position_embeddings.num_embeddings,
                video_heads=v_attn.heads, text_heads=t_attn.heads, key_size=v_attn.self.query.out_features,
                video_layers=1 + len(ve.extra_layers), mapping_dim=m.video_mapping.fc1.out_features)
    streams = [s.role for s in paths.nrccr_streams('C', 'train')]
    # the terms of NRCCR.training_loss (docs/losses.md, 'NRCCR objective'), each with the config key that weighs it
    losses = [(1.0, r'Tri($c_{src}$, $v$)', ''),
              (cfg['tri_alpha'], r'Tri($c_{tr}$, $v$)', ''),
              (cfg['dtl_beta'], r'DTL($c_{tr}$ ← $c_{cross}$, $v$)', f'τ={cfg["dtl_tau"]:g}'),
              (cfg['back_w'], r'Tri($c_{src}$, $c_{bt}$)', 'back-transl.'),
              (cfg['l1_gama'], r'SmoothL1($c_{tr}$, $c_{cross}$)', f'β={cfg["smooth_l1_beta"]:g}'),
              (cfg['scale'], r'BCE(D($E_{tr}$), 1)', 'fool D')]
    pooling = _pooling(te.masked_pooling)
    return dict(
        dims=dims, streams=streams, bert=_bert(te.bert, cfg), losses=losses, name=m.name, file=_source(m),
        video_input=f'frame features\n(B, L, {dims["visual_feat_dim"]})',
        video_proj=(f'LinearLayer {_io(v_proj.in_features, v_proj.out_features)}\n'
                    f'+ PosEnc ({dims["video_pos"]} pos.)'),
        video_attn=(f'Self-attn ×{dims["video_layers"]}, {v_attn.heads} heads\n'
                    f'→ {_pooling(ve.masked_pooling)}'),
        video_mapping=_mfc(m.video_mapping),
        text_proj=(f'LinearLayer\n{_io(t_proj.in_features, t_proj.out_features)}\n'
                   f'+ PosEnc\n({dims["text_pos"]} pos.)\nshared'),
        attn_group=f'one attention block (shared)\n{t_attn.heads} heads, Q/K→{dims["key_size"]}',
        self_attn=f'Self-attn → {pooling}',
        cross_attn=(r'Cross-attn Q=$F_{src}$, KV=$F_{tr}$' + '\n'
                    + r'[X ; $F_{tr}$] → ' + pooling),
        text_mapping=_mfc(m.text_mapping) + '\nshared',
        discriminator=(f'Language discriminator ({m.discriminator.kind}) on $E_{{src}}$ (real), $E_{{tr}}$ (fake)\n'
                       + ' · '.join(_layer_chain(m.discriminator))),
        disc_loss=r'D step: ½[BCE(D($E_{src}$),1) + BCE(D($E_{tr}$),0)]',
        tri_note=_tri_note(cfg),
    )


def describe_mlcmr(m):
    """Labels and numbers of an MLCMR model (docs/models.md, docs/losses.md), read from its modules and config.

    Keys: `dims`, `streams`, `bert`, `levels` (one label per video level), `losses` (term strings) and one
    label string per block of the drawing."""
    cfg, ve = m.cfg, m.video_encoder
    rnn, convs = ve.rnn, list(ve.convs)
    kernels = [c.kernel_size[0] for c in convs]
    n_kernels = convs[0].out_channels
    gru_dim = rnn.hidden_size * (2 if rnn.bidirectional else 1)
    dims = dict(visual_feat_dim=rnn.input_size, rnn_size=rnn.hidden_size, kernel_num=n_kernels,
                kernel_sizes=kernels, video_out=ve.out_dim, video_map_in=m.video_mapping.fc1.in_features,
                text_in=m.text_mapping.fc1.in_features, mapping_dim=m.video_mapping.fc1.out_features)
    kind = 'biGRU' if rnn.bidirectional else 'GRU'
    gru = f'{kind} {"2×" if rnn.bidirectional else ""}{rnn.hidden_size}'
    levels = []
    if ve.concate == 'full':
        levels.append(f'L1  frame mean → {rnn.input_size}')
    levels.append(f'L2  {gru} → masked mean → {gru_dim}')
    levels.append(f'L3  {kind}-CNN: Conv k={",".join(map(str, kernels))} ×{n_kernels}'
                  f' → max → {n_kernels * len(kernels)}')
    streams = [s.role for s in paths.mlcmr_streams('C', 'train', cfg['train_mode'])]
    tau = cfg['nce_tau']
    losses = []                         # the terms of MLCMR.training_loss (docs/losses.md, 'MLCMR objective')
    for r in streams:
        t, tb = rf'$t_{{{r}}}$', rf'$\bar{{t}}_{{{r}}}$'
        losses.append(f'Tri({t}, $v$)')
        losses.append(f'½[NCE({t}, {tb}) + NCE({tb}, {t})]')
    losses.append(r'½[NCE($v$, $\bar{v}$) + NCE($\bar{v}$, $v$)]')
    return dict(
        dims=dims, streams=streams, bert=_bert(m.bert, cfg), levels=levels, losses=losses, name=m.name,
        file=_source(m),
        video_input=f'frames\n(B, L, {rnn.input_size})',
        video_aug_input=f'frame-dropped copy\n(drop {FRAME_DROP_RATIO:.0%} of frames)',
        text_aug=f'+ [MASK] copy ({MASK_RATIO:.0%} of tokens)',
        text_views='each caption and its [MASK] copy: separate passes',
        encoder_group='multi-level video encoder (shared by $v$, $\\bar{v}$)',
        concat=f'concat\n{ve.out_dim}',
        video_mapping=_mfc(m.video_mapping),
        text_pool=f'{_pooling(cfg["masked_pooling"])}\n{m.bert.config.hidden_size}-d',
        text_mapping=_mfc(m.text_mapping) + '\nshared',
        tri_note=_tri_note(cfg) + f'; NCE τ={tau:g}',
    )


def _st_module(mod):
    """One module of a sentence-transformers model as a label: 'Transformer (bert 12×768)', 'mean Pooling', ..."""
    kind = type(mod).__name__
    if kind == 'Transformer':
        c = (getattr(mod, 'auto_model', None) or mod.model).config
        return f'Transformer ({c.model_type} {c.num_hidden_layers}×{c.hidden_size})'
    if kind == 'Pooling':
        mode = getattr(mod, 'pooling_mode', None) or mod.get_pooling_mode_str()     # older releases: the method
        return ('+'.join(mode) if isinstance(mode, (list, tuple)) else mode) + ' Pooling'
    if kind == 'Dense':
        act = type(mod.activation_function).__name__
        return f'Dense {_io(mod.in_features, mod.out_features)}' + ('' if act == 'Identity' else f' + {act}')
    return kind


def _tower(tower, fmt):
    """The text tower of an MCLIP (nets/text_towers.py) as {'chain': [stage labels], 'layers', 'hidden', 'dim',
    'trained', 'aligned_to'}, read from its modules."""
    if fmt == towers.ST_FORMAT:
        chain = [_st_module(mod) for mod in tower.st]
        encoder = next(mod for mod in tower.st if type(mod).__name__ == 'Transformer')
        c = (getattr(encoder, 'auto_model', None) or encoder.model).config
    elif fmt == towers.CLIP_FORMAT:
        c, proj = tower.text_model.config, tower.text_projection
        chain = [f'CLIP text model {c.num_hidden_layers}×{c.hidden_size}', 'end-of-text state',
                 f'projection {_io(proj.in_features, proj.out_features)}']
    else:
        c = tower.encoder.config
        chain = [f'{c.model_type} {c.num_hidden_layers}×{c.hidden_size}', 'masked mean']
    aligned = (tower.aligned_to or {}).get('clip')
    return dict(chain=chain, layers=c.num_hidden_layers, hidden=c.hidden_size, dim=tower.dim,
                trained=_trainable(tower, c.num_hidden_layers), aligned_to=aligned)


def describe_mclip(m, stand_in=False):
    """Labels and numbers of an MCLIP model (docs/models.md, 'Multilingual CLIP';
    docs/losses.md, 'Multilingual CLIP objective'), read from its modules and config; `stand_in`: its tower is
    this script's stand-in.

    Keys: `dims`, `streams` (caption roles of its forward), `tower`, `losses` ([(weight, term, note, flag)]),
    `temperature` (initial τ, learned, largest scale) and one label string per block of the drawing."""
    cfg, tower, temporal = m.cfg, m.text_tower, m.temporal
    vp, tp = m.video_projection, m.text_projection
    fmt, t = cfg['tower_format'], _tower(tower, cfg['tower_format'])
    joint = t['dim'] if tp is None else tp.out_features          # the space both sides are l2-normalised in
    dims = dict(visual_feat_dim=cfg['visual_feat_dim'], joint_dim=joint, tower_dim=t['dim'],
                tower_hidden=t['hidden'], tower_layers=t['layers'],
                video_projection=None if vp is None else (vp.in_features, vp.out_features),
                text_projection=None if tp is None else (tp.in_features, tp.out_features),
                temporal_layers=len(temporal.blocks) if temporal else 0)
    if temporal:
        block = temporal.blocks[0]
        dims.update(temporal_heads=block.attn.num_heads, temporal_mlp=block.mlp[0].out_features,
                    temporal_positions=temporal.position.shape[0])
        pooling = (f'Transformer ×{dims["temporal_layers"]}, {dims["temporal_heads"]} heads\n'
                   f'MLP {joint}→{dims["temporal_mlp"]}→{joint}, {dims["temporal_positions"]} pos.\n'
                   'starts as identity → masked mean')
    else:
        pooling = 'masked mean over the frames\n(--temporal transformer: blocks\nthat start as the mean)'
    # the caption streams and the terms of MCLIP.forward / training_loss, each term with its config key
    streams = [paths.ROLE_SRC, paths.ROLE_TR] + ([paths.ROLE_BT] if cfg['bt_w'] else [])
    losses = [(1.0, r'NCE($c_{src}$, $v$)', '', None), (1.0, r'NCE($c_{tr}$, $v$)', '', None),
              (cfg['c2kd_w'], r'C2KD($c_{tr}$ | $c_{src}$, $v$)', 'teacher detached', 'c2kd_w'),
              (cfg['bt_w'], r'Tri($c_{src}$, $c_{bt}$)', 'back-transl.', 'bt_w'),
              (cfg['feat_w'], r'SmoothL1($c_{tr}$, $c_{src}$)', f'β={cfg["smooth_l1_beta"]:g}', 'feat_w')]
    tau0, learned = math.exp(-m.logit_scale.item()), m.logit_scale.requires_grad
    name = f'tiny local stand-in for\n{towers.DEFAULT_TEXT_MODEL}' if stand_in else _wrap_name(cfg['bert_name'], 52)
    tower_lines = [f'text tower ({fmt}), shared', name, '', ' → '.join(t['chain']), t['trained']]
    if t['aligned_to']:
        tower_lines.append(f'aligned to {t["aligned_to"]}')
    if tp is not None:
        text_proj = f'Linear {_io(tp.in_features, tp.out_features)}\nlearned: the encoder\nis aligned to no CLIP'
    else:
        text_proj = f'no projection:\nthe tower embeds into\nits CLIP\'s {t["dim"]}-d space'
    whose = 'the tower\'s' if tp is None else 'a'        # an encoder tower learns to map into raw CLIP features
    if vp is not None:
        video_proj = (f'Linear {_io(vp.in_features, vp.out_features)} per frame (learned) → l2n\n'
                      f'--video_projection: none when the features\nare {whose} CLIP\'s')
    else:
        video_proj = f'frames as they are → l2n\n(the features are {whose} CLIP\'s)'
    notes = [r"NCE: CLIP's symmetric InfoNCE on logits $s\,t\,v^T$",
             f'τ = 1/s: starts at {tau0:.3g}, {"learned" if learned else "fixed"}, s ≤ {cfg["max_logit_scale"]:g}']
    if cfg['bt_w']:
        notes.append(_tri_note(cfg))
    return dict(
        dims=dims, streams=streams, tower=t, losses=losses, name=m.name, file=_source(m),
        tower_file=_source(tower),
        temperature=dict(init=tau0, learned=learned, max_scale=cfg['max_logit_scale']),
        video_input=f'frame features\n(B, L, {cfg["visual_feat_dim"]})',
        video_proj=video_proj, temporal=pooling, video_out=f'l2n\n{joint}-d',
        tower_label='\n'.join(tower_lines), text_proj=text_proj, text_out=f'l2n\n{joint}-d\nshared',
        notes=notes,
    )


def describe_models(nrccr=None, mlcmr=None, mclip=None):
    """{'nrccr': labels, 'mlcmr': labels, 'mclip': labels} of the models built with the given config overrides;
    mclip with the stand-in tower unless its overrides name a `bert_name`."""
    a, b = build_models(nrccr, mlcmr)
    mclip = dict(mclip or {})
    with tempfile.TemporaryDirectory() as tmp:
        stand_in = None if 'bert_name' in mclip else write_stand_in_tower(tmp)
        c = build_mclip(mclip, stand_in)
    return {'nrccr': describe_nrccr(a), 'mlcmr': describe_mlcmr(b),
            'mclip': describe_mclip(c, stand_in=stand_in is not None)}


def footer(desc, sets=()):
    """The line under the picture: where each panel's model is built, and the overrides it was drawn with."""
    where = ' · '.join(f'{desc[p]["name"]}: {desc[p]["file"]}' for p in PANELS)
    text = (f'drawn by util/draw_framework.py from the models built by model.py — --model {where} '
            f'(text towers: {desc["mclip"]["tower_file"]})')
    return text + ('\nwith ' + ' '.join(f'--set {x}' for x in sets) if sets else '')


# ============ drawing ============

# (face, edge) colours per kind of block
PALETTE = dict(input=('#f3f4f6', '#6b7280'), video=('#dbeafe', '#1d4ed8'), text=('#dcfce7', '#15803d'),
               bert=('#fef3c7', '#b45309'), mapping=('#ede9fe', '#6d28d9'), loss=('#fee2e2', '#b91c1c'),
               disc=('#fce7f3', '#be185d'))
INK, MUTED = '#1f2937', '#6b7280'
STREAM_TEXT = {'src': 'src — English caption', 'tr': 'tr — machine translation', 'bt': 'bt — back-translation',
               'en': 'English caption', 'zh': 'Chinese caption', 'half': 'caption (en or zh)'}

# column x positions and widths, in figure units of 100 px
X_IN, W_IN = 0.2, 2.0
X_BERT, W_BERT = 2.6, 1.6
X_PROJ, W_PROJ = 4.6, 1.9
X_ATT, W_ATT = 7.0, 2.4
X_MAP, W_MAP = 9.8, 1.4
X_EMB, X_EMB_END = 11.42, 12.15     # embedding names are left-aligned between these
X_LOSS, W_LOSS = 12.55, 3.3


def _box(ax, x, y, w, h, text, kind, fontsize=9):
    """Rounded box with centred text."""
    from matplotlib.patches import FancyBboxPatch
    face, edge = PALETTE[kind]
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle='round,pad=0,rounding_size=0.08', fc=face, ec=edge,
                                lw=1.4))
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha='center', va='center', fontsize=fontsize, color=INK,
                linespacing=1.35)


def _group(ax, x, y, w, h, title, kind):
    """Dashed frame around blocks that are one module (or share weights), titled at its top."""
    from matplotlib.patches import FancyBboxPatch
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle='round,pad=0,rounding_size=0.08', fill=False,
                                ec=PALETTE[kind][1], lw=1.1, ls='--'))
    ax.text(x + w / 2, y + h - 0.07, title, ha='center', va='top', fontsize=8, color=PALETTE[kind][1],
            linespacing=1.25)


def _link(ax, p, q, color=INK, rad=0.0):
    """Arrow from p to q (curved when rad != 0)."""
    from matplotlib.patches import FancyArrowPatch
    ax.add_patch(FancyArrowPatch(p, q, arrowstyle='-|>', mutation_scale=11, color=color, lw=1.1,
                                 shrinkA=0, shrinkB=1, connectionstyle=f'arc3,rad={rad}'))


def _tall(ax, x, w, ys, text, kind, pad=0.32, fontsize=9):
    """Box spanning the rows `ys` (one shared module used by several streams)."""
    _box(ax, x, min(ys) - pad, w, max(ys) - min(ys) + 2 * pad, text, kind, fontsize)


def _emb(ax, y, text, kind):
    """Name of an embedding, with arrows from its mapping and into the objective."""
    ax.text(X_EMB, y, text, ha='left', va='center', fontsize=11, color=PALETTE[kind][1])
    _link(ax, (X_MAP + W_MAP, y), (X_EMB - 0.04, y))
    _link(ax, (X_EMB_END, y), (X_LOSS, y), color=MUTED)


def _loss_box(ax, y0, y1, title, lines, notes, muted=()):
    """The objective: a title, one line per term (the indices in `muted` greyed out), then smaller notes."""
    _box(ax, X_LOSS, y0, W_LOSS, y1 - y0, '', 'loss')
    x, y = X_LOSS + 0.15, y1 - 0.3
    ax.text(x, y, title, fontsize=10, weight='bold', color=PALETTE['loss'][1], va='center')
    for i, line in enumerate(lines):
        y -= 0.4
        ax.text(x, y, line, fontsize=9.5, color=MUTED if i in muted else INK, va='center')
    for note in notes:
        y -= 0.36
        ax.text(x, y, note, fontsize=8, color=MUTED, va='center')


def _draw_nrccr(ax, d):
    ax.text(0.2, 10.3, 'NRCCR — noise-robust cross-lingual cross-modal retrieval (docs/models.md)', fontsize=13,
            weight='bold', color=INK, va='center')
    y_v, y_src, y_cross, y_tr, y_bt, y_disc = 9.5, 8.35, 7.5, 6.65, 5.85, 5.0
    rows = dict(zip(d['streams'], (y_src, y_tr, y_bt)))
    # video branch
    _box(ax, X_IN, y_v - 0.3, W_IN, 0.6, d['video_input'], 'input')
    _box(ax, X_BERT, y_v - 0.3, X_PROJ + W_PROJ - X_BERT, 0.6, d['video_proj'], 'video')
    _box(ax, X_ATT, y_v - 0.3, W_ATT, 0.6, d['video_attn'], 'video')
    _box(ax, X_MAP, y_v - 0.3, W_MAP, 0.6, d['video_mapping'], 'mapping')
    _emb(ax, y_v, '$v$', 'video')
    for a, b in ((X_IN + W_IN, X_BERT), (X_PROJ + W_PROJ, X_ATT), (X_ATT + W_ATT, X_MAP)):
        _link(ax, (a, y_v), (b, y_v))
    # text branch: shared BERT, projection, attention block and mapping
    ys = list(rows.values())
    _tall(ax, X_BERT, W_BERT, ys, f'{d["bert"]["name"]}\n\n{d["bert"]["label"]}\nshared', 'bert', fontsize=8.5)
    _tall(ax, X_PROJ, W_PROJ, ys, d['text_proj'], 'text')
    _group(ax, X_ATT - 0.12, y_bt - 0.4, W_ATT + 0.24, y_src - y_bt + 1.15, d['attn_group'], 'text')
    _tall(ax, X_MAP, W_MAP, ys, d['text_mapping'], 'mapping')
    for role, y in rows.items():
        _box(ax, X_IN, y - 0.27, W_IN, 0.54, STREAM_TEXT.get(role, role), 'input', fontsize=8.5)
        _box(ax, X_ATT, y - 0.25, W_ATT, 0.5, d['self_attn'], 'text', fontsize=8.5)
        _link(ax, (X_IN + W_IN, y), (X_BERT, y))
        _link(ax, (X_BERT + W_BERT, y), (X_PROJ, y))
        _link(ax, (X_PROJ + W_PROJ, y), (X_ATT, y))
        _link(ax, (X_ATT + W_ATT, y), (X_MAP, y))
        _emb(ax, y, f'$c_{{{role}}}$', 'text')
        # state names on the side away from the cross-attention arrows
        dy, va = (0.08, 'bottom') if y > y_cross else (-0.08, 'top')
        ax.text(X_BERT + W_BERT + 0.06, y + dy, f'$E_{{{role}}}$', fontsize=8, color=MUTED, va=va)
        ax.text(X_PROJ + W_PROJ + 0.06, y + dy, f'$F_{{{role}}}$', fontsize=8, color=MUTED, va=va)
    # cross-attention between the source and translation streams, same block
    _box(ax, X_ATT, y_cross - 0.3, W_ATT, 0.6, d['cross_attn'], 'text', fontsize=8.5)
    src, tr = rows.get('src', y_src), rows.get('tr', y_tr)
    _link(ax, (X_PROJ + W_PROJ, src), (X_ATT, y_cross + 0.12))
    _link(ax, (X_PROJ + W_PROJ, tr), (X_ATT, y_cross - 0.12))
    _link(ax, (X_ATT + W_ATT, y_cross), (X_MAP, y_cross))
    _emb(ax, y_cross, '$c_{cross}$', 'text')
    # language discriminator on the raw BERT states
    _box(ax, X_PROJ, y_disc - 0.3, X_ATT + W_ATT - X_PROJ, 0.6, d['discriminator'], 'disc', fontsize=8.5)
    x_mid = X_BERT + W_BERT / 2
    _link(ax, (x_mid, min(ys) - 0.32), (X_PROJ, y_disc), rad=0.35)
    _link(ax, (X_ATT + W_ATT, y_disc), (X_LOSS, y_disc))
    # objective
    lines = [f'{"+ " if i else "   "}{w:g} · {term}' + (f'   ({note})' if note else '')
             for i, (w, term, note) in enumerate(d['losses'])]
    _loss_box(ax, y_disc - 0.35, y_v + 0.35, 'Objective  L =', lines, [d['tri_note']])
    ax.text(X_LOSS + 0.15, y_disc, d['disc_loss'], fontsize=8.5, color=PALETTE['disc'][1], va='center')


def _draw_mlcmr(ax, d):
    ax.text(0.2, 4.3, 'MLCMR — multilingual text-video retrieval baseline (docs/models.md)', fontsize=13,
            weight='bold', color=INK, va='center')
    y_v, y_va = 3.55, 2.7
    text_rows = (1.6, 0.75) if len(d['streams']) > 1 else (1.2,)
    rows = dict(zip(d['streams'], text_rows))
    # video: two views through one multi-level encoder
    _box(ax, X_IN, y_v - 0.3, W_IN, 0.6, d['video_input'], 'input')
    _box(ax, X_IN, y_va - 0.3, W_IN, 0.6, d['video_aug_input'], 'input')
    x0, x1 = X_BERT, X_ATT + W_ATT - 1.15
    _group(ax, x0, y_va - 0.45, x1 - x0, y_v - y_va + 0.95, d['encoder_group'], 'video')
    n = len(d['levels'])
    top, bottom = y_v + 0.15, y_va - 0.35
    h = (top - bottom - 0.08 * (n - 1)) / n
    for i, level in enumerate(d['levels']):
        _box(ax, x0 + 0.15, top - (i + 1) * h - i * 0.08, x1 - x0 - 0.3, h, level, 'video', fontsize=8.5)
    x_cat = x1 + 0.25
    _tall(ax, x_cat, X_MAP - 0.25 - x_cat, (y_v, y_va), d['concat'], 'video')
    _tall(ax, X_MAP, W_MAP, (y_v, y_va), d['video_mapping'] + '\nshared', 'mapping')
    for y, name in ((y_v, '$v$'), (y_va, r'$\bar{v}$')):
        _link(ax, (X_IN + W_IN, y), (x0, y))
        _link(ax, (x1, y), (x_cat, y))
        _link(ax, (X_MAP - 0.25, y), (X_MAP, y))
        _emb(ax, y, name, 'video')
    # text: one BERT, mean pooling, one mapping for every language and the masked copies
    ys = list(rows.values())
    _tall(ax, X_BERT, W_BERT, ys, f'{d["bert"]["name"]}\n{d["bert"]["label"]}', 'bert', pad=0.36, fontsize=8.5)
    _tall(ax, X_PROJ, W_PROJ, ys, d['text_pool'], 'text', pad=0.36)
    _tall(ax, X_MAP, W_MAP, ys, d['text_mapping'], 'mapping', pad=0.36)
    for role, y in rows.items():
        _box(ax, X_IN, y - 0.3, W_IN, 0.6, f'{STREAM_TEXT.get(role, role)}\n{d["text_aug"]}', 'input', fontsize=8.5)
        _link(ax, (X_IN + W_IN, y), (X_BERT, y))
        _link(ax, (X_BERT + W_BERT, y), (X_PROJ, y))
        _link(ax, (X_PROJ + W_PROJ, y), (X_MAP, y))
        _emb(ax, y, rf'$t_{{{role}}}$, $\bar{{t}}_{{{role}}}$', 'text')
    ax.text((X_PROJ + W_PROJ + X_MAP) / 2, max(ys) + 0.1, d['text_views'], ha='center', va='bottom',
            fontsize=8, color=MUTED)
    lines = [('   ' if i == 0 else '+ ') + term for i, term in enumerate(d['losses'])]
    _loss_box(ax, 0.3, y_v + 0.4, 'Objective  L =', lines, [d['tri_note']])


def _draw_mclip(ax, d):
    ax.text(0.2, 4.5, 'mclip — multilingual CLIP: CLIP frame features, a multilingual CLIP text tower '
            '(docs/models.md)', fontsize=13, weight='bold', color=INK, va='center')
    y_v = 3.65
    rows = dict(zip(d['streams'], (2.55, 1.75, 0.95) if len(d['streams']) > 2 else (2.4, 1.35)))
    # video: frames -> (projection) -> l2n -> temporal pooling -> l2n
    _box(ax, X_IN, y_v - 0.3, W_IN, 0.6, d['video_input'], 'input')
    _box(ax, X_BERT, y_v - 0.37, X_PROJ + W_PROJ - X_BERT, 0.74, d['video_proj'], 'video', fontsize=8.5)
    _box(ax, X_ATT, y_v - 0.37, W_ATT, 0.74, d['temporal'], 'video', fontsize=8)
    _box(ax, X_MAP, y_v - 0.3, W_MAP, 0.6, d['video_out'], 'mapping')
    _emb(ax, y_v, '$v$', 'video')
    for a, b in ((X_IN + W_IN, X_BERT), (X_PROJ + W_PROJ, X_ATT), (X_ATT + W_ATT, X_MAP)):
        _link(ax, (a, y_v), (b, y_v))
    # text: one tower for every caption stream, (projection), l2n into the same space
    ys = list(rows.values())
    _tall(ax, X_BERT, X_PROJ + W_PROJ - X_BERT, ys, d['tower_label'], 'bert', pad=0.36, fontsize=8.5)
    _tall(ax, X_ATT, W_ATT, ys, d['text_proj'], 'text', pad=0.36, fontsize=8.5)
    _tall(ax, X_MAP, W_MAP, ys, d['text_out'], 'mapping', pad=0.36)
    for role, y in rows.items():
        _box(ax, X_IN, y - 0.27, W_IN, 0.54, STREAM_TEXT.get(role, role), 'input', fontsize=8.5)
        for a, b in ((X_IN + W_IN, X_BERT), (X_PROJ + W_PROJ, X_ATT), (X_ATT + W_ATT, X_MAP)):
            _link(ax, (a, y), (b, y))
        _emb(ax, y, f'$c_{{{role}}}$', 'text')
    lines, muted = [], []
    for i, (w, term, note, key) in enumerate(d['losses']):
        if w:
            lines.append(f'{"+ " if i else "   "}{w:g} · {term}' + (f'   ({note})' if note else ''))
        else:
            lines.append(f'+ {term}   (off: --{key})')
            muted.append(i)
    _loss_box(ax, 0.5, y_v + 0.4, 'Objective  L =', lines, d['notes'], muted)


PANEL_HEIGHTS = dict(top=10.6, mclip=4.8)     # NRCCR + MLCMR, then mclip, in figure units of 100 px


def draw(desc, out_path, footer_text):
    """Render the three panels of `desc` (from `describe_models`) into a 1600x1540 px PNG at `out_path`."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    top, low = PANEL_HEIGHTS['top'], PANEL_HEIGHTS['mclip']
    fig = plt.figure(figsize=(16, top + low), dpi=100, facecolor='white')
    axes = []
    for y0, height in ((low, top), (0, low)):           # one axes per band, each in units of 100 px
        ax = fig.add_axes((0, y0 / (top + low), 1, height / (top + low)))
        ax.set_xlim(0, 16)
        ax.set_ylim(0, height)
        ax.axis('off')
        axes.append(ax)
    ax, ax_mclip = axes
    _draw_nrccr(ax, desc['nrccr'])
    ax.plot([0.2, 15.85], [4.58, 4.58], color='#d1d5db', lw=1.0)
    _draw_mlcmr(ax, desc['mlcmr'])
    ax_mclip.plot([0.2, 15.85], [low - 0.02, low - 0.02], color='#d1d5db', lw=1.0)
    _draw_mclip(ax_mclip, desc['mclip'])
    ax_mclip.text(15.85, 0.06, footer_text, ha='right', va='bottom', fontsize=7.5, color=MUTED, linespacing=1.4)
    fig.savefig(out_path, dpi=100, facecolor='white')
    plt.close(fig)


# ============ CLI ============

def _importable(module):
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def parse_overrides(items):
    """['nrccr.back_w=0.5', ...] -> {'nrccr': {'back_w': 0.5}, 'mlcmr': {}, 'mclip': {}}; values as Python
    literals, else strings."""
    out = {name: {} for name in PANELS}
    for item in items:
        key, sep, value = item.partition('=')
        name, dot, field = key.partition('.')
        if not sep or not dot or name not in out:
            raise SystemExit(f'--set {item}: expected MODEL.KEY=VALUE with MODEL nrccr, mlcmr or mclip, '
                             'e.g. --set nrccr.back_w=0.5')
        try:
            out[name][field] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[name][field] = value
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default=os.path.join(REPO, 'framework.png'), help='output PNG (framework.png)')
    parser.add_argument('--set', action='append', default=[], metavar='MODEL.KEY=VALUE',
                        help='config override, repeatable, e.g. --set nrccr.disc_type=strong')
    args = parser.parse_args(argv)
    missing = [pip for module, pip in NEEDED if not _importable(module)]
    if missing:
        print(MISSING.format(' '.join(missing)))
        return 1
    overrides = parse_overrides(args.set)
    try:
        desc = describe_models(**overrides)
    except (KeyError, ValueError) as e:     # unknown config key, unknown disc_type, a tower that does not load
        raise SystemExit(f'--set: {e.args[0]}') from None
    draw(desc, args.out, footer(desc, args.set))
    print(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
