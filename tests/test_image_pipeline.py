"""Image collections end to end: NRCCR trains and tests on the toy image collection for each target language,
the image flags (model type, encoder, task, English cleaning) reach the data and model configs and the run
folder, bad input stops with one line naming the file and the fix, features written by
util/extract_image_features.py are read by the trainer, original NRCCR image checkpoints load, and the image
scripts pass flags the trainer and tester accept."""
import argparse
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

import model as models
from nets import legacy, nrccr
import tester
import trainer
from basic import paths
from conftest import REPO
from basic import checkpoint as ckpt
from basic import data_provider as dp
from basic import runs
from util.make_toy_data import make_toy_image_collection

TINY_IMG = dict(n_train=20, n_val=6, n_test=8, captions_per_image=2, dim=24, bert_hidden=32, bert_layers=4, seed=0)
LANGS = ('de', 'fr', 'cs')


@pytest.fixture(scope='module')
def img_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('VisualSearchImgE2E'))
    make_toy_image_collection(root, 'toyimg', **TINY_IMG)
    return root


def img_argv(root, tag, *extra, collection='toyimg'):
    """trainer.py arguments for a seconds-long NRCCR run on the tiny toy image collection."""
    return ['--rootpath', root, '--collection', collection, '--bert_name', os.path.join(root, 'tiny_bert_img'),
            '--layer_list', 'layer.2', 'layer.3', '--text_hidden_size', '32', '--video_hidden_size', '32',
            '--text_num_attention', '4', '--visual_num_attention', '4', '--text_mapping_layers', '0-48',
            '--visual_mapping_layers', '0-48', '--disc_type', 'not-so-weak', '--batch_size', '16',
            '--eval_batch_size', '8', '--workers', '0', '--device', 'cpu', '--max_violation', '--postfix', tag,
            *extra]


def copy_root(img_root, tmp_path):
    root = str(tmp_path / 'copy')
    shutil.copytree(img_root, root, ignore=shutil.ignore_patterns('MM_2022', 'results'))
    return root


def error_of(fn, argv):
    """The one-line message a CLI main exits with."""
    with pytest.raises(SystemExit) as e:
        fn(argv)
    message = str(e.value.code)
    assert message.startswith('error: ') and '\n' not in message, message
    return message


# ============ train and test, three target languages ============

@pytest.mark.parametrize('lang', LANGS)
def test_nrccr_trains_and_tests_on_images(img_root, lang):
    out = trainer.main(img_argv(img_root, f'e2e_{lang}', '--data_type', f'google_enc2{lang}', '--num_epochs', '1'))
    saved = ckpt.load_checkpoint(os.path.join(out['run_dir'], 'model_best.pth.tar'))
    assert saved['data_cfg'] == dp.data_config(
        collection='toyimg', visual_feature='toy_clip', data_type=f'google_enc2{lang}', model_type='img',
        img_encoder='clip', task=1, clean_eval='raw', bert_name=os.path.join(img_root, 'tiny_bert_img'))
    assert saved['model_cfg']['visual_encoder'] == 'clip' and saved['model_cfg']['visual_feat_dim'] == TINY_IMG['dim']
    test = out['test']
    assert list(test['metrics']) == ['w=1.0', 'w=0.8', 'w=0.5', 'w=0.2', 'w=0.0']   # the video sweep
    n_caps = TINY_IMG['n_test'] * TINY_IMG['captions_per_image']
    res = test['results_dir']
    with open(os.path.join(res, 'metrics.json')) as f:
        assert json.load(f) == test['metrics']
    for name in ('sims_primary.npy', 'sims_second.npy', 'sims_w=0.5.npy'):
        assert np.load(os.path.join(res, name)).shape == (n_caps, TINY_IMG['n_test'])
    with open(os.path.join(res, 'video_ids.txt')) as f:
        images = f.read().split()
    assert len(images) == TINY_IMG['n_test']
    with open(paths.image_id_file(img_root, 'toyimg', 'test', 'toy_clip')) as f:
        assert set(images) == set(f.read().split())
    with open(os.path.join(res, 'report.txt')) as f:
        report = f.read()
    assert f'toyimgtest_google_{lang}2enc_2016' in report and f'toyimgtest_{lang}_2016' in report
    # w = 0 and w = 1 are the two single-stream rankings: fusing them differently shows the slots are used
    m = test['metrics']
    assert m['w=1.0'] != m['w=0.0']


