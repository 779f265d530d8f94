"""util/draw_framework.py: the labels of framework.png are read from the models, and the figure renders."""
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip('matplotlib')
st = pytest.importorskip('sentence_transformers', reason='the mclip panel\'s stand-in tower is a sentence-transformers '
                         'folder (sentence-transformers is optional: requirements-optional.txt)')

import torch  # noqa: E402

import model  # noqa: E402
from basic.clip_encoder import save_tiny_clip  # noqa: E402
from nets import nrccr  # noqa: E402
from util import draw_framework as fw  # noqa: E402
from util.make_toy_data import write_tiny_bert  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIZE = (1540, 1600)         # framework.png, (height, width) in pixels


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
    # mclip with the stand-in tower: the default tower's layout and CLIP size, CLIP features of that size
    c = defaults['mclip']
    assert c['tower']['chain'] == ['Transformer (bert 2×32)', 'mean Pooling', 'Dense 32→512']
    assert c['tower']['aligned_to'] == 'openai/clip-vit-base-patch32' and c['tower']['trained'] == 'fully fine-tuned'
    assert 'tiny local stand-in for\nsentence-transformers/clip-ViT-B-32-multilingual-v1' in c['tower_label']
    assert c['video_input'] == 'frame features\n(B, L, 512)' and c['video_out'] == 'l2n\n512-d'
    assert c['video_proj'].startswith('Linear 512→512 per frame')          # the features record no CLIP: projected
    assert c['text_proj'].startswith('no projection') and c['dims']['text_projection'] is None
    assert c['temporal'].startswith('masked mean') and c['dims']['temporal_layers'] == 0
    assert c['streams'] == ['src', 'tr'] and [w for w, *_ in c['losses']] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert c['temperature'] == dict(init=pytest.approx(0.07), learned=True, max_scale=100.0)
    assert [d['file'] for d in defaults.values()] == ['nets/nrccr.py', 'nets/mlcmr.py', 'nets/mclip.py']


def test_labels_follow_config_changes():
    nrccr = dict(visual_feat_dim=300, video_hidden_size=512, text_hidden_size=256, text_num_attention=4,
                 mapping_dim=640, video_layer=2, tri_alpha=0.25, back_w=0.5, l1_gama=0.1, disc_type='strong',
                 trainable_layers=['layer.2', 'layer.3'])
    mlcmr = dict(visual_feat_dim=300, visual_rnn_size=64, visual_kernel_num=32, visual_kernel_sizes=[3, 7],
                 concate='reduced', mapping_dim=640, train_mode='unparallel', frozen='all_frozen')
    mclip = dict(temporal='transformer', temporal_layers=2, temporal_heads=4, video_projection=False, c2kd_w=0.5,
                 bt_w=0.25, feat_w=2.0, init_temperature=0.05, learn_temperature=False, frozen='frozen',
                 trainable_layers=['layer.1'])
    d = fw.describe_models(nrccr, mlcmr, mclip)
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
    c = d['mclip']
    assert c['video_proj'].startswith('frames as they are') and c['dims']['video_projection'] is None
    assert c['temporal'].startswith('Transformer ×2, 4 heads\nMLP 512→2048→512, 64 pos.')
    assert c['tower']['trained'] == 'layer 1 trained'
    assert c['streams'] == ['src', 'tr', 'bt'] and [w for w, *_ in c['losses']] == [1.0, 1.0, 0.5, 0.25, 2.0]
    assert c['temperature'] == dict(init=pytest.approx(0.05), learned=False, max_scale=100.0)
    assert any('margin 0.2' in note for note in c['notes'])                # the triplet term is on


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


def _tiny_st(folder):
    """A sentence-transformers folder of another layout than the stand-in's, built with its own classes."""
    try:
        from sentence_transformers.sentence_transformer.modules import Dense, Pooling, Transformer
    except ImportError:
        from sentence_transformers.models import Dense, Pooling, Transformer
    bert = os.path.join(folder, 'bert')
    write_tiny_bert(bert, hidden=48, layers=3)
    modules = [Transformer(bert), Pooling(48, 'cls'), Dense(48, 24, activation_function=torch.nn.Tanh())]
    st.SentenceTransformer(modules=modules, device='cpu').save(os.path.join(folder, 'st'))
    return os.path.join(folder, 'st')


def _mclip_dims_and_reference(tmp_path, tower_format):
    """The mclip labels drawn with a tiny tower of `tower_format`, and an MCLIP built independently from it."""
    if tower_format == 'sentence-transformers':
        folder = _tiny_st(str(tmp_path))
    elif tower_format == 'clip':
        folder = save_tiny_clip(str(tmp_path / 'clip'))                    # 2 layers × 32, projection 16
    else:
        folder = str(tmp_path / 'bert')
        write_tiny_bert(folder, hidden=32, layers=2)
    overrides = dict(bert_name=folder, visual_feat_dim=40, temporal='transformer', temporal_layers=2)
    labels = fw.describe_models(mclip=overrides)['mclip']
    return labels, model.build_model(model.model_config('mclip', **overrides))


