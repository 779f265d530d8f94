"""util/draw_framework.py: the labels of framework.png are read from the models, and the figure renders."""
import sys
from pathlib import Path

import pytest

pytest.importorskip('matplotlib')

import model  # noqa: E402
from nets import nrccr  # noqa: E402
from util import draw_framework as fw  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def defaults():
    return fw.describe_models()


def test_default_labels_show_paper_dimensions(defaults):
    n, m = defaults['nrccr'], defaults['mlcmr']
    assert 'LinearLayer 1024→1024' in n['video_proj'] and '80 pos.' in n['video_proj']
    assert 'Self-attn ×1, 8 heads' in n['video_attn']
    assert n['video_mapping'] == 'MFC 1024→1536'
    assert n['text_mapping'].startswith('MFC 768→1536')
    assert '768→768' in n['text_proj'] and '250 pos.' in n['text_proj']
    assert '8 heads, Q/K→512' in n['attn_group']
    assert n['discriminator'].endswith('\nLinear 768→2')
    assert 'BERT 12×768' in n['bert']['label'] and 'layers 5–11 trained' in n['bert']['label']
    assert n['streams'] == ['src', 'tr', 'bt']
    assert [w for w, _, _ in n['losses']] == [1.0, 0.6, 0.4, 1.0, 1.0, 0.001]
    # MLCMR: 2*512 (biGRU) + 4*512 (convs) + 1024 (frame mean) = 4096
    assert m['levels'] == ['L1  frame mean → 1024', 'L2  biGRU 2×512 → masked mean → 1024',
                           'L3  biGRU-CNN: Conv k=2,3,4,5 ×512 → max → 2048']
    assert m['concat'] == 'concat\n4096' and m['video_mapping'] == 'MFC 4096→1536'
    assert m['text_mapping'].startswith('MFC 768→1536')
    assert 'layers 6–11 trained' in m['bert']['label']
    assert m['streams'] == ['en', 'zh'] and len(m['losses']) == 5
    assert 'drop 80%' in m['video_aug_input'] and '15% of tokens' in m['text_aug']
    assert 'NCE τ=0.07' in m['tri_note'] and 'margin 0.2' in m['tri_note']


def test_labels_follow_config_changes():
    nrccr = dict(visual_feat_dim=300, video_hidden_size=512, text_hidden_size=256, text_num_attention=4,
                 mapping_dim=640, video_layer=2, tri_alpha=0.25, back_w=0.5, l1_gama=0.1, disc_type='strong',
                 trainable_layers=['layer.2', 'layer.3'])
    mlcmr = dict(visual_feat_dim=300, visual_rnn_size=64, visual_kernel_num=32, visual_kernel_sizes=[3, 7],
                 concate='reduced', mapping_dim=640, train_mode='unparallel', frozen='all_frozen')
    d = fw.describe_models(nrccr, mlcmr)
    n, m = d['nrccr'], d['mlcmr']
    assert 'LinearLayer 300→512' in n['video_proj'] and 'Self-attn ×2' in n['video_attn']
    assert n['video_mapping'] == 'MFC 512→640'
    assert '768→256' in n['text_proj'] and n['text_mapping'].startswith('MFC 256→640')
    assert '4 heads' in n['attn_group']
    assert n['discriminator'].endswith('\nConv1d 768→128 k=1 · 3× ResBlock 128 · Linear 128→2')
    assert 'layers 2–3 trained' in n['bert']['label']
    assert [w for w, _, _ in n['losses']] == [1.0, 0.25, 0.4, 0.5, 0.1, 0.001]
    # reduced: no frame-mean level; 2*64 + 2*32 = 192
    assert m['levels'] == ['L2  biGRU 2×64 → masked mean → 128', 'L3  biGRU-CNN: Conv k=3,7 ×32 → max → 64']
    assert m['video_mapping'] == 'MFC 192→640' and m['concat'] == 'concat\n192'
    assert 'all frozen' in m['bert']['label']
    assert m['streams'] == ['half'] and len(m['losses']) == 3


def test_dims_equal_the_modules_of_an_independently_built_model():
    import torch
    from transformers import BertConfig
    overrides = dict(video_hidden_size=384, text_hidden_size=192, visual_num_attention=2)
    n = fw.describe_models(nrccr=overrides)['nrccr']['dims']
    with torch.device('meta'):
        ref = model.build_model(model.model_config('nrccr', bert_config=BertConfig().to_dict(), **overrides))
    assert n['video_hidden'] == ref.video_mapping.fc1.in_features == 384
    assert n['text_hidden'] == ref.text_mapping.fc1.in_features == 192
    assert n['video_heads'] == ref.video_encoder.encoder_layer.heads == 2
    assert n['mapping_dim'] == ref.video_mapping.fc1.out_features == 1536


def test_discriminator_chains():
    for kind, expected in (('weak', ['Linear 768→2']),
                           ('not-so-weak', ['Linear 768→256', 'Tanh', 'Linear 256→128', 'Tanh', 'Linear 128→2'])):
        assert fw._layer_chain(nrccr.Discriminator(768, kind)) == expected
    assert fw._layer_chain(nrccr.Discriminator(64, 'strong')) == ['Conv1d 64→128 k=1', '3× ResBlock 128',
                                                                   'Linear 128→2']


def test_wrap_name_keeps_every_character():
    assert fw._wrap_name('bert-base-multilingual-cased') == 'bert-base-\nmultilingual-cased'
    assert fw._wrap_name('/data/models/my_bert').replace('\n', '') == '/data/models/my_bert'
    assert fw._wrap_name('tiny') == 'tiny'


def test_cli_draws_png(tmp_path, capsys):
    import matplotlib.image as mpimg
    out = tmp_path / 'fw.png'
    assert fw.main(['--out', str(out), '--set', 'nrccr.back_w=0.5', '--set', 'mlcmr.train_mode=unparallel']) == 0
    img = mpimg.imread(out)
    assert img.shape[:2] == (1060, 1600)
    assert img[..., :3].min() < 0.3 and img[0, 0, :3].min() == 1.0      # dark ink on a white background
    assert str(out) in capsys.readouterr().out


def test_cli_refuses_bad_overrides(tmp_path):
    with pytest.raises(SystemExit, match='MODEL.KEY=VALUE'):
        fw.parse_overrides(['back_w=0.5'])
    with pytest.raises(SystemExit, match='no_such_key'):
        fw.main(['--out', str(tmp_path / 'x.png'), '--set', 'nrccr.no_such_key=1'])
    assert fw.parse_overrides(['mlcmr.visual_kernel_sizes=[2, 3]', 'nrccr.disc_type=strong']) == {
        'nrccr': {'disc_type': 'strong'}, 'mlcmr': {'visual_kernel_sizes': [2, 3]}}


def test_missing_matplotlib_is_one_line_and_exit_1(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)     # makes `import matplotlib` raise ImportError
    assert fw.main(['--out', str(tmp_path / 'x.png')]) == 1
    assert capsys.readouterr().out.strip() == 'pip install matplotlib to redraw framework.png'
    assert not (tmp_path / 'x.png').exists()


def test_committed_figure_has_the_drawn_size():
    import matplotlib.image as mpimg
    png = REPO / 'framework.png'
    if not png.exists():
        pytest.skip('framework.png not generated yet: python util/draw_framework.py')
    assert mpimg.imread(png).shape[:2] == (1060, 1600)