def test_resnet_encoder_task_and_cleaning_reach_the_configs(img_root):
    out = trainer.main(img_argv(img_root, 'resnet', '--img_encoder', 'resnet152', '--visual_feature', 'toy_clip',
                                '--clean_eval', 'en', '--data_type', 'google_enc2cs', '--num_epochs', '0',
                                '--skip_test', '1'))
    saved = ckpt.load_checkpoint(os.path.join(out['run_dir'], 'model_best.pth.tar'))
    assert saved['model_cfg']['visual_encoder'] == 'resnet'
    assert (saved['data_cfg']['img_encoder'], saved['data_cfg']['clean_eval']) == ('resnet_152', 'en')
    model, _ = models.load_model(os.path.join(out['run_dir'], 'model_best.pth.tar'))
    assert isinstance(model.video_encoder, nrccr.ImageFeatureEncoder)
    assert model.video_mapping.fc1.in_features == TINY_IMG['dim']


# ============ flags, run folder ============

def test_model_type_encoder_and_feature_defaults():
    a = trainer.parse_args(['--collection', 'toyimg'])
    assert (a.model_type, a.img_encoder, a.visual_feature) == ('img', 'clip', 'toy_clip')
    a = trainer.parse_args(['--collection', 'multi30k', '--img_encoder', 'resnet_152'])
    assert (a.model_type, a.img_encoder, a.visual_feature) == ('img', 'resnet_152', 'resnet_152')
    a = trainer.parse_args(['--collection', 'mscoco'])
    assert (a.model_type, a.visual_feature) == ('img', 'clip_vit_b32')
    a = trainer.parse_args(['--collection', 'my_flickr_copy', '--model_type', 'img'])
    assert (a.model_type, a.visual_feature) == ('img', 'clip_vit_b32')
    for collection, feature in (('vatex', 'i3d_kinetics'), ('msrvttcn', 'resnext101-resnet152'),
                                ('toy', 'toy_feature')):
        a = trainer.parse_args(['--collection', collection, '--img_encoder', 'clip'])
        assert (a.model_type, a.img_encoder, a.visual_feature) == ('video', None, feature)
    with pytest.raises(SystemExit):
        trainer.parse_args(['--collection', 'multi30k', '--img_encoder', 'vit'])
    # the original image scripts' extra flags are accepted and change nothing
    base = trainer.parse_args(['--collection', 'multi30k'])
    compat = trainer.parse_args(['--collection', 'multi30k', '--img_encoder_name', 'ViT-B/32',
                                 '--img_encoder_input_dim', '512', '--img_path', '/x/flickr30k-images'])
    assert runs.run_dir(compat) == runs.run_dir(base)


def test_image_flags_are_in_the_hash_of_image_runs_only(img_root):
    base = runs.run_dir(trainer.parse_args(img_argv(img_root, 'h')))
    for extra in (['--task', '2'], ['--clean_eval', 'en'], ['--img_encoder', 'resnet_152', '--visual_feature',
                                                             'toy_clip'], ['--data_type', 'google_enc2fr']):
        assert runs.run_dir(trainer.parse_args(img_argv(img_root, 'h', *extra))) != base, extra
    # a video run's folder does not depend on them (it is the folder it had before image support)
    video = ['--rootpath', '/r', '--collection', 'toy', '--postfix', 'h']
    plain = runs.run_dir(trainer.parse_args(video))
    assert runs.run_dir(trainer.parse_args(video + ['--task', '2', '--clean_eval', 'en', '--img_encoder', 'clip',
                                                    '--model_type', 'video'])) == plain


# ============ bad input: one line naming the file and the fix ============

