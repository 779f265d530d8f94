"""Original MLCMR release checkpoints load (issue #11, item 10), and NRCCR release checkpoints keep their loss
and mapping options.

The MLCMR fixture is written the way the original code saves: `model` = [video encoder, text encoder, video
mapping, text mapping] state dicts under the original names (`convs1.*`, `text_bert.text_bert.*` with the
pooler and the position-id buffer, `mapping.*`), `opt` a pickled argparse.Namespace, `best_rsum` a numpy
scalar. Embeddings of the loaded model must equal those of the model the weights came from."""
import argparse
import os

import numpy as np
import pytest
import torch

import model as models
from basic.errors import DataError
from test_model import fake_stream, fake_video, nrccr_batch, small_cfg, to_release_format
from basic import checkpoint as ckpt


def to_mlcmr_release_format(model, wrapped=False):
    """Our MLCMR's weights under the names of the original MLCMR code (4 state dicts)."""
    prefix = 'module.' if wrapped else ''
    parts = [{}, {}, {}, {}]
    for key, value in model.state_dict().items():
        component, rest = key.split('.', 1)
        if component == 'video_encoder':
            rest = 'convs1.' + rest[len('convs.'):] if rest.startswith('convs.') else rest
            parts[0][prefix + rest] = value
        elif component == 'bert':
            parts[1][prefix + 'text_bert.text_bert.' + rest] = value
        elif component == 'video_mapping':
            parts[2]['mapping.' + rest] = value
        elif component == 'text_mapping':
            parts[3]['mapping.' + rest] = value
        else:
            raise AssertionError(f'unexpected component {component}')
    hidden = model.bert.config.hidden_size      # what BertModel.from_pretrained(add_pooling_layer=True) adds
    parts[1][prefix + 'text_bert.text_bert.embeddings.position_ids'] = torch.arange(512)[None]
    parts[1][prefix + 'text_bert.text_bert.pooler.dense.weight'] = torch.randn(hidden, hidden)
    parts[1][prefix + 'text_bert.text_bert.pooler.dense.bias'] = torch.randn(hidden)
    return parts


def mlcmr_opt(**overrides):
    """The options the original MLCMR trainer pickles (after its own post-processing)."""
    opt = dict(model='mlcmr', collection='toy', visual_feature='toy_feature', concate='full', measure='cosine',
               dropout=0.2, visual_rnn_size=16, visual_kernel_num=8, visual_kernel_sizes=[2, 3, 4, 5],
               gru_pool='mean', text_mapping_layers=[768, 48], visual_mapping_layers=[100, 48], loss_fun='mrl',
               margin=0.2, direction='all', max_violation=True, cost_style='sum', optimizer='adam',
               learning_rate=1e-4, grad_clip=2.0, layer_list=None, train_mode='parallel',
               label_situation='human_label', target_language='zh', visual_feat_dim=32,
               collections_pathname={'train': 'toy', 'val': 'toy', 'test': 'toy'},
               cap_en_file={'train': 'toytrain.caption.txt'}, text_norm=True, visual_norm=True)
    opt.update(overrides)
    return argparse.Namespace(**opt)


