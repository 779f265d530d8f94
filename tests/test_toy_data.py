"""Tests for util/make_toy_data.py: layout, determinism, file quirks, features, tiny BERT, MT noise."""
import ast
import os
import re

import numpy as np
import pytest

from basic.bigfile import BigFile
from util import make_toy_data as toy

SIZES = dict(n_train=24, n_val=8, n_test=60, captions_per_video=4, dim=16, seed=3)
ZH_TAGS = ('zh', 'enc2zh')  # tags whose text is Chinese
MT_SOURCE = {'enc2zh': 'enc', 'zhc2en': 'zh', 'zh2enc': 'zh', 'enc2zh2enc': 'enc2zh'}  # MT tag -> source tag
SPLIT_TAGS = {'train': {'enc', 'enc2zh', 'enc2zh2enc', 'zh', 'zhc2en'},
              'val': {'enc', 'zh', 'zh2enc', 'enc2zh'}, 'test': {'enc', 'zh', 'zh2enc', 'enc2zh'}}


@pytest.fixture(scope='module')
def builds(tmp_path_factory):
    """Two builds with the same seed (noisy MT) and one with mt_noise=0 beside the first."""
    a, b = tmp_path_factory.mktemp('a'), tmp_path_factory.mktemp('b')
    return dict(a=toy.make_toy_collection(str(a), **SIZES), b=toy.make_toy_collection(str(b), **SIZES),
                clean=toy.make_toy_collection(str(a), 'toyclean', **dict(SIZES, mt_noise=0.0)))


@pytest.fixture(scope='module')
def videos():
    return toy.plan_videos(SIZES['seed'], SIZES['n_train'], SIZES['n_val'], SIZES['n_test'])


def read_captions(path):
    """[(vid, tag, k, text)] in file order; independent of the project's caption reader."""
    with open(path, encoding='utf-8', newline='') as f:
        lines = f.read().splitlines()
    out = []
    for line in lines:
        cap_id, text = line.split(' ', 1)
        vid, tag, k = cap_id.split('#')
        out.append((vid, tag, int(k), text))
    return out


def concepts_in(text, tag):
    """(slot, index) pairs named in `text`: substring match for Chinese, word-sequence match for English."""
    found = set()
    words = re.findall(r'[a-z]+', text.lower())
    for slot in toy.SLOTS:
        for i, c in enumerate(toy.LEXICON[slot]):
            if tag in ZH_TAGS:
                hit = c.zh in text
            else:
                phrase = c.en.split()
                hit = any(words[j:j + len(phrase)] == phrase for j in range(len(words)))
            if hit:
                found.add((slot, i))
    return found


def by_key(rows):
    return {(vid, k): text for vid, _, k, text in rows}


# ============ layout and determinism ============

def test_layout_complete(builds):
    out = builds['a']
    assert out['written'] == {'collection': True, 'bert': True}
    assert sorted(os.listdir(out['feature_dir'])) == ['feature.bin', 'id.txt', 'shape.txt', 'video2frames.txt']
    assert out['feature_dir'].endswith(os.path.join('toy', 'FeatureData', 'toy_feature'))
    expected = {'toytrain.caption.txt', 'toytrain_google_enc2zh.caption.txt',
                'toytrain_google_enc2zh2enc.caption.txt', 'toytrain_zh.caption.txt',
                'toytrain_google_zhc2en.caption.txt'}
    for split in ('val', 'test'):
        expected |= {f'toy{split}.caption.txt', f'toy{split}_zh.caption.txt',
                     f'toy{split}_google_zh2enc.caption.txt', f'toy{split}_google_enc2zh.caption.txt'}
    assert set(os.listdir(out['text_dir'])) == expected  # in particular no toytrain_half.caption.txt
    assert {os.path.basename(p) for p in out['captions'].values()} == expected
    assert {'config.json', 'vocab.txt', 'model.safetensors'} <= set(os.listdir(out['bert_dir']))
    assert os.path.dirname(out['bert_dir']) == os.path.dirname(out['collection_dir'])
    assert not [p for p in os.listdir(os.path.dirname(out['collection_dir'])) if p.endswith('.partial')]


def _all_files(root):
    files = {}
    for d, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(d, n), 'rb') as f:
                files[os.path.relpath(os.path.join(d, n), root)] = f.read()
    return files


