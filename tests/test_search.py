"""Search: the tester's exact similarities and rankings, the gallery cache, FAISS, the CLI, and end to end from
generated .mp4 files to a query whose top-1 video is the one it describes."""
import json
import logging
import os

import numpy as np
import pytest
import torch

import search
import tester
import trainer
from basic.captions import match_captions, read_captions
from conftest import tiny_train_argv
from util.searcher import Searcher, topk_stable


# ============ the tester's numbers ============

@pytest.fixture(scope='module', params=['nrccr', 'mlcmr'])
def tested_run(request, toy_root, tmp_path_factory):
    """A one-epoch run of each model and the tester's results for it."""
    model = request.param
    extra = ['--model', model, '--num_epochs', '1', '--skip_test', '1', '--cv_name', 'search_test']
    run = trainer.main(tiny_train_argv(toy_root, f'search_{model}', *extra))
    results = str(tmp_path_factory.mktemp(f'results_{model}'))
    tester.main(['--rootpath', toy_root, '--logger_name', run['run_dir'], '--results_dir', results,
                 '--workers', '0', '--device', 'cpu'])
    return model, run['run_dir'], results


def _split_texts(root, model):
    """(English MT texts, Chinese texts) of the toy test split, in the tester's caption order."""
    text = os.path.join(root, 'toy', 'TextData')
    primary = read_captions(os.path.join(text, 'toytest_google_zh2enc.caption.txt'))
    second = read_captions(os.path.join(text, 'toytest_zh.caption.txt'))
    keep, rows, _ = match_captions(primary, [second])
    return ([primary.cap_ids[r] for r in keep], [primary.texts[r] for r in keep],
            [second.texts[r] for r in rows[0]])


def test_scores_are_the_testers_matrices(tested_run, toy_root):
    model, run_dir, results = tested_run
    s = Searcher.from_checkpoint(run_dir, toy_root, split='test', cache=False)
    cap_ids, english, chinese = _split_texts(toy_root, model)
    with open(os.path.join(results, 'caption_ids.txt')) as f:
        assert f.read().split() == cap_ids
    with open(os.path.join(results, 'video_ids.txt')) as f:
        assert f.read().split() == s.video_ids
    assert torch.equal(s.scores(chinese), torch.from_numpy(np.load(os.path.join(results, 'sims_second.npy'))))
    assert torch.equal(s.scores(english, clean='en'),
                       torch.from_numpy(np.load(os.path.join(results, 'sims_primary.npy'))))
    sweep = s.model.fusion_sweep(target_language='zh', train_mode='parallel', label_situation='translate')
    assert len(sweep) == (5 if model == 'nrccr' else 1)
    for label, w in sweep:
        fused = np.load(os.path.join(results, f'sims_{label}.npy'))
        assert torch.equal(s.scores(chinese, second=english, weight=w), torch.from_numpy(fused)), label
    # the default weight is NRCCR's validation weight (0.2) / MLCMR's only one
    assert s.weight == (0.2 if model == 'nrccr' else sweep[0][1])


def test_search_cli_returns_the_testers_ranking(tested_run, toy_root, tmp_path, capsys):
    model, run_dir, results = tested_run
    _, english, chinese = _split_texts(toy_root, model)
    label = 'w=0.2' if model == 'nrccr' else 'w_zh=0.55'
    fused = np.load(os.path.join(results, f'sims_{label}.npy'))
    with open(os.path.join(results, 'video_ids.txt')) as f:
        videos = f.read().split()
    queries = tmp_path / 'q.tsv'
    queries.write_text(''.join(f'{zh}\t{en}\n' for zh, en in zip(chinese, english)), encoding='utf-8')
    capsys.readouterr()
    search.main(['--checkpoint', run_dir, '--rootpath', toy_root, '--split', 'test', '--queries_file', str(queries),
                 '-k', str(len(videos)), '--json', '--device', 'cpu', '--cache_dir', str(tmp_path / 'cache')])
    out = json.loads(capsys.readouterr().out)
    assert len(out) == len(chinese)
    for row, result in zip(fused, out):
        expected = [videos[j] for j in np.argsort(-row, kind='stable')]
        assert [h['video_id'] for h in result['hits']] == expected
        assert [h['rank'] for h in result['hits']] == list(range(1, len(videos) + 1))
        np.testing.assert_allclose([h['score'] for h in result['hits']], np.sort(row)[::-1], rtol=1e-6)