def test_id_file_count_disagrees_with_npy_rows(img_root, tmp_path):
    root = copy_root(img_root, tmp_path)
    id_file = paths.image_id_file(root, 'toyimg', 'train', 'toy_clip')
    with open(id_file, 'a') as f:
        f.write('999999\n')
    msg = error_of(trainer.main, img_argv(root, 'bad', '--data_type', 'google_enc2de'))
    assert f'train-toy_clip-avgpool.npy: {TINY_IMG["n_train"]} feature rows but {id_file} lists ' \
           f'{TINY_IMG["n_train"] + 1} image ids' in msg and 're-download or re-extract' in msg
    assert not os.path.exists(os.path.join(root, 'toyimg', 'MM_2022'))         # nothing was made


def test_missing_image_features(img_root, tmp_path):
    root = copy_root(img_root, tmp_path)
    npy = paths.image_npy_candidates(root, 'toyimg', 'val', 'toy_clip')[0]
    os.remove(npy)
    msg = error_of(trainer.main, img_argv(root, 'bad'))
    assert npy in msg and 'util/extract_image_features.py' in msg


def test_missing_test_features_stop_the_tester(img_root, tmp_path):
    root = copy_root(img_root, tmp_path)
    run = trainer.main(img_argv(root, 'tst', '--num_epochs', '0', '--skip_test', '1'))['run_dir']
    npy = paths.image_npy_candidates(root, 'toyimg', 'test', 'toy_clip')[0]
    os.remove(npy)
    msg = error_of(tester.main, ['--rootpath', root, '--logger_name', run, '--device', 'cpu', '--workers', '0'])
    assert npy in msg and 'util/extract_image_features.py' in msg


def test_caption_whose_image_has_no_features(img_root, tmp_path):
    root = copy_root(img_root, tmp_path)
    text = paths.text_dir(root, 'toyimg')
    for name, tag, words in (('toyimgtrain_enc', 'enc', 'a dog'), ('toyimgtrain_google_enc2de', 'enc2de', 'ein hund'),
                             ('toyimgtrain_google_enc2de2enc', 'enc2de2enc', 'a dog')):
        with open(os.path.join(text, f'{name}.caption.txt'), 'a', encoding='utf-8') as f:
            f.write(f'123.jpg#{tag}#0 {words}\n')
    msg = error_of(trainer.main, img_argv(root, 'bad', '--num_epochs', '0', '--skip_test', '1'))
    assert 'toyimgtrain_enc.caption.txt: 1 images have no features in' in msg and '(first: 123)' in msg
    assert 'extract them with util/extract_image_features.py' in msg


def test_language_the_collection_lacks(img_root):
    msg = error_of(trainer.main, img_argv(img_root, 'bad', '--data_type', 'google_enc2ja'))
    assert paths.text_dir(img_root, 'toyimg') in msg
    assert "has no 'ja' captions (languages: de, fr, cs); pass --data_type google_enc2<de|fr|cs>" in msg
    msg = error_of(trainer.main, img_argv(img_root, 'bad', '--task', '2'))
    assert "task 2 does not exist for 'toyimg'" in msg and 'pass --task 1' in msg
    msg = error_of(trainer.main, img_argv(img_root, 'bad', '--model', 'mlcmr'))
    assert 'NRCCR only; pass --model nrccr' in msg


def test_missing_caption_file_is_named_before_training(img_root, tmp_path):
    root = copy_root(img_root, tmp_path)
    gone = os.path.join(paths.text_dir(root, 'toyimg'), 'toyimgtest_fr_2016.caption.txt')
    os.remove(gone)
    msg = error_of(trainer.main, img_argv(root, 'bad', '--data_type', 'google_enc2fr'))
    assert os.path.basename(gone) in msg and paths.text_dir(root, 'toyimg') in msg
    # with --skip_test 1 the test files are not needed
    trainer.main(img_argv(root, 'ok', '--data_type', 'google_enc2fr', '--num_epochs', '0', '--skip_test', '1'))


# ============ extracted features ============