def test_same_seed_gives_identical_bytes(builds, tmp_path):
    root_a = os.path.dirname(builds['a']['collection_dir'])
    a = {k: v for k, v in _all_files(root_a).items() if not k.startswith('toyclean')}
    b = _all_files(os.path.dirname(builds['b']['collection_dir']))
    assert sorted(a) == sorted(b) and len(a) == 4 + 13 + 3
    for name in a:
        assert a[name] == b[name], name
    other = toy.make_toy_collection(str(tmp_path), **dict(SIZES, seed=4))
    with open(other['captions'][('train', 'enc')], 'rb') as f:
        assert f.read() != a[os.path.join('toy', 'TextData', 'toytrain.caption.txt')]


def test_existing_folders_left_alone_unless_overwrite(tmp_path, capsys):
    small = dict(n_train=3, n_val=2, n_test=2, captions_per_video=1, dim=4, bert_layers=1, bert_hidden=8)
    first = toy.make_toy_collection(str(tmp_path), **small)
    marker = os.path.join(first['collection_dir'], 'marker')
    open(marker, 'w').close()
    again = toy.main(['--root', str(tmp_path), '--n_train', '3'])
    assert again['written'] == {'collection': False, 'bert': False} and os.path.exists(marker)
    assert 'left alone' in capsys.readouterr().out
    redo = toy.make_toy_collection(str(tmp_path), overwrite=True, **small)
    assert redo['written'] == {'collection': True, 'bert': True} and not os.path.exists(marker)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match='collection'):
        toy.make_toy_collection(str(tmp_path), 'to y')
    with pytest.raises(ValueError, match='mt_noise'):
        toy.make_toy_collection(str(tmp_path), mt_noise=1.5)
    with pytest.raises(ValueError, match='n_val'):
        toy.make_toy_collection(str(tmp_path), n_val=0)
    assert not os.listdir(tmp_path)


# ============ captions ============

def test_caption_ids_well_formed_and_aligned(builds, videos):
    split_vids = {s: {v.vid for v in videos if v.split == s} for s in toy.SPLITS}
    assert sum(len(v) for v in split_vids.values()) == len({v.vid for v in videos})  # ids unique across splits
    ks = range(SIZES['captions_per_video'])
    for (split, tag), path in builds['a']['captions'].items():
        rows = read_captions(path)
        assert all(t == tag and text.strip() for _, t, _, text in rows), path
        keys = [(vid, k) for vid, _, k, _ in rows]
        assert len(keys) == len(set(keys)), f'duplicate ids in {path}'
        assert set(keys) == {(vid, k) for vid in split_vids[split] for k in ks}, path
        assert {tag for (s, tag) in builds['a']['captions'] if s == split} == SPLIT_TAGS[split]


def test_file_quirks(builds):
    caps = builds['a']['captions']
    runs_of_spaces = 0
    for (split, tag), path in caps.items():
        with open(path, 'rb') as f:
            raw = f.read()
        n_lines = len(read_captions(path))
        if tag == 'enc2zh':
            assert raw.count(b'\r\n') == n_lines and raw.endswith(b'\r\n')
        else:
            assert b'\r' not in raw
            assert raw.endswith(b'\n') != (tag == 'zh')  # zh files have no final newline
        if tag == 'enc':
            runs_of_spaces += sum('  ' in text for *_, text in read_captions(path))
    assert runs_of_spaces > 0
    for split in toy.SPLITS:
        def order(tag):
            return list(dict.fromkeys(vid for vid, *_ in read_captions(caps[(split, tag)])))
        assert sorted(order('enc')) == sorted(order('zh')) and order('enc') != order('zh')


def test_human_captions_name_the_video_concepts(builds, videos):
    """Every human caption names subject and action, at most one concept per slot, all of them the video's."""
    truth = {v.vid: {(s, i) for s, i in v.concepts.items()} for v in videos}
    for (split, tag), path in builds['a']['captions'].items():
        if tag not in ('enc', 'zh'):
            continue
        for vid, _, k, text in read_captions(path):
            found = concepts_in(text, tag)
            slots = [s for s, _ in found]
            assert found <= truth[vid] and len(slots) == len(set(slots)), (path, text)
            assert {'subject', 'action'} <= set(slots) and len(found) >= 3, (path, text)


