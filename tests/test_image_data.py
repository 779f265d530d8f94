"""Image collections: file naming (Multi-30K task 1/2, MSCOCO), the image feature store (released .npy layout and
BigFile), caption tables, the toy image collection and the format_check presets."""
import io
import os
import shutil

import numpy as np
import pytest

from basic import paths
from basic.bigfile import write_bigfile
from basic.errors import DataError
from basic import data_provider as dp
from basic import image_data as idata
from util.format_check import main as format_check
from util.make_toy_data import build_image_vocab, make_toy_image_collection

TINY_IMG = dict(n_train=20, n_val=6, n_test=8, captions_per_image=2, dim=24, bert_hidden=32, bert_layers=4, seed=0)


@pytest.fixture(scope='module')
def img_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('VisualSearchImg'))
    make_toy_image_collection(root, 'toyimg', **TINY_IMG)
    return root


@pytest.fixture(scope='module')
def tok(img_root):
    return dp.build_tokenizer(os.path.join(img_root, 'tiny_bert_img'), True)


def cfg_of(root, lang='de', **kw):
    """(rootpath, data_cfg) of the toy image collection."""
    kw.setdefault('visual_feature', 'toy_clip')
    return root, dp.data_config(collection='toyimg', model_type='img', img_encoder='clip',
                                data_type=f'google_enc2{lang}', **kw)


def image_split(rc, split, tok, train=False):
    """(table, store) of a split through the data layer, every caption's image checked against the store."""
    root, cfg = rc
    table = dp.train_table(root, cfg, tok) if train else dp.eval_table(root, cfg, split, tok)
    store = dp.open_store(root, cfg, split)
    store.check_videos(table.video_ids, next(iter(table.files.values())))
    return table, store


def names(streams):
    return [(s.role, s.candidates, s.clean) for s in streams]


# ============ naming ============

def test_multi30k_task1_names():
    assert names(paths.image_streams('multi30k', 'train', 'google_enc2de', 1)) == [
        ('src', ('multi30ktrain_enc.caption.txt',), 'en'),
        ('tr', ('multi30ktrain_google_enc2de.caption.txt',), 'raw'),
        ('bt', ('multi30ktrain_google_enc2de2enc.caption.txt',), 'raw')]
    assert names(paths.image_streams('multi30k', 'val', 'google_enc2de', 1)) == [
        ('primary', ('multi30kval_google_de2enc_task1.caption.txt',), 'raw'),
        ('second', ('multi30kval_de_task1.caption.txt',), 'raw')]
    assert names(paths.image_streams('multi30k', 'test', 'google_enc2de', 1)) == [
        ('primary', ('multi30ktest_google_de2enc_2016_task1.caption.txt',), 'raw'),
        ('second', ('multi30ktest_de_2016_task1.caption.txt',), 'raw')]
    # only German has a task-1 suffix (task 2 has German captions of its own)
    assert names(paths.image_streams('multi30k', 'val', 'google_enc2fr', 1)) == [
        ('primary', ('multi30kval_google_fr2enc.caption.txt',), 'raw'), ('second', ('multi30kval_fr.caption.txt',), 'raw')]
    assert names(paths.image_streams('multi30k', 'test', 'google_enc2cs', 1)) == [
        ('primary', ('multi30ktest_google_cs2enc_2016.caption.txt',), 'raw'),
        ('second', ('multi30ktest_cs_2016.caption.txt',), 'raw')]
    assert paths.image_streams('multi30k', 'val', 'google_enc2de', 1, clean_eval='en')[0].clean == 'en'