def test_extracted_clip_features_are_read_by_the_trainer(img_root, tmp_path):
    from PIL import Image
    from basic.bigfile import BigFile
    from util import extract_image_features as ex
    from basic.clip_encoder import save_tiny_clip
    root = copy_root(img_root, tmp_path)
    ids = []
    for split in paths.SPLITS:
        with open(paths.image_id_file(root, 'toyimg', split, 'toy_clip')) as f:
            ids += f.read().split()
    images = tmp_path / 'jpgs'
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in ids:
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(images / f'{i}.jpg')
    out = paths.feature_dir(root, 'toyimg', 'clip_tiny')
    ex.main(['--images', str(images), '--out', out, '--model', save_tiny_clip(str(tmp_path / 'clip')),
             '--device', 'cpu', '--workers', '0'])
    # the test split's id file lives in the feature folder (released layout); the BigFile needs no id file
    run = trainer.main(img_argv(root, 'big', '--visual_feature', 'clip_tiny', '--num_epochs', '1'))
    saved = ckpt.load_checkpoint(os.path.join(run['run_dir'], 'model_best.pth.tar'))
    assert saved['model_cfg']['visual_feat_dim'] == BigFile(out).ndims == 16
    assert run['test']['metrics']['w=0.5']['t2v_r1'] >= 0
    store = dp.open_store(root, saved['data_cfg'], 'val')
    with open(paths.image_id_file(root, 'toyimg', 'val', 'toy_clip')) as f:
        assert store.ids == f.read().split()                    # ordered by the split's id file
    np.testing.assert_array_equal(store.frames(store.ids[0])[0], BigFile(out).read_one(store.ids[0]))


# ============ original NRCCR image checkpoints ============

def release_image_parts(model, clip_keys=True):
    """Our NRCCR image model's weights in the original image release layout: the video-encoder part is
    DataParallel's `module.proj.*` plus (CLIP runs) the whole CLIP model under `module.encoder.*`."""
    from test_model import to_release_format
    parts = to_release_format(model)
    assert set(parts[0]) == {'module.proj.weight', 'module.proj.bias'}
    if clip_keys:
        parts[0]['module.encoder.visual.conv1.weight'] = torch.randn(8, 3, 4, 4)
        parts[0]['module.encoder.logit_scale'] = torch.tensor(4.6)
        parts[0]['module.encoder.token_embedding.weight'] = torch.randn(10, 8)
    return parts


def release_opt(**kw):
    base = dict(collection='toyimg', model_type='img', img_encoder='clip', img_encoder_name='ViT-B/32',
                data_type='google_enc2fr', task=2, visual_feature='resnet_152', layer_list=['layer.2', 'layer.3'],
                text_num_attention=4, visual_num_attention=4, disc_type='not-so-weak', frozen='frozen')
    base.update(kw)
    return argparse.Namespace(**base)


def test_original_clip_image_checkpoint_tests_like_ours(img_root, tmp_path):
    root = copy_root(img_root, tmp_path)
    run = trainer.main(img_argv(root, 'legacy', '--data_type', 'google_enc2fr', '--num_epochs', '1',
                                '--skip_test', '1'))['run_dir']
    ours, _ = models.load_model(os.path.join(run, 'model_best.pth.tar'))
    legacy = tmp_path / 'release' / 'model_best.pth.tar'
    legacy.parent.mkdir()
    # task 2 in the options: the original parser's default (its scripts did not pass --task)
    torch.save({'epoch': 0, 'model': release_image_parts(ours), 'best_rsum': 1.0, 'Eiters': 3,
                'opt': release_opt(task=1)}, legacy)
    loaded, train_args = models.load_model(str(legacy), bert_name=os.path.join(root, 'tiny_bert_img'))
    assert loaded.cfg['visual_encoder'] == 'clip' and loaded.cfg['visual_feat_dim'] == TINY_IMG['dim']
    assert loaded.cfg['video_hidden_size'] == 32
    for key, value in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    common = ['--rootpath', root, '--device', 'cpu', '--workers', '0', '--eval_batch_size', '8']
    a = tester.main(common + ['--logger_name', run, '--results_dir', str(tmp_path / 'ours')])
    b = tester.main(common + ['--checkpoint', str(legacy), '--bert_name', os.path.join(root, 'tiny_bert_img'),
                              '--results_dir', str(tmp_path / 'theirs')])
    assert a['metrics'] == b['metrics']
    # the release options named a ResNet feature folder the CLIP run never read: the CLIP folder is used
    data_cfg = dp.data_config_from_train_args(train_args)
    assert (data_cfg['model_type'], data_cfg['visual_feature'], data_cfg['img_encoder'], data_cfg['task']) == (
        'img', 'toy_clip', 'clip', 1)