def test_gallery_cache_is_reused_until_features_change(tested_run, toy_root, tmp_path):
    _, run_dir, _ = tested_run
    logs = []
    first = Searcher.from_checkpoint(run_dir, toy_root, cache_dir=str(tmp_path), log=logs.append)
    assert logs[-1].startswith('gallery cached in')
    folder = first.cache_folder
    assert sorted(os.listdir(folder)) == ['meta.json', 'video_emb.npy', 'video_ids.txt']
    logs.clear()
    second = Searcher.from_checkpoint(run_dir, toy_root, cache_dir=str(tmp_path), log=logs.append)
    assert logs == [f'gallery: {len(second.video_ids)} videos from the cache {folder}']
    assert torch.equal(first.video_emb, second.video_emb)
    # every video of the feature folder, more than the test split
    assert len(first.video_ids) == 24 + 8 + 10
    feature_bin = os.path.join(toy_root, 'toy', 'FeatureData', 'toy_feature', 'feature.bin')
    st = os.stat(feature_bin)
    os.utime(feature_bin, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        logs.clear()
        third = Searcher.from_checkpoint(run_dir, toy_root, cache_dir=str(tmp_path), log=logs.append)
        assert logs[0].startswith('gallery: encoding') and third.cache_folder != folder
    finally:
        os.utime(feature_bin, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_faiss_flat_index_gives_the_exact_ranking(tested_run, toy_root, tmp_path):
    pytest.importorskip('faiss', reason='faiss-cpu is optional (requirements-optional.txt)')
    _, run_dir, _ = tested_run
    _, english, chinese = _split_texts(toy_root, tested_run[0])
    exact = Searcher.from_checkpoint(run_dir, toy_root, cache_dir=str(tmp_path))
    flat = Searcher.from_checkpoint(run_dir, toy_root, cache_dir=str(tmp_path), index='faiss')
    assert any(n.startswith('faiss_Flat') for n in os.listdir(flat.cache_folder))
    for a, b in zip(exact.search(chinese[:6], k=5), flat.search(chinese[:6], k=5)):
        assert [h.video_id for h in a.hits] == [h.video_id for h in b.hits]
        np.testing.assert_allclose([h.score for h in a.hits], [h.score for h in b.hits], rtol=1e-5, atol=1e-6)
    # with a second text and candidates covering the gallery, the fused ranking equals the exact one per query
    # (MLCMR: always; NRCCR: the min-max ranges are those of the one query's row)
    flat.candidates = len(flat.video_ids)
    for zh, en in zip(chinese[:4], english[:4]):
        a = exact.search([zh], k=5, second=[en])[0]
        b = flat.search([zh], k=5, second=[en])[0]
        assert [h.video_id for h in a.hits] == [h.video_id for h in b.hits]


def test_topk_stable_breaks_ties_by_gallery_order():
    scores = torch.tensor([[0.5, 0.75, 0.5, 0.75, 0.25], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert topk_stable(scores, 3) == [[(1, 0.75), (3, 0.75), (0, 0.5)], [(0, 0.0), (1, 0.0), (2, 0.0)]]
    rows = torch.randn(7, 50).round(decimals=1)                  # many ties
    for row, got in zip(rows, topk_stable(rows, 50)):
        assert [c for c, _ in got] == np.argsort(-row.numpy(), kind='stable').tolist()


def test_wrong_feature_size_is_one_line(tested_run, toy_root, tmp_path):
    _, run_dir, _ = tested_run
    from basic.bigfile import write_bigfile
    write_bigfile(str(tmp_path / 'f'), ['a_0', 'a_1'], np.zeros((2, 5), np.float32))
    with pytest.raises(SystemExit, match=r'features have 5 dims but the checkpoint .* expects 32'):
        search.main(['--checkpoint', run_dir, '--feature_dir', str(tmp_path / 'f'), '--query', 'x', '--device', 'cpu'])


# ============ end to end: .mp4 -> features -> training -> search ============

def test_videos_to_search_results(tmp_path, capsys):
    pytest.importorskip('av', reason='PyAV is optional (requirements-optional.txt): pip install av')
    from util import extract_features
    from util.make_demo_videos import COLOURS, COLLECTION, make_demo
    root = str(tmp_path / 'demo')
    demo = make_demo(root)
    feature_dir = os.path.join(root, COLLECTION, 'FeatureData', 'tiny_clip')
    extract_features.main(['--videos', demo['video_dir'], '--out', feature_dir, '--model', demo['clip_dir'],
                           '--device', 'cpu', '--progress', '0'])
    run = trainer.main(['--model', 'mlcmr', '--rootpath', root, '--collection', COLLECTION,
                        '--visual_feature', 'tiny_clip', '--bert_name', demo['bert_dir'], '--frozen', 'finetune',
                        '--masked_pooling', '1', '--text_mapping_layers', '0-32', '--visual_mapping_layers', '0-32',
                        '--visual_rnn_size', '16', '--visual_kernel_num', '8', '--batch_size', '16',
                        '--num_epochs', '15', '--learning_rate', '1e-3', '--max_violation', '--workers', '0',
                        '--device', 'cpu', '--seed', '0', '--skip_test', '1', '--cv_name', 'demo'])
    queries = [c[0] for c in COLOURS] + [c[1] for c in COLOURS]        # 'red', ..., '红色', ...
    # the trainer's log handlers (stdout) outlive its main() in this process; search logs to stderr, and its
    # progress lines must not land in the JSON on stdout
    root_logger = logging.getLogger()
    for handler in [h for h in root_logger.handlers if getattr(h, '_mlcmr', False)]:
        root_logger.removeHandler(handler)
    capsys.readouterr()
    search.main(['--checkpoint', run['run_dir'], '--rootpath', root, '--collection', COLLECTION, '--json',
                 '-k', '1', '--device', 'cpu', *[a for q in queries for a in ('--query', q)]])
    out = json.loads(capsys.readouterr().out)
    colour_of = {vid: c for vid, _, c in demo['videos']}
    top1 = [colour_of[r['hits'][0]['video_id']] for r in out]
    correct = sum(got == i % len(COLOURS) for i, got in enumerate(top1))
    # chance: 1 in 6 colours, i.e. 2 of 12 queries; a working pipeline gets most of them
    assert correct >= 9, (correct, top1)


def test_bench_search_quick_smoke():
    from util import bench_search
    rows = bench_search.run(quick=True, indexes=('exact',), log=lambda *_: None)
    names = [r[0] for r in rows]
    assert names == ['index_videos_per_s', 'search_exact_1000', 'query_exact_1000', 'search_exact_5000',
                     'query_exact_5000']
    assert all(r[1] > 0 for r in rows)