def test_machine_translation_noise(builds):
    """Without noise MT keeps exactly the source's concepts; with mt_noise=0.3 about 70% of them survive."""
    kept = total = changed_captions = n_captions = 0
    for (split, tag), path in builds['a']['captions'].items():
        if tag not in MT_SOURCE:
            continue
        for name in ('clean', 'a'):
            paths = builds[name]['captions']
            src = by_key(read_captions(paths[(split, MT_SOURCE[tag])]))
            mt = by_key(read_captions(paths[(split, tag)]))
            for key, text in mt.items():
                s, m = concepts_in(src[key], MT_SOURCE[tag]), concepts_in(text, tag)
                slots = [x for x, _ in m]
                assert len(slots) == len(set(slots)) and set(slots) <= {x for x, _ in s}, (text, src[key])
                if name == 'clean':
                    assert m == s, (text, src[key])
                else:
                    kept, total = kept + len(s & m), total + len(s)
                    changed_captions, n_captions = changed_captions + (s != m), n_captions + 1
    assert total > 1000 and abs(kept / total - 0.7) < 0.05
    assert changed_captions / n_captions > 0.5
    # human captions come from their own random stream, so mt_noise leaves them untouched
    for tag in ('enc', 'zh'):
        assert (read_captions(builds['a']['captions'][('train', tag)])
                == read_captions(builds['clean']['captions'][('train', tag)]))


def _bag_of_concepts_r1(rows, tag, truth):
    """Expected R@1 (ties broken at random) when a caption's score for a video = number of shared concepts."""
    vids = list(truth)
    hits = []
    for vid, _, _, text in rows:
        found = concepts_in(text, tag)
        scores = np.array([len(found & truth[v]) for v in vids])
        best = scores == scores.max()
        hits.append(best[vids.index(vid)] / best.sum())
    return float(np.mean(hits))


def test_noisy_translations_hurt_naive_retrieval(builds, videos):
    truth = {v.vid: {(s, i) for s, i in v.concepts.items()} for v in videos if v.split == 'test'}
    r1 = {}
    for name in ('a', 'clean'):
        for tag in ('zh', 'enc2zh', 'enc', 'zh2enc'):
            r1[name, tag] = _bag_of_concepts_r1(read_captions(builds[name]['captions'][('test', tag)]), tag, truth)
    assert r1['a', 'zh'] > 0.7 and r1['a', 'enc'] > 0.7
    assert r1['a', 'zh'] - r1['a', 'enc2zh'] > 0.2  # target-language queries vs MT of English into Chinese
    assert r1['a', 'enc'] - r1['a', 'zh2enc'] > 0.2
    # the loss comes from the noise: noise-free MT retrieves exactly as well as its source captions
    assert r1['clean', 'enc2zh'] == pytest.approx(r1['clean', 'enc'])
    assert r1['clean', 'zh2enc'] == pytest.approx(r1['clean', 'zh'])


# ============ frames and features ============

def test_video_ids_and_frame_counts(builds, videos):
    with open(os.path.join(builds['a']['feature_dir'], 'video2frames.txt'), encoding='utf-8') as f:
        v2f = ast.literal_eval(f.read())
    assert list(v2f) == [v.vid for v in videos]
    for v in videos:
        assert '-' in v.vid and v.vid.count('_') >= 2 and '#' not in v.vid and ' ' not in v.vid
        assert v2f[v.vid] == [f'{v.vid}_{n}' for n in range(v.nframes)]
        assert all(f.rsplit('_', 1)[0] == v.vid for f in v2f[v.vid])
        assert 8 <= v.nframes <= 40 or 70 <= v.nframes <= 90
    for split in toy.SPLITS:
        counts = [v.nframes for v in videos if v.split == split]
        assert 1 <= sum(n > 64 for n in counts) < len(counts) / 2, split