def test_original_resnet_image_checkpoint_and_inferred_kinds(img_root):
    from test_image_model import image_cfg
    bert = os.path.join(img_root, 'tiny_bert_img')
    torch.manual_seed(0)
    resnet = models.build_model(image_cfg(img_root, 'resnet', 24, bert_name=bert, text_hidden_size=32))
    cfg, state = legacy.convert_legacy_nrccr({'model': release_image_parts(resnet, clip_keys=False),
                                              'opt': vars(release_opt(img_encoder='resnet_152'))}, bert)
    assert (cfg['visual_encoder'], cfg['visual_feat_dim']) == ('resnet', 24)
    assert not any(k.startswith('video_encoder.encoder.') for k in state)
    # options without img_encoder / model_type: the kind comes from the weights
    no_kind = {k: v for k, v in vars(release_opt()).items() if k not in ('img_encoder', 'model_type')}
    cfg, _ = legacy.convert_legacy_nrccr({'model': release_image_parts(resnet, clip_keys=False), 'opt': no_kind}, bert)
    assert cfg['visual_encoder'] == 'resnet'
    clip = models.build_model(image_cfg(img_root, 'clip', 24, bert_name=bert, text_hidden_size=32))
    for with_keys in (True, False):
        cfg, state = legacy.convert_legacy_nrccr({'model': release_image_parts(clip, clip_keys=with_keys),
                                                  'opt': no_kind}, bert)
        assert (cfg['visual_encoder'], cfg['visual_feat_dim'], cfg['video_hidden_size']) == ('clip', 24, 40)
        m = models.build_model(cfg)
        assert m.load_state_dict(state, strict=True)
    from basic.errors import DataError
    with pytest.raises(DataError, match='weights and options disagree'):
        legacy.convert_legacy_nrccr({'model': release_image_parts(clip), 'opt': vars(release_opt(img_encoder='resnet'))},
                                    bert)


# ============ scripts: the flags they pass exist ============

