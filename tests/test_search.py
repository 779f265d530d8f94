"""Search: the tester's exact similarities and rankings, the gallery cache, FAISS, the CLI, and end to end from
generated .mp4 files to a query whose top-1 video is the one it describes."""
import json
import os

import numpy as np
import pytest
import torch

import evaluation
import search
import tester
import trainer
from basic import checkpoint as ckpt
from basic.captions import match_captions, read_captions
from conftest import tiny_train_argv
from util.searcher import LowPrecisionGallery, Searcher, topk_stable, unit64


# ============ the tester's numbers ============

@pytest.fixture(scope='module', params=['nrccr', 'mlcmr'])
def tested_run(request, toy_root, tmp_path_factory):
    """A one-epoch run of each model and the tester's results for it."""
    model = request.param
    extra = ['--model', model, '--num_epochs', '1', '--skip_test', '1', '--cv_name', 'search_test']
    run = trainer.main(tiny_train_argv(toy_root, f'search_{model}', *extra))
    results = str(tmp_path_factory.mktemp(f'results_{model}'))
    tester.main(['--rootpath', toy_root, '--logger_name', run['run_dir'], '--results_dir', results,
                 '--workers', '0', '--device', 'cpu', '--save_embeddings', '1'])
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
    assert torch.equal(s.scores(chinese).float(), torch.from_numpy(np.load(os.path.join(results, 'sims_second.npy'))))
    assert torch.equal(s.scores(english, clean='en').float(),
                       torch.from_numpy(np.load(os.path.join(results, 'sims_primary.npy'))))
    sweep = s.model.fusion_sweep(target_language='zh', train_mode='parallel', label_situation='translate')
    assert len(sweep) == (5 if model == 'nrccr' else 1)
    for label, w in sweep:
        fused = np.load(os.path.join(results, f'sims_{label}.npy'))
        assert torch.equal(s.scores(chinese, second=english, weight=w).float(), torch.from_numpy(fused)), label
    # the default weight is NRCCR's validation weight (0.2) / MLCMR's only one
    assert s.weight == (0.2 if model == 'nrccr' else sweep[0][1])


def _saved(results, name):
    return torch.from_numpy(np.load(os.path.join(results, name)))


def test_tester_saves_the_embeddings_it_ranked(tested_run, toy_root, tmp_path):
    model, run_dir, results = tested_run
    videos, primary, second = (_saved(results, n) for n in ('video_emb.npy', 'caption_emb_primary.npy',
                                                            'caption_emb_second.npy'))
    with open(os.path.join(results, 'caption_ids.txt')) as f:
        n_captions = len(f.read().split())
    with open(os.path.join(results, 'video_ids.txt')) as f:
        n_videos = len(f.read().split())
    assert videos.dtype == primary.dtype == second.dtype == torch.float32
    assert videos.shape[0] == n_videos and primary.shape[0] == second.shape[0] == n_captions
    # the float64 matrices the metrics ranked, rebuilt from the files, are the saved ones
    for role, emb in (('primary', primary), ('second', second)):
        assert torch.equal(evaluation.similarity(emb, videos).float(), _saved(results, f'sims_{role}.npy'))
    # search encodes the same embeddings
    s = Searcher.from_checkpoint(run_dir, toy_root, split='test', cache=False)
    _, english, chinese = _split_texts(toy_root, model)
    assert torch.equal(s.video_emb, videos)
    assert torch.equal(s.encode(chinese), second) and torch.equal(s.encode(english, clean='en'), primary)
    # streamed metrics: the l2-normalised rows the metrics used
    out = str(tmp_path / 'streamed')
    tester.main(['--rootpath', toy_root, '--logger_name', run_dir, '--results_dir', out, '--workers', '0',
                 '--device', 'cpu', '--save_sims', '0', '--save_embeddings', '1'])
    assert not os.path.exists(os.path.join(out, 'sims_primary.npy'))
    assert torch.equal(_saved(out, 'video_emb.npy'), evaluation.l2_normalize(videos))
    assert torch.equal(_saved(out, 'caption_emb_second.npy'), evaluation.l2_normalize(second))


