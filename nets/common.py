"""What every model is built from: the BERT loaders, pooling, l2 normalisation, the latent mapping (MFC) and
`RetrievalModel`, the base class that holds the interface the trainer and the tester rely on (model.py)."""
import copy
import os

import torch
import torch.nn as nn

import evaluation
from basic import data_provider as dp
from basic import paths
from basic.errors import DataError

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
    from safetensors import SafetensorError
    try:
        return BertModel.from_pretrained(name_or_path, add_pooling_layer=False)
    except (OSError, ValueError, SafetensorError) as e:       # SafetensorError: truncated or corrupt weights
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


# ============ the latent mapping ============

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


# ============ the optimiser ============

FUSED_ADAM_DEVICES = ('cpu', 'cuda')


def adam(params, lr, **kwargs):
    """torch.optim.Adam (docs/training.md, 'One training step'), with torch's fused kernel where every
    parameter is on a CPU or a CUDA device: one pass per tensor instead of about ten element-wise ops (on
    this CPU 3.3x faster over bert-base's trainable layers). Same update within float rounding (last bit of
    the fp32 weights); the optimiser state and its checkpoint keys are the same."""
    params = list(params)
    fused = bool(params) and all(p.device.type in FUSED_ADAM_DEVICES for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused or None, **kwargs)


# ============ the interface ============

class RetrievalModel(nn.Module):
    """What the trainer relies on, shared by every model.

    The class also says what the model reads and how it is configured, so that the trainer, the tester and
    the search engine never branch on a model's name (model.py lists the attributes):
    CAPTIONS (the caption scheme of docs/data.md it reads: 'nrccr' or 'mlcmr'), AUGMENT (training batches
    with MLCMR's masked / frame-dropped views), IMAGES (trains on image collections), RUN_NAME_FLAGS (flags
    named in the run folder), OWN_ARGS (flags only this model has, with their argparse keywords; they exist in
    its runs only, so other models' run folders do not change when a model is added), `config_from_args`
    (the config dict from the trainer's flags), `check_inputs` (what it needs, checked before a run folder is made)
    and `build_tokenizer` (the tokenizer of its text side).

    Under DDP the trainer calls `set_distributed` with `gather` (all-gather with gradient, so in-batch
    negatives come from the global batch), `grad_sync` and `world_size`: terms computed on gathered
    embeddings are multiplied by `world_size` before backward, because DDP averages gradients over ranks while each rank back-propagates only
    through its own slice — the product gives exactly the single-process gradient of the global batch.
    """

    CAPTIONS = 'nrccr'
    AUGMENT = False
    IMAGES = False
    RUN_NAME_FLAGS = ()
    OWN_ARGS = ()
    OWN_ARGS_TITLE = ''

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


    # ---- what the trainer and the tester ask the class ----
    @classmethod
    def config_from_args(cls, args, store):
        """The model config from the trainer's parsed flags (`args`, a namespace) and the training features'
        store (`store.dim`, `store.path`)."""
        raise NotImplementedError

    @classmethod
    def check_inputs(cls, args):
        """What the model needs beyond the data, checked before any run folder is made (one-line DataError)."""

    @classmethod
    def build_tokenizer(cls, data_cfg):
        """The tokenizer of the text side: the BERT WordPiece tokenizer of data_cfg['bert_name'] with its
        lower-casing rule (docs/data.md, 'Tokenizer')."""
        return dp.build_tokenizer(data_cfg['bert_name'], data_cfg['tokenizer_lower_case'])

    @classmethod
    def config_for_loading(cls, cfg, bert_name=None):
        """The stored config a checkpoint is rebuilt from; `bert_name` (the tester's --bert_name) changes nothing
        for models whose text encoder is rebuilt from the stored `bert_config`."""
        return cfg


def common_config(args, feat_dim):
    """Config keys every model takes from the trainer's flags (COMMON_DEFAULTS)."""
    return dict(
        bert_name=args.bert_name, trainable_layers=list(args.layer_list), frozen=args.frozen,
        visual_feat_dim=feat_dim, mapping_dim=int(args.text_mapping_layers.split('-')[-1]),
        mapping_dropout=args.dropout, margin=args.margin, max_violation=args.max_violation,
        cost_style=args.cost_style, direction=args.direction, masked_pooling=args.masked_pooling,
        dedup_negatives=args.dedup_negatives)


def fused_validation_score(sims, cap2vid, sim_ratio):
    """docs/training.md, 'Validation score': t2v R@1+R@5+R@10 on the min-max fused matrix (sim_ratio on the English MT)."""
    fused = evaluation.fuse(sims[paths.ROLE_PRIMARY], sims[paths.ROLE_SECOND], sim_ratio)
    m = evaluation.compute_metrics(fused, cap2vid)
    return m['t2v_r1'] + m['t2v_r5'] + m['t2v_r10'], {f'val/{k}': x for k, x in m.items()}


def english_fusion_sweep(**_):
    """docs/evaluation.md, 'Testers': weights on the English-MT (primary) matrix; 0.2 is the validation setting."""
    return [(f'w={w}', w) for w in (1.0, 0.8, 0.5, 0.2, 0.0)]


def make_config(cls, **overrides):
    """Full config dict of model class `cls`: its DEFAULTS updated with `overrides` (unknown keys are an error)."""
    unknown = set(overrides) - set(cls.DEFAULTS)
    if unknown:
        raise KeyError(f'unknown {cls.name} config keys: {sorted(unknown)}')
    cfg = dict(copy.deepcopy(cls.DEFAULTS), **overrides)
    cfg['model'] = cls.name
    return cfg