def test_multi30k_task2_and_mscoco_names():
    assert [s.candidates[0] for s in paths.image_streams('multi30k', 'train', 'google_enc2fr', 2)] == [
        'Flickr30ktrain_enc.caption.txt', 'Flickr30ktrain_google_enc2fr.caption.txt',
        'Flickr30ktrain_google_enc2fr2enc.caption.txt']
    assert [s.candidates[0] for s in paths.image_streams('multi30k', 'val', 'google_enc2de', 2)] == [
        'multi30kval_google_de2enc.caption.txt', 'multi30kval_de.caption.txt']
    assert [s.candidates[0] for s in paths.image_streams('multi30k', 'test', 'google_enc2de', 2)] == [
        'multi30ktest_google_de2enc_2016.caption.txt', 'multi30ktest_de_2016.caption.txt']
    assert [s.candidates for s in paths.image_streams('mscoco', 'test', 'google_enc2ja')] == [
        ('mscocotest_google_ja2enc_2016.caption.txt', 'mscocotest_google_ja2enc.caption.txt'),
        ('mscocotest_ja_2016.caption.txt', 'mscocotest_ja.caption.txt')]
    assert [s.candidates[0] for s in paths.image_streams('mscoco', 'train', 'google_enc2zh')] == [
        'mscocotrain_enc.caption.txt', 'mscocotrain_google_enc2zh.caption.txt',
        'mscocotrain_google_enc2zh2enc.caption.txt']
    with pytest.raises(ValueError, match='task 2 exists for Multi-30K only'):
        paths.image_streams('mscoco', 'train', 'google_enc2zh', 2)
    with pytest.raises(ValueError, match='provider>_enc2<xx>'):
        paths.image_streams('multi30k', 'val', 'de')


def test_feature_file_names():
    j = os.path.join
    assert paths.image_id_file('/r', 'multi30k', 'train', 'resnet_152') == j('/r', 'multi30k', 'FeatureData', 'train_id.txt')
    assert paths.image_id_file('/r', 'multi30k', 'val', 'resnet_152') == j('/r', 'multi30k', 'FeatureData', 'val_id.txt')
    assert paths.image_id_file('/r', 'multi30k', 'test', 'resnet_152') == j(
        '/r', 'multi30k', 'FeatureData', 'resnet_152', 'test_id_2016.txt')
    assert paths.image_id_file('/r', 'mscoco', 'val', 'f', 'google_enc2zh') == j('/r', 'mscoco', 'FeatureData', 'zh_val_id.txt')
    assert paths.image_id_file('/r', 'mscoco', 'test', 'f', 'google_enc2ja') == j('/r', 'mscoco', 'FeatureData', 'f',
                                                                                  'ja_test_id.txt')
    fd = j('/r', 'multi30k', 'FeatureData', 'resnet_152')
    assert paths.image_npy_candidates('/r', 'multi30k', 'train', 'resnet_152') == (j(fd, 'train-resnet_152-avgpool.npy'),)
    assert paths.image_npy_candidates('/r', 'multi30k', 'val', 'resnet_152') == (j(fd, 'val-resnet_152-avgpool.npy'),)
    assert paths.image_npy_candidates('/r', 'multi30k', 'test', 'resnet_152') == (
        j(fd, 'test_2016_flickr-resnet_152-avgpool.npy'), j(fd, 'test_2016_flickr-resnet152-avgpool.npy'))


# ============ store ============

def write_npy_split(folder, ids, feats, id_name='train_id.txt', npy_name='train-f-avgpool.npy'):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, id_name), 'w') as f:
        f.write('\n'.join(ids) + '\n')
    np.save(os.path.join(folder, npy_name), feats)
    return os.path.join(folder, id_name), os.path.join(folder, npy_name)


