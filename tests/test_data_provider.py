"""Data pipeline: one-time tokenisation, augmentations, collate, determinism, non-parallel split, errors."""
import os
import shutil

import numpy as np
import pytest
import torch

from basic import paths
from basic.errors import DataError
from basic import data_provider as dp


def provider_args(root, **kw):
    """(rootpath, data_cfg) of the toy collection, for dp.train_table / dp.eval_table."""
    return root, dp.data_config(**dict(dict(collection='toy'), **kw))


@pytest.fixture(scope='module')
def tok(toy_root):
    return dp.build_tokenizer(os.path.join(toy_root, 'tiny_bert'), True)


@pytest.fixture(scope='module')
def store(toy_root):
    return dp.FrameStore(paths.feature_dir(toy_root, 'toy', 'toy_feature'))


def test_tokenizer_casing_parity(toy_root, tok):
    """docs/data.md, 'Tokenizer': lower-case + strip accents on the cased vocabulary."""
    assert tok('A Mán.')['input_ids'] == tok('a man.')['input_ids']
    cased = dp.build_tokenizer(os.path.join(toy_root, 'tiny_bert'), False)
    assert cased('A Mán.')['input_ids'] != cased('a man.')['input_ids']
    ids = tok('a man.')['input_ids']
    assert ids[0] == 101 and ids[-1] == 102


def test_lower_case_overrides_a_cased_tokenizer_json(toy_root, tmp_path):
    """mBERT ships a tokenizer.json whose normalizer says lowercase=false; the parity setting must win."""
    from transformers import BertTokenizerFast
    BertTokenizerFast.from_pretrained(os.path.join(toy_root, 'tiny_bert'), do_lower_case=False).save_pretrained(
        tmp_path / 'cased')
    assert (tmp_path / 'cased' / 'tokenizer.json').exists()
    tok = dp.build_tokenizer(str(tmp_path / 'cased'), True)
    assert tok('A Mán.')['input_ids'] == tok('a man.')['input_ids']
    assert dp.build_tokenizer(str(tmp_path / 'cased'), False)('A Mán.')['input_ids'] != tok('a man.')['input_ids']


def test_mask_tokens_counts_and_positions():
    rng = np.random.default_rng(0)
    for n in range(2, 60):
        ids = np.arange(1000, 1000 + n, dtype=np.int32)
        out = dp.mask_tokens(ids, rng, 103)
        masked = np.flatnonzero(out == 103)
        assert len(masked) == int(np.floor(0.15 * n))            # docs/data.md: floor(0.15 n) distinct positions
        assert 0 not in masked and n - 1 not in masked            # never [CLS] / [SEP]
        assert np.array_equal(out[out != 103], ids[out != 103])


def test_drop_frames_fraction_and_order():
    rng = np.random.default_rng(0)
    for n in range(1, 100):
        keep = dp.drop_frames(n, rng)
        assert len(keep) == n - int(np.floor(0.8 * n)) >= 1        # docs/data.md, 'Frame drop'
        assert np.all(np.diff(keep) > 0) and keep.max() < n


def test_cap_frames_first_and_uniform():
    frames = np.arange(100, dtype=np.float32)[:, None]
    assert np.array_equal(dp.cap_frames(frames, 64, 'first')[:, 0], np.arange(64))
    uni = dp.cap_frames(frames, 64, 'uniform')[:, 0]
    assert len(uni) == 64 and uni[0] == 0 and uni[-1] == 99 and np.all(np.diff(uni) > 0)
    assert dp.cap_frames(frames[:10], 64) is not None and len(dp.cap_frames(frames[:10], 64)) == 10


def test_collate_video_mean_over_all_frames(store):
    long_vid = max(store.video2frames, key=lambda v: len(store.video2frames[v]))
    frames = store.frames(long_vid)
    assert len(frames) > 64
    batch = dp.collate_video([dp._video_item(frames, 64, 'first'), dp._video_item(frames[:5], 64, 'first')])
    assert batch['frames'].shape == (2, 64, frames.shape[1])
    assert batch['lengths'].tolist() == [64, 5]
    assert batch['mask'][1].tolist() == [1.0] * 5 + [0.0] * 59
    assert torch.all(batch['frames'][1, 5:] == 0)
    assert torch.allclose(batch['mean'][0], torch.from_numpy(frames.mean(0)))    # all frames, not the first 64