def test_features_shape_dtype_and_content(builds, videos):
    fdir = builds['a']['feature_dir']
    bf = BigFile(fdir)
    n_frames = sum(v.nframes for v in videos)
    assert (bf.nrows, bf.ndims) == (n_frames, SIZES['dim'])
    assert os.path.getsize(os.path.join(fdir, 'feature.bin')) == n_frames * SIZES['dim'] * 4
    assert bf.data.dtype == np.float32 and np.isfinite(bf.data).all()
    assert set(bf.names) == {f'{v.vid}_{n}' for v in videos for n in range(v.nframes)}
    assert bf.names[:3] != [f'{videos[0].vid}_{n}' for n in range(3)]  # rows are shuffled
    # retrieval is learnable: a video's mean frame is nearest to its own concept mixture
    d = toy.concept_directions(SIZES['seed'], SIZES['dim'])
    mixtures = np.stack([sum(toy.SLOT_WEIGHTS[s] * d[s][v.concepts[s]] for s in toy.SLOTS) for v in videos])
    means = np.stack([bf.read([f'{v.vid}_{n}' for n in range(v.nframes)]).mean(0) for v in videos])
    dist = ((means[:, None] - mixtures[None]) ** 2).sum(-1)  # (videos, videos)
    own = dist[np.arange(len(videos)), np.arange(len(videos))]
    assert np.mean(own <= dist.min(1)) > 0.9


def test_frames_formula_without_noise(videos):
    """With no noise, frame_t = mixture + p_t d_action with |p_t| <= 0.5 and p_t varying over time."""
    d = toy.concept_directions(0, 32)
    v = videos[0]
    frames = toy.video_frames(v, d, 0, 0.0).astype(np.float64)  # (n, 32)
    mixture = sum(toy.SLOT_WEIGHTS[s] * d[s][v.concepts[s]] for s in toy.SLOTS)
    action = d['action'][v.concepts['action']]
    pulse = (frames - mixture) @ action / (action @ action)  # (n,)
    np.testing.assert_allclose(frames, mixture + pulse[:, None] * action, atol=1e-4)
    assert np.abs(pulse).max() <= 0.5 + 1e-4 and pulse.std() > 0.1
    noisy = toy.video_frames(v, d, 0, 1.0)
    assert 0.8 < (noisy - frames).std() < 1.2


# ============ tiny BERT ============

@pytest.fixture(scope='module')
def tokenizer(builds):
    transformers = pytest.importorskip('transformers')
    return transformers.BertTokenizerFast.from_pretrained(builds['a']['bert_dir'], do_lower_case=True)


def test_vocab_special_ids(builds, tokenizer):
    with open(os.path.join(builds['a']['bert_dir'], 'vocab.txt'), encoding='utf-8') as f:
        vocab = f.read().split('\n')[:-1]
    assert vocab[0] == '[PAD]' and vocab[1] == '[unused0]' and vocab[99] == '[unused98]'
    assert vocab[100:104] == ['[UNK]', '[CLS]', '[SEP]', '[MASK]'] and len(set(vocab)) == len(vocab)
    assert [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id,
            tokenizer.mask_token_id] == [0, 100, 101, 102, 103]
    assert tokenizer('男孩')['input_ids'] == [101, vocab.index('男'), vocab.index('孩'), 102]


def test_every_caption_tokenises_without_unk(builds, tokenizer):
    texts = [text for name in ('a', 'clean') for path in builds[name]['captions'].values()
             for *_, text in read_captions(path)]
    ids = tokenizer(texts)['input_ids']
    assert len(ids) > 3000
    assert not [t for t, i in zip(texts, ids) if 100 in i]
    assert tokenizer('THE CHEF, Singing.')['input_ids'] == tokenizer('the chef, singing.')['input_ids']


def test_bert_model_loads_from_folder(builds, tokenizer):
    torch = pytest.importorskip('torch')
    from transformers import BertModel
    model = BertModel.from_pretrained(builds['a']['bert_dir']).eval()
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size,
            cfg.max_position_embeddings, cfg.vocab_size) == (12, 64, 4, 256, 512, len(tokenizer.get_vocab()))
    assert any(k.startswith('encoder.layer.11.') for k in model.state_dict())
    batch = tokenizer(['一个男孩在公园跑步', 'a boy running'], padding=True, return_tensors='pt')
    with torch.inference_mode():
        out = model(**batch).last_hidden_state
    assert out.shape == (2, batch['input_ids'].shape[1], 64) and torch.isfinite(out).all()