def trained_looking(model, seed=0):
    """Perturb every weight and BatchNorm statistic, so nothing can match by coming from the BERT folder or
    from a fresh initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype.is_floating_point:
                t.add_(0.05 * torch.randn(t.shape, generator=g))
                if name.endswith('running_var'):
                    t.abs_().add_(0.5)
    return model.eval()


def save_release(path, parts, opt):
    torch.save({'epoch': 4, 'model': parts, 'best_rsum': np.float64(211.25), 'opt': opt, 'Eiters': 420}, path)


@pytest.mark.parametrize('wrapped', [False, True])
@pytest.mark.parametrize('variant', [
    dict(),
    dict(visual_kernel_sizes=[2, 3], visual_rnn_size=8, visual_kernel_num=4, concate='reduced', mapping_dim=40),
])
def test_mlcmr_release_checkpoint_gives_identical_embeddings(toy_root, tmp_path, variant, wrapped):
    torch.manual_seed(0)
    ours = trained_looking(models.build_model(small_cfg(toy_root, 'mlcmr', **variant)))
    parts = to_mlcmr_release_format(ours, wrapped)
    prefix = 'module.' if wrapped else ''
    assert f'{prefix}convs1.0.weight' in parts[0] and f'{prefix}rnn.weight_hh_l0_reverse' in parts[0]
    assert f'{prefix}text_bert.text_bert.encoder.layer.3.output.dense.weight' in parts[1]
    assert 'mapping.bn_1.running_var' in parts[2] and 'mapping.fc1.weight' in parts[3]
    opt = mlcmr_opt(dropout=0.3, margin=0.25, cost_style='mean', direction='t2v', max_violation=False,
                    train_mode='unparallel', label_situation='translate', target_language='en')
    path = tmp_path / 'model_best.pth.tar'
    save_release(path, parts, opt)
    with pytest.raises(Exception):           # plain weights_only loading refuses the Namespace
        torch.load(path, weights_only=True)

    saved = ckpt.load_checkpoint(path)
    assert saved['legacy'] is True and saved['legacy_model'] == 'mlcmr' and saved['best_rsum'] == 211.25
    loaded, train_args = models.load_model(str(path), bert_name=os.path.join(toy_root, 'tiny_bert'))
    loaded.eval()
    assert train_args['model'] == 'mlcmr' and train_args['collection'] == 'toy'
    assert (train_args['train_mode'], train_args['label_situation'], train_args['target_language']) == \
        ('unparallel', 'translate', 'en')
    cfg = loaded.cfg
    for key in ('visual_feat_dim', 'mapping_dim', 'visual_rnn_size', 'visual_kernel_num', 'visual_kernel_sizes',
                'concate'):
        assert cfg[key] == ours.cfg[key], key
    assert (cfg['mapping_dropout'], cfg['margin'], cfg['cost_style'], cfg['direction'], cfg['max_violation'],
            cfg['train_mode']) == (0.3, 0.25, 'mean', 't2v', False, 'unparallel')
    assert cfg['bert_config']['num_hidden_layers'] == ours.bert.config.num_hidden_layers

    video = fake_video(5, 9)
    text = {'en': fake_stream(5, 7), 'zh': fake_stream(5, 11)}
    with torch.no_grad():
        assert torch.equal(ours.embed_videos(video), loaded.embed_videos(video))
        expected, got = ours.embed_texts(text), loaded.embed_texts(text)
    for role in text:
        assert torch.equal(expected[role], got[role])


def test_mlcmr_release_checkpoint_with_a_foreign_class_is_refused(toy_root, tmp_path):
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / 'pwned'), 'w'))

    model = models.build_model(small_cfg(toy_root, 'mlcmr'))
    path = tmp_path / 'evil.pth.tar'
    torch.save({'epoch': 1, 'model': to_mlcmr_release_format(model), 'opt': mlcmr_opt(), 'x': Payload()}, path)
    with pytest.raises(DataError, match='refusing to unpickle') as e:
        ckpt.load_checkpoint(path)
    assert '\n' not in str(e.value) and not (tmp_path / 'pwned').exists()


def test_mlcmr_text_encoder_with_unknown_entries_is_refused(toy_root, tmp_path):
    model = models.build_model(small_cfg(toy_root, 'mlcmr'))
    parts = to_mlcmr_release_format(model)
    parts[1]['text_attention.query.weight'] = torch.zeros(2, 2)
    path = tmp_path / 'odd.pth.tar'
    save_release(path, parts, mlcmr_opt())
    with pytest.raises(DataError, match='text_attention.query.weight'):
        models.load_model(str(path), bert_name=os.path.join(toy_root, 'tiny_bert'))


# ============ NRCCR release checkpoints keep their options ============

def nrccr_release(toy_root, tmp_path, **opt):
    torch.manual_seed(0)
    ours = trained_looking(models.build_model(small_cfg(toy_root, 'nrccr', disc_type='weak')))
    base = dict(collection='toy', text_num_attention=4, visual_num_attention=4, disc_type='weak',
                layer_list=['layer.2', 'layer.3'], frozen='frozen')
    path = tmp_path / 'model_best.pth.tar'
    save_release(path, to_release_format(ours), argparse.Namespace(**dict(base, **opt)))
    return ours, str(path)


def test_nrccr_release_options_are_carried(toy_root, tmp_path):
    ours, path = nrccr_release(toy_root, tmp_path, max_violation=False, cost_style='mean', direction='v2t',
                               video_layer=1, dropout=0.4)
    loaded, _ = models.load_model(path, bert_name=os.path.join(toy_root, 'tiny_bert'))
    cfg = loaded.cfg
    assert (cfg['max_violation'], cfg['cost_style'], cfg['direction'], cfg['video_layer'],
            cfg['mapping_dropout']) == (False, 'mean', 'v2t', 1, 0.4)
    batch = nrccr_batch()
    with torch.no_grad():
        assert torch.equal(ours.embed_videos(batch['video']), loaded.eval().embed_videos(batch['video']))


def test_nrccr_release_without_options_keeps_the_script_defaults(toy_root, tmp_path):
    _, path = nrccr_release(toy_root, tmp_path)
    cfg = models.load_model(path, bert_name=os.path.join(toy_root, 'tiny_bert'))[0].cfg
    assert (cfg['max_violation'], cfg['cost_style'], cfg['direction'], cfg['video_layer'],
            cfg['mapping_dropout']) == (True, 'sum', 'all', 1, 0.2)


def test_nrccr_release_with_unsaved_extra_video_layers_is_refused(toy_root, tmp_path):
    _, path = nrccr_release(toy_root, tmp_path, video_layer=2)
    with pytest.raises(DataError, match='video_layer 2') as e:
        models.load_model(path, bert_name=os.path.join(toy_root, 'tiny_bert'))
    assert '\n' not in str(e.value)