def recorded_args(tmp_path, script, args, extra_env=None):
    """Run `script` with a fake interpreter; returns the argument lists of each Python call."""
    from test_launch import fake_python
    python = fake_python(tmp_path / 'bin' / 'python')
    record = tmp_path / 'record.txt'
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHON', 'VIRTUAL_ENV')}
    env.update(PYTHON=python, RECORD=str(record), **(extra_env or {}))
    proc = subprocess.run(['bash', str(REPO / script), *args], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [line.split()[1:] for line in record.read_text().splitlines()]


@pytest.mark.skipif(shutil.which('bash') is None, reason='needs bash')
@pytest.mark.parametrize('script, args, expect', [
    ('do_all_multi30k.sh', ['/R', '1', 'cpu'], dict(collection='multi30k', task=1, img_encoder='clip',
                                                    visual_feature='clip_vit_b32', data_type='google_enc2de')),
    ('do_all_multi30k.sh', ['/R', '2', 'cpu', '--img_encoder', 'resnet_152', '--data_type', 'google_enc2cs'],
     dict(collection='multi30k', task=2, img_encoder='resnet_152', visual_feature='resnet_152',
          data_type='google_enc2cs')),
    ('do_all_mscoco.sh', ['/R', 'cpu'], dict(collection='mscoco', task=1, img_encoder='clip',
                                             visual_feature='clip_vit_b32', data_type='google_enc2ja')),
    ('do_all_mscoco.sh', ['/R', 'cpu', '--data_type', 'google_enc2zh'], dict(collection='mscoco',
                                                                             data_type='google_enc2zh')),
    ('do_all_toy.sh', ['/R', 'cpu', '--collection', 'toyimg', '--data_type', 'google_enc2cs'],
     dict(collection='toyimg', img_encoder='clip', visual_feature='toy_clip', data_type='google_enc2cs',
          bert_name='/R/tiny_bert_img')),
])
def test_image_training_scripts_pass_flags_the_trainer_accepts(tmp_path, script, args, expect):
    calls = recorded_args(tmp_path, script, args)
    train = [c for c in calls if c and c[0] == 'trainer.py']
    assert len(train) == 1
    a = trainer.parse_args(train[0][1:])
    assert a.model == 'nrccr' and a.model_type == 'img' and a.rootpath == '/R'
    for key, value in expect.items():
        assert getattr(a, key) == value, key
    if script != 'do_all_toy.sh':       # the original image scripts' settings
        assert (a.disc_type, a.batch_size, a.layer_list[0], len(a.layer_list)) == ('not-so-weak', 128, 'layer.3', 9)


@pytest.mark.skipif(shutil.which('bash') is None, reason='needs bash')
@pytest.mark.parametrize('script, collection', [('do_test_multi30k.sh', 'multi30k'), ('do_test_mscoco.sh', 'mscoco')])
def test_image_test_scripts_pass_flags_the_tester_accepts(tmp_path, script, collection):
    calls = recorded_args(tmp_path, script, ['/R', '/R/run', 'cpu', '--clean_eval', 'en'])
    test = [c for c in calls if c and c[0] == 'tester.py']
    assert len(test) == 1
    parser = argparse.ArgumentParser(parents=[tester.get_args_parser()])
    a = parser.parse_args(test[0][1:])
    assert (a.rootpath, a.collection, a.logger_name, a.clean_eval) == ('/R', collection, '/R/run', 'en')


@pytest.mark.skipif(shutil.which('bash') is None, reason='needs bash')
def test_multi30k_scripts_train_and_test_a_multi30k_shaped_collection(tmp_path):
    """do_all_multi30k.sh and do_test_multi30k.sh for real, on a tiny collection named multi30k (toy features,
    tiny BERT and sizes passed as extra flags, which come after the script's and win)."""
    import sys
    root = str(tmp_path / 'VS')
    make_toy_image_collection(root, 'multi30k', **TINY_IMG)
    env = dict(os.environ, PYTHON=sys.executable, FEATURE='toy_clip', OMP_NUM_THREADS='1')
    tiny = img_argv(root, 'script', '--num_epochs', '1', '--data_type', 'google_enc2fr', collection='multi30k')
    tiny = tiny[tiny.index('--bert_name'):]
    proc = subprocess.run(['bash', str(REPO / 'do_all_multi30k.sh'), root, '1', 'cpu', *tiny], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs_dir = os.path.join(root, 'multi30k', 'MM_2022', 'multi30k')
    (name,) = os.listdir(runs_dir)
    assert name.startswith('nrccr_toy_clip_google_enc2fr_not-so-weak_cfg')
    run = os.path.join(runs_dir, name, 'script')
    saved = ckpt.load_checkpoint(os.path.join(run, 'model_best.pth.tar'))
    assert (saved['data_cfg']['model_type'], saved['data_cfg']['task'], saved['data_cfg']['img_encoder']) == (
        'img', 1, 'clip')
    assert 'multi30ktest_google_fr2enc_2016' in proc.stdout
    proc = subprocess.run(['bash', str(REPO / 'do_test_multi30k.sh'), root, run, 'cpu', '--results_dir',
                           str(tmp_path / 'res'), '--workers', '0'], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / 'res' / 'metrics.json') as f:
        assert list(json.load(f)) == ['w=1.0', 'w=0.8', 'w=0.5', 'w=0.2', 'w=0.0']