@pytest.mark.parametrize('tower_format, chain, joint', [
    ('sentence-transformers', ['Transformer (bert 3×48)', 'cls Pooling', 'Dense 48→24 + Tanh'], 24),
    ('clip', ['CLIP text model 2×32', 'end-of-text state', 'projection 32→16'], 16),
    ('encoder', ['bert 2×32', 'masked mean'], 1536)])        # aligned to no CLIP: both sides map to mapping_dim
def test_mclip_dims_equal_the_modules_of_an_independently_built_model(tmp_path, tower_format, chain, joint):
    c, ref = _mclip_dims_and_reference(tmp_path, tower_format)
    dims, tower = c['dims'], c['tower']
    assert ref.cfg['tower_format'] == tower_format and tower['chain'] == chain
    assert dims['joint_dim'] == ref.cfg['joint_dim'] == joint and f'l2n\n{joint}-d' == c['video_out']
    vp = ref.video_projection
    assert dims['video_projection'] == (vp.in_features, vp.out_features) == (40, joint)
    assert f'Linear 40→{joint} per frame' in c['video_proj']
    if ref.text_projection is None:
        assert dims['text_projection'] is None and dims['tower_dim'] == ref.text_tower.dim == joint
    else:
        assert dims['text_projection'] == (ref.text_projection.in_features, ref.text_projection.out_features) \
            == (32, joint)
        assert c['text_proj'].startswith(f'Linear 32→{joint}')
    assert dims['temporal_layers'] == len(ref.temporal.blocks) == 2
    assert dims['temporal_heads'] == ref.temporal.blocks[0].attn.num_heads == 8
    assert dims['temporal_mlp'] == ref.temporal.blocks[0].mlp[0].out_features == 4 * joint
    assert dims['temporal_positions'] == ref.temporal.position.shape[0]
    assert tower['trained'] == 'fully fine-tuned' and 'stand-in' not in c['tower_label']
    assert (tower['aligned_to'] is None) == (tower_format != 'clip')       # a CLIP is its own; the others name none


def test_drawing_mclip_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    fw.describe_models(mclip=dict(temporal='transformer'))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_footer_names_where_each_panel_is_built(defaults):
    text = fw.footer(defaults, ['mclip.c2kd_w=1'])
    for name, path in (('nrccr', 'nets/nrccr.py'), ('mlcmr', 'nets/mlcmr.py'), ('mclip', 'nets/mclip.py')):
        assert f'{name}: {path}' in text and (REPO / path).is_file()
    assert '(text towers: nets/text_towers.py)' in text and text.endswith('\nwith --set mclip.c2kd_w=1')


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
    assert fw.main(['--out', str(out), '--set', 'nrccr.back_w=0.5', '--set', 'mlcmr.train_mode=unparallel',
                    '--set', 'mclip.temporal=transformer', '--set', 'mclip.bt_w=0.5']) == 0
    img = mpimg.imread(out)
    assert img.shape[:2] == SIZE
    assert img[..., :3].min() < 0.3 and img[0, 0, :3].min() == 1.0      # dark ink on a white background
    assert str(out) in capsys.readouterr().out


def test_cli_refuses_bad_overrides(tmp_path):
    with pytest.raises(SystemExit, match='MODEL.KEY=VALUE'):
        fw.parse_overrides(['back_w=0.5'])
    with pytest.raises(SystemExit, match='MODEL nrccr, mlcmr or mclip'):
        fw.parse_overrides(['clip.temporal=mean'])
    with pytest.raises(SystemExit, match='no_such_key'):
        fw.main(['--out', str(tmp_path / 'x.png'), '--set', 'nrccr.no_such_key=1'])
    with pytest.raises(SystemExit, match=r'^--set: .*no_such_folder: no such text model folder'):
        fw.main(['--out', str(tmp_path / 'x.png'), '--set', f'mclip.bert_name={tmp_path / "no_such_folder"}'])
    assert not (tmp_path / 'x.png').exists()
    assert fw.parse_overrides(['mlcmr.visual_kernel_sizes=[2, 3]', 'nrccr.disc_type=strong',
                               'mclip.temporal=transformer', 'mclip.video_projection=False']) == {
        'nrccr': {'disc_type': 'strong'}, 'mlcmr': {'visual_kernel_sizes': [2, 3]},
        'mclip': {'temporal': 'transformer', 'video_projection': False}}


@pytest.mark.parametrize('missing, line', [
    (['matplotlib'], 'pip install matplotlib to redraw framework.png'),
    (['matplotlib', 'sentence_transformers'], 'pip install matplotlib sentence-transformers to redraw framework.png')])
def test_missing_package_is_one_line_and_exit_1(monkeypatch, capsys, tmp_path, missing, line):
    for name in missing:
        monkeypatch.setitem(sys.modules, name, None)        # makes `import name` raise ImportError
    assert fw.main(['--out', str(tmp_path / 'x.png')]) == 1
    assert capsys.readouterr().out.strip() == line
    assert not (tmp_path / 'x.png').exists()


def test_committed_figure_has_the_drawn_size():
    import matplotlib.image as mpimg
    png = REPO / 'framework.png'
    if not png.exists():
        pytest.skip('framework.png not generated yet: python util/draw_framework.py')
    assert mpimg.imread(png).shape[:2] == SIZE