def test_npy_store_is_a_one_frame_video_store(tmp_path):
    feats = np.arange(12, dtype=np.float64).reshape(4, 3)
    id_file, npy = write_npy_split(str(tmp_path), ['a', 'b', 'c', 'd'], feats)
    store = idata.ImageStore.from_npy(id_file, npy)
    assert (store.dim, len(store), store.ids, store.path) == (3, 4, ['a', 'b', 'c', 'd'], npy)
    out = store.frames('c')
    assert out.dtype == np.float32 and out.shape == (1, 3) and out.flags.writeable   # torch.from_numpy takes it
    np.testing.assert_array_equal(out, [[6, 7, 8]])
    id32, npy32 = write_npy_split(str(tmp_path / 'f32'), ['a', 'b'], np.ones((2, 3), np.float32))
    assert idata.ImageStore.from_npy(id32, npy32).frames('b').flags.writeable     # not a view of the read-only map
    store.check_videos(['a', 'd', 'a'], 'captions.txt')
    with pytest.raises(DataError, match=r'^captions\.txt: 2 images have no features in .*npy \(first: x, y\); extract'):
        store.check_videos(['a', 'x', 'y'], 'captions.txt')
    # the video datasets and collate take it unchanged
    table = dp.CaptionTable(['a#enc#0', 'c#enc#0'], ['a', 'c'], {'src': [np.array([101, 5, 102], np.int32)] * 2})
    batch = dp.collate([dp.TrainDataset(table, store)[i] for i in range(2)])
    assert batch['video']['frames'].shape == (2, 1, 3) and batch['video']['mask'].tolist() == [[1.0], [1.0]]
    np.testing.assert_array_equal(batch['video']['frames'][1, 0].numpy(), [6, 7, 8])


