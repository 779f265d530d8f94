"""Checkpoints of the original releases (docs/models.md, 'Checkpoint formats'): NRCCR's list of five state dicts
and MLCMR's list of four, converted to (model_cfg, state_dict) of our models."""
from basic.errors import DataError
from nets.common import make_config
from nets.mlcmr import MLCMR
from nets.nrccr import NRCCR

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
    cfg = make_config(
        NRCCR, bert_name=name, bert_config=_legacy_bert_config(state, 'text_encoder.bert.encoder.layer.', name),
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
    cfg = make_config(
        MLCMR, bert_name=name, bert_config=_legacy_bert_config(state, 'bert.encoder.layer.', name),
        frozen='frozen', visual_feat_dim=feat_dim, mapping_dim=mapping_dim, visual_rnn_size=rnn_size,
        visual_kernel_num=kernel_num, visual_kernel_sizes=kernel_sizes,
        concate='full' if video_in == reduced + feat_dim else 'reduced',
        train_mode=opt.get('train_mode', 'parallel'), **_legacy_loss_options(opt))
    return cfg, state
