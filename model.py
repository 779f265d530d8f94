"""The face of the models (docs/models.md): builds and loads them; each model lives in its own module under nets/.

NRCCR, MLCMR and the multilingual CLIP model (MCLIP) are built from a plain config dict (`model_cfg`, stored in
every checkpoint) by `build_model(cfg)` and expose the same methods, so one trainer and one tester serve all:

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
`model.set_distributed(...)`. One training step, in order, is basic/training.py `train_step`.

Each model class also carries RUN_DEFAULTS: the run settings that depend on the model (batch sizes, the
run-folder component `cv_name`, the text encoder and its fine-tuning), used by the trainer and the tester when the
flags leave them unset; and what the trainer asks of a model instead of branching on its name (nets/common.py
RetrievalModel): CAPTIONS, AUGMENT, IMAGES, RUN_NAME_FLAGS, OWN_ARGS, `config_from_args(args, store)`,
`build_tokenizer(data_cfg)`. A new model is a module in nets/ and one entry in MODELS.

Parity defaults follow docs/parity.md, 'Parity switches'; each clean alternative is a config key (see DEFAULTS).
"""

from basic import checkpoint as ckpt
from basic.errors import DataError
from nets.common import make_config
from nets.legacy import convert_legacy_mlcmr, convert_legacy_nrccr
from nets.mclip import MCLIP
from nets.mlcmr import MLCMR
from nets.nrccr import NRCCR

MODELS = {cls.name: cls for cls in (NRCCR, MLCMR, MCLIP)}
ZERO_SHOT = MCLIP         # untrained, with a multilingual CLIP text model, it retrieves with no training


def model_config(name, **overrides):
    """Full config dict for `name`: its defaults updated with `overrides` (unknown keys are an error)."""
    return make_config(MODELS[name], **overrides)


def build_model(cfg):
    return MODELS[cfg['model']](cfg)


def zero_shot_model(text_model, feature_dir, feat_dim):
    """The untrained multilingual CLIP model over the CLIP features of `feature_dir` (docs/search.md, 'No training:
    multilingual CLIP'): a video is the mean of its l2-normalised frame embeddings, a query the text model's
    embedding. A text model not aligned to the CLIP of the features is a DataError naming both."""
    return build_model(ZERO_SHOT.zero_shot_config(text_model, feature_dir, feat_dim))


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
        cfg = MODELS[cfg['model']].config_for_loading(cfg, bert_name)
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DataError(f'{path}: checkpoint does not fit the model (missing {missing[:3]}, unexpected '
                        f'{unexpected[:3]}); is it a checkpoint of this codebase?')
    return model, train_args