def test_npy_store_errors(tmp_path):
    id_file, npy = write_npy_split(str(tmp_path), ['a', 'b', 'c'], np.zeros((4, 2), np.float32))
    with pytest.raises(DataError, match=r'train-f-avgpool\.npy: 4 feature rows but .*train_id\.txt lists 3 image ids'):
        idata.ImageStore.from_npy(id_file, npy)
    with pytest.raises(DataError, match=r'nothere\.npy: feature array missing'):
        idata.ImageStore.from_npy(id_file, str(tmp_path / 'nothere.npy'))
    with pytest.raises(DataError, match=r'no_ids\.txt: image id file missing'):
        idata.ImageStore.from_npy(str(tmp_path / 'no_ids.txt'), npy)
    (tmp_path / 'gap.txt').write_text('a\n\nb\n')
    with pytest.raises(DataError, match=r'gap\.txt:2: expected one image id per line'):
        idata.read_image_ids(str(tmp_path / 'gap.txt'))
    np.save(tmp_path / 'obj.npy', np.array([{'x': 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r'obj\.npy: not a plain numeric \.npy array'):
        idata.load_feature_array(str(tmp_path / 'obj.npy'))
    (tmp_path / 'crlf.txt').write_bytes(b'a\r\nb\r\n')
    assert idata.read_image_ids(str(tmp_path / 'crlf.txt')) == ['a', 'b']


def test_bigfile_store_with_and_without_id_file(tmp_path):
    fdir = str(tmp_path / 'feat')
    write_bigfile(fdir, ['x', 'y', 'z'], np.eye(3, dtype=np.float32))
    store = idata.ImageStore.from_bigfile(fdir)
    assert store.ids == ['x', 'y', 'z'] and store.dim == 3
    np.testing.assert_array_equal(store.frames('y'), [[0, 1, 0]])
    (tmp_path / 'ids.txt').write_text('z\nx\n')
    store = idata.ImageStore.from_bigfile(fdir, str(tmp_path / 'ids.txt'))
    assert store.ids == ['z', 'x'] and 'y' not in store
    np.testing.assert_array_equal(store.frames('z'), [[0, 0, 1]])
    (tmp_path / 'bad.txt').write_text('z\nw\n')
    with pytest.raises(DataError, match=r'bad\.txt: 1 of 2 image ids have no row in .*feat \(first: w\)'):
        idata.ImageStore.from_bigfile(fdir, str(tmp_path / 'bad.txt'))


def test_open_image_store_prefers_a_bigfile(img_root, tmp_path):
    root = str(tmp_path / 'copy')
    shutil.copytree(img_root, root)
    cfg = cfg_of(root, visual_feature='toy_clip')
    npy_store = idata.open_image_store(*cfg, 'val')
    assert npy_store.path.endswith('val-toy_clip-avgpool.npy') and len(npy_store) == TINY_IMG['n_val']
    # the same features as a BigFile of every split: used instead, ordered by the split's id file
    all_ids, rows = [], []
    for split in paths.SPLITS:
        s = idata.open_image_store(*cfg, split)
        all_ids += s.ids
        rows += [s.frames(i)[0] for i in s.ids]
    write_bigfile(paths.feature_dir(root, 'toyimg', 'toy_clip'), all_ids, np.stack(rows))
    big_store = idata.open_image_store(*cfg, 'val')
    assert big_store.path == paths.feature_dir(root, 'toyimg', 'toy_clip') and big_store.ids == npy_store.ids
    for i in npy_store.ids:
        np.testing.assert_array_equal(big_store.frames(i), npy_store.frames(i))
    with pytest.raises(DataError, match=r'val-nofeat-avgpool\.npy: no val features for toyimg'):
        idata.open_image_store(*cfg_of(root, visual_feature='nofeat'), 'val')


# ============ caption tables ============

def test_tables_roles_pairing_and_store(img_root, tok):
    n = TINY_IMG['captions_per_image']
    for lang in ('de', 'fr', 'cs'):
        cfg = cfg_of(img_root, lang)
        assert cfg[1]['task'] == 1 and idata.default_feature('toyimg', 'clip') == 'toy_clip'
        train, store = image_split(cfg, 'train', tok, train=True)
        assert set(train.tokens) == {'src', 'tr', 'bt'} and len(train) == TINY_IMG['n_train'] * n
        assert train.files['tr'].endswith(f'toyimgtrain_google_enc2{lang}.caption.txt')
        assert store.dim == TINY_IMG['dim'] and set(train.video_ids) <= set(store.ids)
        for split, count in (('val', TINY_IMG['n_val']), ('test', TINY_IMG['n_test'])):
            table, store = image_split(cfg, split, tok)
            assert set(table.tokens) == {'primary', 'second'} and len(table.videos) == count
            assert f'google_{lang}2enc' in os.path.basename(table.files['primary'])
            assert os.path.basename(table.files['second']).startswith(f'toyimg{split}_{lang}')
            assert table.cap_ids[0].split('#')[1] == f'{lang}2enc'          # MT into English drives the table
            # no word piece of the toy image captions is unknown to the tiny BERT
            assert not any((t == tok.unk_token_id).any() for toks in table.tokens.values() for t in toks)


def test_eval_clean_rule(img_root, tok):
    raw = dp.eval_table(*cfg_of(img_root), 'val', tok)
    cleaned = dp.eval_table(*cfg_of(img_root, clean_eval='en'), 'val', tok)
    with open(raw.files['primary'], encoding='utf-8') as f:
        first = f.readline().split(' ', 1)[1].strip()
    assert raw.tokens['primary'][0].tolist() == tok(first)['input_ids']
    assert cleaned.tokens['primary'][0].tolist() == tok(dp.clean_english(first))['input_ids']
    np.testing.assert_array_equal(raw.tokens['second'][0], cleaned.tokens['second'][0])


def test_table_errors(img_root, tok, tmp_path):
    with pytest.raises(DataError, match=r"TextData: collection 'toyimg' has no 'ja' captions \(languages: de, fr, cs\); "
                                        r'pass --data_type google_enc2<de\|fr\|cs>'):
        dp.train_table(*cfg_of(img_root, 'ja'), tok)
    with pytest.raises(DataError, match="task 2 does not exist for 'toyimg'"):
        dp.train_table(*cfg_of(img_root, task=2), tok)
    root = str(tmp_path / 'copy')
    shutil.copytree(img_root, root)
    # a caption whose image has no features
    text = paths.text_dir(root, 'toyimg')
    with open(os.path.join(text, 'toyimgval_google_de2enc_task1.caption.txt'), 'a', encoding='utf-8') as f:
        f.write('123.jpg#de2enc#0 a dog\n')
    with open(os.path.join(text, 'toyimgval_de_task1.caption.txt'), 'a', encoding='utf-8') as f:
        f.write('123.jpg#de#0 ein Hund\n')
    with pytest.raises(DataError, match=r'toyimgval_google_de2enc_task1\.caption\.txt: 1 images have no features in '
                                        r'.*val-toy_clip-avgpool\.npy \(first: 123\)'):
        image_split(cfg_of(root), 'val', tok)
    os.remove(os.path.join(text, 'toyimgtest_fr_2016.caption.txt'))
    with pytest.raises(DataError, match=r"no caption file for stream 'second' \(tried toyimgtest_fr_2016\.caption\.txt\)"):
        dp.eval_table(*cfg_of(root, 'fr'), 'test', tok)


# ============ toy collection ============

def test_toy_image_collection_is_deterministic_and_named_by_paths(img_root, tmp_path):
    other = str(tmp_path / 'again')
    out = make_toy_image_collection(other, 'toyimg', **TINY_IMG)
    assert out['written'] == {'collection': True, 'bert': True} and out['feature'] == 'toy_clip'
    for dirpath, _, files in os.walk(os.path.join(img_root, 'toyimg')):
        for name in files:
            a = os.path.join(dirpath, name)
            b = a.replace(img_root, other, 1)
            with open(a, 'rb') as fa, open(b, 'rb') as fb:
                assert fa.read() == fb.read(), name
    assert set(out['captions']) == set(os.listdir(out['text_dir']))
    with open(os.path.join(img_root, 'tiny_bert_img', 'vocab.txt'), encoding='utf-8') as f:
        assert f.read().split('\n')[:-1] == build_image_vocab()
    again = make_toy_image_collection(other, 'toyimg', **TINY_IMG)
    assert again['written'] == {'collection': False, 'bert': False}


def test_toy_features_carry_the_concepts(img_root):
    """Images sharing a subject are closer than images sharing none of the concepts (the collection is learnable)."""
    from util.make_toy_data import plan_images
    plan = {im.vid: im.concepts for im in plan_images(0, TINY_IMG['n_train'], TINY_IMG['n_val'], TINY_IMG['n_test'])}
    store = idata.open_image_store(*cfg_of(img_root), 'train')
    x = np.stack([store.frames(i)[0] for i in store.ids])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    same, diff = [], []
    for a in range(len(x)):
        for b in range(a + 1, len(x)):
            ca, cb = plan[store.ids[a]], plan[store.ids[b]]
            shared = sum(ca[s] == cb[s] for s in ca)
            (same if ca['subject'] == cb['subject'] else diff if shared == 0 else []).append(sims[a, b])
    assert np.mean(same) > np.mean(diff) + 0.1


# ============ format_check ============

def run_check(*argv):
    out = io.StringIO()
    return format_check(list(argv), out=out), out.getvalue()


def test_format_check_toyimg_complete_then_names_missing_files(img_root, tmp_path):
    code, text = run_check('--rootpath', img_root, '--collection', 'toyimg')
    assert code == 0 and text.rstrip().endswith('collection complete'), text
    root = str(tmp_path / 'copy')
    shutil.copytree(img_root, root)
    gone = [os.path.join(root, 'toyimg', 'TextData', 'toyimgval_google_cs2enc.caption.txt'),
            os.path.join(root, 'toyimg', 'FeatureData', 'toy_clip', 'test_id_2016.txt'),
            os.path.join(root, 'toyimg', 'FeatureData', 'toy_clip', 'train-toy_clip-avgpool.npy')]
    for path in gone:
        os.remove(path)
    code, text = run_check('--rootpath', root, '--collection', 'toyimg')
    assert code == 1 and text.rstrip().endswith('3 problems'), text
    missing = [line for line in text.splitlines() if line.startswith('MISSING')]
    assert len(missing) == 3
    for path in gone:
        assert any(path in line for line in missing), (path, missing)


def test_format_check_multi30k_and_mscoco_name_every_file(tmp_path):
    root = str(tmp_path)
    os.makedirs(os.path.join(root, 'multi30k'))
    code, text = run_check('--rootpath', root, '--collection', 'multi30k', '--feature', 'resnet_152')
    assert code == 1
    missing = {line.split(': ', 1)[1].split(' [')[0] for line in text.splitlines() if line.startswith('MISSING')}
    fd, td = os.path.join(root, 'multi30k', 'FeatureData'), os.path.join(root, 'multi30k', 'TextData')
    expected = {os.path.join(fd, 'train_id.txt'), os.path.join(fd, 'val_id.txt'),
                os.path.join(fd, 'resnet_152', 'test_id_2016.txt')}
    for task, prefix in ((1, 'multi30ktrain'), (2, 'Flickr30ktrain')):
        for x in ('de', 'fr', 'cs'):
            s = '_task1' if (x, task) == ('de', 1) else ''
            expected |= {os.path.join(td, n) for n in (
                f'{prefix}_enc.caption.txt', f'{prefix}_google_enc2{x}.caption.txt',
                f'{prefix}_google_enc2{x}2enc.caption.txt', f'multi30kval_google_{x}2enc{s}.caption.txt',
                f'multi30kval_{x}{s}.caption.txt', f'multi30ktest_google_{x}2enc_2016{s}.caption.txt',
                f'multi30ktest_{x}_2016{s}.caption.txt')}
    assert missing == expected

    os.makedirs(os.path.join(root, 'mscoco'))
    code, text = run_check('--rootpath', root, '--collection', 'mscoco')
    missing = {line.split(': ', 1)[1].split(' [')[0] for line in text.splitlines() if line.startswith('MISSING')}
    fd, td = os.path.join(root, 'mscoco', 'FeatureData'), os.path.join(root, 'mscoco', 'TextData')
    expected = {os.path.join(fd, 'train_id.txt'), os.path.join(td, 'mscocotrain_enc.caption.txt')}
    for x in ('zh', 'ja'):
        expected |= {os.path.join(fd, f'{x}_val_id.txt'), os.path.join(fd, 'clip_vit_b32', f'{x}_test_id.txt'),
                     os.path.join(td, f'mscocotrain_google_enc2{x}.caption.txt'),
                     os.path.join(td, f'mscocotrain_google_enc2{x}2enc.caption.txt'),
                     os.path.join(td, f'mscocoval_google_{x}2enc.caption.txt'),
                     os.path.join(td, f'mscocoval_{x}.caption.txt'),
                     os.path.join(td, f'mscocotest_google_{x}2enc_2016.caption.txt') +
                     f' (or mscocotest_google_{x}2enc.caption.txt)',
                     os.path.join(td, f'mscocotest_{x}_2016.caption.txt') + f' (or mscocotest_{x}.caption.txt)'}
    assert code == 1 and missing == expected


def test_make_toy_data_cli_builds_the_image_collection(tmp_path, capsys):
    from util.make_toy_data import main
    out = main(['--root', str(tmp_path), '--collection', 'toyimg', '--n_train', '4', '--n_val', '2', '--n_test', '2',
                '--captions_per_video', '1', '--dim', '8', '--bert_hidden', '16', '--bert_layers', '2',
                '--languages', 'fr'])
    printed = capsys.readouterr().out
    assert out['languages'] == ('fr',) and 'toyimgtest_fr_2016.caption.txt' in printed
    assert sorted(os.listdir(out['text_dir'])) == sorted(
        ['toyimgtrain_enc.caption.txt', 'toyimgtrain_google_enc2fr.caption.txt',
         'toyimgtrain_google_enc2fr2enc.caption.txt', 'toyimgval_google_fr2enc.caption.txt', 'toyimgval_fr.caption.txt',
         'toyimgtest_google_fr2enc_2016.caption.txt', 'toyimgtest_fr_2016.caption.txt'])
    assert np.load(os.path.join(out['feature_dir'], 'train-toy_clip-avgpool.npy')).shape == (4, 8)
    assert os.path.isfile(os.path.join(str(tmp_path), 'tiny_bert_img', 'vocab.txt'))