def test_frames_follow_frame_number_order(store):
    vid = next(iter(store.video2frames))
    ids = store.video2frames[vid]
    assert [int(f.rsplit('_', 1)[1]) for f in ids] == sorted(int(f.rsplit('_', 1)[1]) for f in ids)
    assert np.array_equal(store.frames(vid)[1], store.bigfile.read_one(ids[1]))


def test_tokenised_once_not_per_item(toy_root, tok, store, monkeypatch):
    calls = []
    real = type(tok).__call__
    monkeypatch.setattr(type(tok), '__call__', lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    table = dp.train_table(*provider_args(toy_root), tok)
    n_calls = len(calls)
    assert n_calls == 3                                   # one batched call per caption stream
    ds = dp.TrainDataset(table, store)
    for i in range(len(ds)):
        ds[i]
    assert len(calls) == n_calls


def test_train_items_pair_by_video_and_k(toy_root, tok, store):
    table = dp.train_table(*provider_args(toy_root), tok)
    assert set(table.tokens) == {'src', 'tr', 'bt'}
    with open(os.path.join(toy_root, 'toy', 'TextData', 'toytrain_google_enc2zh.caption.txt'), encoding='utf-8') as f:
        mt = dict(line.strip().split(' ', 1) for line in f if line.strip())
    i = 7
    vid, _, k = table.cap_ids[i].split('#')
    expected = dp.tokenize(tok, [mt[f'{vid}#enc2zh#{k}']])[0]
    assert np.array_equal(table.tokens['tr'][i], expected)


@pytest.mark.parametrize('model', ['nrccr', 'mlcmr'])
def test_train_item_holds_the_frames_of_its_captions_video(toy_root, tok, store, model):
    """Item i: the frames (first 64, mean over all) of the video its caption id names, that video's index,
    and row i of every caption stream."""
    from basic.captions import parse_cap_id
    table = dp.train_table(*provider_args(toy_root, model=model), tok)
    ds = dp.TrainDataset(table, store, augment=model == 'mlcmr')
    assert len(set(table.video_ids)) > 1 and any(len(store.video2frames[v]) > dp.VIDEO_MAX_LEN
                                                 for v in table.video_ids)
    for i in range(len(ds)):
        item = ds[i]
        video = parse_cap_id(table.cap_ids[i])[0]
        frames = store.bigfile.read(store.video2frames[video])
        capped, mean = item['video']
        assert np.array_equal(capped, frames[:dp.VIDEO_MAX_LEN]) and np.allclose(mean, frames.mean(axis=0)), i
        assert table.videos[item['video_index']] == video, i
        for role, tokens in table.tokens.items():
            assert np.array_equal(item['text'][role], tokens[i]), (i, role)


def test_mlcmr_augmentation_is_deterministic_and_varies_by_epoch(toy_root, tok, store):
    table = dp.train_table(*provider_args(toy_root, model='mlcmr'), tok)
    ds = dp.TrainDataset(table, store, augment=True, mask_id=103, seed=1)
    a, b = ds[3], ds[3]
    assert np.array_equal(a['text']['en_masked'], b['text']['en_masked'])
    assert np.array_equal(a['video_aug'][0], b['video_aug'][0])
    differs = []
    for epoch in range(1, 6):
        ds.set_epoch(epoch)
        differs.append(not np.array_equal(ds[3]['video_aug'][0], a['video_aug'][0]))
    assert any(differs)


def test_loader_workers_give_identical_batches(toy_root, tok, store):
    table = dp.train_table(*provider_args(toy_root, model='mlcmr'), tok)
    ds = dp.TrainDataset(table, store, augment=True, mask_id=103)
    batches = []
    for workers in (0, 2):
        loader = dp.make_loader(ds, 8, shuffle=True, workers=workers, seed=3)
        batches.append(next(iter(loader)))
    assert torch.equal(batches[0]['index'], batches[1]['index'])
    assert torch.equal(batches[0]['text']['zh_masked']['ids'], batches[1]['text']['zh_masked']['ids'])
    assert torch.equal(batches[0]['video_aug']['frames'], batches[1]['video_aug']['frames'])


def test_collate_text_padding_and_same_video(toy_root, tok, store):
    table = dp.train_table(*provider_args(toy_root), tok)
    ds = dp.TrainDataset(table, store)
    batch = dp.collate([ds[i] for i in range(6)])
    src = batch['text']['src']
    assert src['ids'].dtype == torch.long and src['ids'].shape[1] == src['lengths'].max()
    assert torch.equal(src['mask'].sum(1).long(), src['lengths'])
    assert torch.all(src['ids'][src['mask'] == 0] == 0)
    vids = [table.video_ids[i] for i in range(6)]
    expected = torch.tensor([[vi == vj and i != j for j, vj in enumerate(vids)] for i, vi in enumerate(vids)])
    assert torch.equal(batch['same_video'], expected)


def test_derived_non_parallel_split(toy_root, tok):
    table = dp.train_table(*provider_args(toy_root, model='mlcmr', train_mode='unparallel'), tok)
    again = dp.train_table(*provider_args(toy_root, model='mlcmr', train_mode='unparallel'), tok)
    assert table.cap_ids == again.cap_ids                        # deterministic
    en_videos = {v for c, v in zip(table.cap_ids, table.video_ids) if '#enc#' in c}
    zh_videos = {v for c, v in zip(table.cap_ids, table.video_ids) if '#zh#' in c}
    assert en_videos and zh_videos and not en_videos & zh_videos           # different videos per language
    assert abs(len(en_videos) - len(zh_videos)) <= 1


def test_missing_partner_skips_or_fails_under_strict(toy_root, tok, tmp_path, caplog):
    root = tmp_path / 'VS'
    shutil.copytree(os.path.join(toy_root, 'toy'), root / 'toy')
    path = root / 'toy' / 'TextData' / 'toytrain_google_enc2zh2enc.caption.txt'
    lines = path.read_text(encoding='utf-8').splitlines()
    path.write_text('\n'.join(lines[2:]) + '\n', encoding='utf-8')          # two back-translations missing
    full = dp.train_table(*provider_args(toy_root), tok)
    table = dp.train_table(*provider_args(str(root)), tok)
    assert len(table) == len(full) - 2
    assert 'missing' in caplog.text.lower() or 'skip' in caplog.text.lower()
    with pytest.raises(DataError, match='toytrain_google_enc2zh2enc'):
        dp.train_table(*provider_args(str(root), strict=True), tok)


def test_video_without_frames_is_listed(toy_root, tok, store):
    table = dp.train_table(*provider_args(toy_root), tok)
    table.video_ids[0] = 'ghost_video_1'
    with pytest.raises(DataError, match='ghost_video_1') as e:
        dp.TrainDataset(table, store)
    assert '\n' not in str(e.value)


def test_real_sample_captions_tokenise(tok, tmp_path):
    """The real VATEX samples (CRLF, no final newline, files in different orders) load as one table."""
    from conftest import SHARED_DATA
    if not (SHARED_DATA / 'vatex_sample').is_dir():
        pytest.skip(f'real caption samples not found at {SHARED_DATA} (they live beside the repository)')
    text_dir = tmp_path / 'vatex' / 'TextData'
    text_dir.mkdir(parents=True)
    for name in ('vatextest_google_zhc2en.caption.txt', 'vatextest_zh.caption.txt'):
        shutil.copy(SHARED_DATA / 'vatex_sample' / name, text_dir / name)
    table = dp.eval_table(*provider_args(str(tmp_path), collection='vatex'), 'test', tok)
    assert table.files['primary'].endswith('vatextest_google_zhc2en.caption.txt')   # zhc2en naming accepted
    assert len(table) == 410 and len(table.videos) == 41
    assert all(len(t) >= 2 for t in table.tokens['second'])