@pytest.mark.parametrize('scoring', ['dense', 'two-stage'])
def test_search_ranks_as_the_testers_float64_matrices(tested_run, toy_root, scoring):
    """Both exact paths return the ranking of the float64 matrices the tester's metrics ranked (rebuilt from
    its saved embeddings with its arithmetic), for the query alone and fused with its English text."""
    model, run_dir, results = tested_run
    videos, primary, second = (_saved(results, n) for n in ('video_emb.npy', 'caption_emb_primary.npy',
                                                            'caption_emb_second.npy'))
    s = Searcher.from_checkpoint(run_dir, toy_root, split='test', cache=False, scoring=scoring)
    assert (s.low is not None) == (scoring == 'two-stage')
    _, english, chinese = _split_texts(toy_root, model)
    n = len(s.video_ids)
    sims_p, sims_s = evaluation.similarity(primary, videos), evaluation.similarity(second, videos)
    sweep = s.model.fusion_sweep(target_language='zh', train_mode='parallel', label_situation='translate')
    _, w = sweep[min(3, len(sweep) - 1)]             # NRCCR w=0.2, MLCMR its only weight
    fused = evaluation.fuse(sims_p, sims_s, w) if model == 'nrccr' else w * sims_p + (1 - w) * sims_s
    for matrix, kwargs in ((sims_s, {}), (fused, dict(second=english, weight=w))):
        for row, result in zip(matrix.numpy(), s.search(chinese, k=n, **kwargs)):
            assert [h.video_id for h in result.hits] == [s.video_ids[j] for j in np.argsort(-row, kind='stable')]
            np.testing.assert_allclose([h.score for h in result.hits], np.sort(row)[::-1], rtol=0, atol=1e-12)
    if scoring == 'two-stage':
        assert all(c >= n for c in s.last_candidates)          # k = every video: all are candidates


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


def test_retrained_checkpoint_of_the_same_size_is_encoded_again(tested_run, toy_root, tmp_path):
    """Retraining rewrites model_best.pth.tar with the same configuration, usually the same byte size: the
    cache key holds its modification time, so the new weights' gallery is encoded, never the stale one."""
    _, run_dir, _ = tested_run
    path = str(tmp_path / 'run' / 'model_best.pth.tar')
    os.makedirs(os.path.dirname(path))
    saved = torch.load(os.path.join(run_dir, 'model_best.pth.tar'), weights_only=True)
    ckpt.save_checkpoint(saved, path)
    cache = str(tmp_path / 'cache')
    first = Searcher.from_checkpoint(path, toy_root, cache_dir=cache)
    size, mtime = os.path.getsize(path), os.stat(path).st_mtime_ns
    saved['model']['video_mapping.fc1.weight'].neg_()        # "retrained": other weights, same layout
    ckpt.save_checkpoint(saved, path)
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))      # a later save, whatever the clock's resolution
    assert os.path.getsize(path) == size                     # same path, same size: only the time tells
    logs = []
    second = Searcher.from_checkpoint(path, toy_root, cache_dir=cache, log=logs.append)
    assert logs[0].startswith('gallery: encoding') and second.cache_folder != first.cache_folder
    fresh = Searcher.from_checkpoint(path, toy_root, cache=False)
    assert torch.equal(second.video_emb, fresh.video_emb) and not torch.equal(second.video_emb, first.video_emb)


def folder_bytes(folder):
    out = {}
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), 'rb') as f:
            out[name] = f.read()
    return out


def test_unreadable_cache_is_encoded_again_and_a_failed_write_keeps_nothing(tested_run, toy_root, tmp_path,
                                                                           monkeypatch):
    _, run_dir, _ = tested_run
    cache = str(tmp_path / 'cache')
    first = Searcher.from_checkpoint(run_dir, toy_root, cache_dir=cache)
    emb_file = os.path.join(first.cache_folder, 'video_emb.npy')
    with open(emb_file, 'r+b') as f:                         # a torn write: half the file
        f.truncate(os.path.getsize(emb_file) // 2)
    logs = []
    second = Searcher.from_checkpoint(run_dir, toy_root, cache_dir=cache, log=logs.append)
    assert 'unreadable' in logs[0] and logs[1].startswith('gallery: encoding')
    assert second.cache_folder == first.cache_folder and torch.equal(second.video_emb, first.video_emb)
    assert sorted(os.listdir(cache)) == [os.path.basename(first.cache_folder)]     # old folder replaced, no strays
    with open(emb_file, 'r+b') as f:
        f.truncate(10)
    before = folder_bytes(first.cache_folder)

    def full_disk(*a, **k):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(np, 'save', full_disk)
    third = Searcher.from_checkpoint(run_dir, toy_root, cache_dir=cache)
    assert third.cache_folder is None and torch.equal(third.video_emb, first.video_emb)
    assert sorted(os.listdir(cache)) == [os.path.basename(first.cache_folder)]     # no temporary folder left
    assert folder_bytes(first.cache_folder) == before                              # the old folder untouched


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

def test_videos_to_search_results(demo_run, capsys):
    from util.make_demo_videos import COLOURS, COLLECTION
    queries = [c[0] for c in COLOURS] + [c[1] for c in COLOURS]        # 'red', ..., '红色', ...
    capsys.readouterr()
    search.main(['--checkpoint', demo_run['run_dir'], '--rootpath', demo_run['root'], '--collection', COLLECTION,
                 '--json', '-k', '1', '--device', 'cpu', *[a for q in queries for a in ('--query', q)]])
    out = json.loads(capsys.readouterr().out)
    colour_of = {vid: c for vid, _, c in demo_run['videos']}
    top1 = [colour_of[r['hits'][0]['video_id']] for r in out]
    correct = sum(got == i % len(COLOURS) for i, got in enumerate(top1))
    # chance: 1 in 6 colours, i.e. 2 of 12 queries; a working pipeline gets most of them
    assert correct >= 9, (correct, top1)


def test_bench_search_quick_smoke():
    from util.bench import search as bench_search
    rows = bench_search.run(quick=True, indexes=('exact',), log=lambda *_: None)
    names = [r[0] for r in rows]
    assert names == ['index_videos_per_s', 'query_tokenise', 'query_bert', 'query_text_encoder',
                     'search_exact_1000', 'query_exact_1000', 'search_exact_100000', 'query_exact_100000']
    assert all(r[1] > 0 for r in rows)
    notes = dict((r[0], r[3]) for r in rows)
    assert 'dense float64' in notes['search_exact_1000'] and 'two-stage bfloat16' in notes['search_exact_100000']


# ============ the two-stage exact search ============

class _StubModel(torch.nn.Module):
    """Stands in for a checkpoint: Searcher.encode is replaced by a table of query embeddings."""

    def __init__(self, normalize):
        super().__init__()
        self.fusion_normalize = normalize


def _stub_searcher(emb, table, normalize=False, **kw):
    s = Searcher(_StubModel(normalize), None, [f'v{i}' for i in range(len(emb))], emb, **kw)
    s.encode = lambda texts, clean=None: torch.stack([table[t] for t in texts]).float()
    return s


def _brute_force(emb, q, k):
    """Independent slow reference: each exact float64 score on its own, then a stable sort."""
    v = unit64(emb)
    qn = unit64(q[None])[0]
    scores = np.array([float(torch.dot(qn, v[j])) for j in range(len(v))])
    order = np.argsort(-scores, kind='stable')[:k]
    return [f'v{j}' for j in order], scores[order]


def _near_ties(seed=1, n=3000, d=64, band=1000):
    """A gallery whose k-th best score sits in a band of `band` videos, half of them 1e-9 apart (far below
    the bfloat16 resolution of ~4e-3), half spread over +-0.008 (about the pre-filter's error, so low
    precision reorders them), with exact duplicates (exact ties), among random ones."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(d, generator=g, dtype=torch.float64)
    q /= q.norm()
    emb = torch.randn(n, d, generator=g, dtype=torch.float64) * 0.1
    rest = torch.randn(band, d, generator=g, dtype=torch.float64)
    rest -= (rest @ q)[:, None] * q                                        # orthogonal to q
    rest /= rest.norm(dim=1, keepdim=True)
    a = 0.6 + 1e-9 * torch.randperm(band, generator=g).double()
    a[::2] += 0.016 * (torch.rand(len(a[::2]), generator=g, dtype=torch.float64) - 0.5)   # spans the error bound
    rows = torch.randperm(n, generator=g)[:band]
    emb[rows] = a[:, None] * q + (1 - a ** 2).sqrt()[:, None] * rest       # unit, score a
    emb[rows[::7]] *= 3.0                                                  # same direction, other norm
    dup = torch.randperm(n, generator=g)[:40]
    emb[dup] = emb[rows[:40]]                                              # exact duplicates: exact ties
    return emb.float(), q.float()


@pytest.mark.parametrize('prefilter', ['bfloat16', 'float16', 'float32'])
def test_two_stage_equals_brute_force_on_near_ties(prefilter):
    emb, q = _near_ties()
    s = _stub_searcher(emb, {'q': q}, scoring='two-stage', prefilter=prefilter)
    assert s.low.dtype == getattr(torch, prefilter)
    for k in (1, 2, 3, 5, 10, 20, 50, 100, 200, 400):
        ids, scores = _brute_force(emb, q, k)
        hits = s.search('q', k=k)[0].hits
        assert [h.video_id for h in hits] == ids, k
        np.testing.assert_allclose([h.score for h in hits], scores, rtol=0, atol=1e-13)
        assert k <= s.last_candidates[0] < len(emb)


@pytest.mark.parametrize('prefilter', ['bfloat16', 'float16'])
def test_two_stage_needs_its_bound(prefilter):
    """Without the bound (B = 0) the pre-filter drops true top-k videos on this gallery, so the test above
    can fail."""
    emb, q = _near_ties()
    s = _stub_searcher(emb, {'q': q}, scoring='two-stage', prefilter=prefilter)
    scores = s.low.scores
    s.low.scores = lambda x: (scores(x)[0], torch.zeros(len(x), dtype=torch.float64))
    wrong = [k for k in (1, 2, 3, 5, 10, 20, 50, 100, 200, 400)
             if [h.video_id for h in s.search('q', k=k)[0].hits] != _brute_force(emb, q, k)[0]]
    assert wrong


@pytest.mark.parametrize('normalize', [False, True])
def test_two_stage_fusion_equals_dense(normalize):
    """Fused with a second text (MLCMR: weighted sum; NRCCR: min-max over the call, then weighted), the
    two-stage top-k equals the dense float64 one, for several queries in one call."""
    emb, q = _near_ties(seed=1)
    g = torch.Generator().manual_seed(2)
    table = {'q': q, 'e': q + 0.01 * torch.randn(q.shape, generator=g)}
    for i in range(4):
        table[f'r{i}'] = torch.randn(q.shape, generator=g)
    queries, second = ['q', 'r0', 'r1', 'q'], ['e', 'r2', 'q', 'r3']
    dense = _stub_searcher(emb, table, normalize, scoring='dense')
    two = _stub_searcher(emb, table, normalize, scoring='two-stage')
    for k in (1, 10, 100):
        a = dense.search(queries, k=k, second=second, weight=0.3)
        b = two.search(queries, k=k, second=second, weight=0.3)
        for x, y in zip(a, b):
            assert [h.video_id for h in x.hits] == [h.video_id for h in y.hits]
            np.testing.assert_allclose([h.score for h in x.hits], [h.score for h in y.hits], rtol=0, atol=1e-12)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_error_is_within_the_bound(dtype):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2000, 96, generator=g) * torch.rand(2000, 1, generator=g) * 10
    q = unit64(torch.randn(16, 96, generator=g))
    low = LowPrecisionGallery(emb, dtype)
    got, bound = low.scores(q)
    exact = q @ unit64(emb).T
    err = (got.double() - exact).abs().max(dim=1).values
    assert (err <= bound).all()
    assert (err > bound / 100).all()          # the bound is not vacuous
    assert low.probe()
    low.g_acc = low.u_out = low.absolute = 0.0     # a kernel allowed no error: the probe's sum exposes it
    assert dtype == torch.float32 or not low.probe()
