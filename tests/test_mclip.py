"""Search and evaluation with no training (multilingual CLIP), and the third model, mclip, that fine-tunes it (issue
#14): towers equal their own libraries, frames equal CLIP's image features, zero-shot scores equal a hand
computation, an aligned tiny text model finds the colour, the untrained model scores as zero-shot, mclip trains
through the scripts, resumes exactly, runs under DDP and AMP, and bad input is one line with nothing written."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import loss as losses
import model as models
import search
import tester
import trainer
from basic import data_provider as dp
from basic import runs
from basic.bigfile import BigFile, write_bigfile
from basic.clip_encoder import ClipImageEmbedder, save_tiny_clip
from basic.video2frames import read_video2frames, write_video2frames
from conftest import REPO, leave_group, spawn_ranks, tiny_train_argv
from nets import text_towers as towers
from test_ddp import ddp_worker, free_port, slice_batch
from test_run_reliability import assert_same_run, killed_run, result_metrics, run_argv
from util.searcher import Searcher

st = pytest.importorskip('sentence_transformers', reason='sentence-transformers is optional (requirements-optional.txt)')

CLIP_DIM = 16


# ============ fixtures: a tiny CLIP, a tiny sentence-transformers model, a collection of "CLIP" features ============

pytestmark = pytest.mark.usefixtures('one_torch_thread')  # the killed runs are one-thread subprocesses


@pytest.fixture(scope='module')
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(str(tmp_path_factory.mktemp('tiny_clip')))


def build_tiny_st(folder, bert_dir, out_dim=CLIP_DIM, seed=0):
    """A sentence-transformers folder built with its own classes: Transformer + mean Pooling + Dense."""
    try:
        from sentence_transformers.sentence_transformer.modules import Dense, Pooling, Transformer
    except ImportError:
        from sentence_transformers.models import Dense, Pooling, Transformer
    torch.manual_seed(seed)
    transformer = Transformer(bert_dir, max_seq_length=12)
    hidden = transformer.auto_model.config.hidden_size
    model = st.SentenceTransformer(modules=[transformer, Pooling(hidden, 'mean'),
                                            Dense(hidden, out_dim, activation_function=torch.nn.Tanh())], device='cpu')
    model.save(folder)
    return folder


@pytest.fixture(scope='module')
def tiny_st(toy_root, tiny_clip, tmp_path_factory):
    """The tiny sentence-transformers model, declared aligned to the tiny CLIP (aligned_clip.json)."""
    folder = build_tiny_st(str(tmp_path_factory.mktemp('st') / 'tiny_st'), os.path.join(toy_root, 'tiny_bert'))
    towers.write_alignment(folder, ClipImageEmbedder(tiny_clip).identity)
    return folder


def write_clip_features(toy_root, folder, clip_dir, seed=0):
    """16-d features of every toy frame (a fixed random projection of the toy's, so captions still match their
    videos), recorded as made by `clip_dir` the way util/extract_features.py records it."""
    src = os.path.join(toy_root, 'toy', 'FeatureData', 'toy_feature')
    bf = BigFile(src)
    proj = np.random.default_rng(seed).standard_normal((bf.ndims, CLIP_DIM)).astype(np.float32)
    write_bigfile(folder, bf.names, bf.read(bf.names) @ proj)
    write_video2frames(os.path.join(folder, 'video2frames.txt'), read_video2frames(os.path.join(src, 'video2frames.txt')))
    identity = ClipImageEmbedder(clip_dir).identity
    with open(os.path.join(folder, 'extract_settings.json'), 'w') as f:
        json.dump({'model': clip_dir, 'fps': 1.0, 'max_frames': 0, 'dims': CLIP_DIM, 'clip': identity}, f)
    return folder


@pytest.fixture(scope='module')
def clip_root(toy_root, tiny_clip, tmp_path_factory):
    """A VisualSearch root whose collection 'toy' has the toy captions and 16-d features of the tiny CLIP."""
    root = tmp_path_factory.mktemp('ClipSearch')
    shutil.copytree(os.path.join(toy_root, 'toy', 'TextData'), root / 'toy' / 'TextData')
    write_clip_features(toy_root, str(root / 'toy' / 'FeatureData' / 'tiny_clip'), tiny_clip)
    return str(root)


def clip_feature_dir(clip_root):
    return os.path.join(clip_root, 'toy', 'FeatureData', 'tiny_clip')


def mclip_argv(root, tag, text_model, *extra):
    """trainer.py arguments of a seconds-long mclip run on the clip collection."""
    return tiny_train_argv(root, tag, '--model', 'mclip', '--visual_feature', 'tiny_clip', '--bert_name', text_model,
                           '--learning_rate', '1e-3', *extra)


TEXTS = ['a man is cooking in a kitchen', '一个人在厨房里做饭', 'blue', 'a dog ' * 30, '']


# ============ towers and features equal their own libraries ============

def test_text_embeddings_equal_sentence_transformers_encode(tiny_st):
    tower = towers.SentenceTransformerTower(tiny_st).eval()
    tokens = towers.tower_tokenizer(tiny_st).token_ids(TEXTS)
    assert max(len(t) for t in tokens) == 12                          # truncated to max_seq_length, as ST does
    batch = dp.collate_ids(tokens)
    with torch.no_grad():
        ours = tower(batch['ids'].masked_fill(batch['mask'] == 0, tower.pad_id), batch['mask'].long())
    ref = st.SentenceTransformer(tiny_st, device='cpu').encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # and through the model: embed_texts is the same vector, l2-normalised
    model = models.zero_shot_model(tiny_st, None, CLIP_DIM)
    with torch.no_grad():
        emb = model.embed_texts({'q': batch})['q']
    torch.testing.assert_close(emb, torch.nn.functional.normalize(ref, dim=1), atol=1e-5, rtol=1e-5)


def test_clip_text_tower_equals_get_text_features(tiny_clip):
    from transformers import AutoTokenizer, CLIPModel
    tower = towers.ClipTextTower(tiny_clip).eval()
    tokens = towers.tower_tokenizer(tiny_clip).token_ids(TEXTS)
    batch = dp.collate_ids(tokens)
    with torch.no_grad():
        ours = tower(batch['ids'].masked_fill(batch['mask'] == 0, tower.pad_id), batch['mask'].long())
    enc = AutoTokenizer.from_pretrained(tiny_clip)(TEXTS, padding=True, truncation=True, return_tensors='pt')
    clip = CLIPModel.from_pretrained(tiny_clip).eval()
    with torch.no_grad():
        ref = clip.get_text_features(**enc)
    ref = ref if torch.is_tensor(ref) else ref.pooler_output
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert tower.aligned_to == ClipImageEmbedder(tiny_clip).identity          # a CLIP is its own CLIP


def test_frame_embeddings_equal_get_image_features(tiny_clip):
    from transformers import CLIPModel
    pil = pytest.importorskip('PIL.Image')
    images = [pil.fromarray(np.random.default_rng(i).integers(0, 256, (40, 56, 3), dtype=np.uint8)) for i in range(3)]
    embedder = ClipImageEmbedder(tiny_clip)
    pixels = embedder.preprocess(images)
    clip = CLIPModel.from_pretrained(tiny_clip).eval()
    with torch.no_grad():
        ref = clip.get_image_features(pixel_values=pixels)
    ref = ref if torch.is_tensor(ref) else ref.pooler_output
    assert torch.equal(torch.from_numpy(embedder.embed_pixels(pixels)), ref)


# ============ zero-shot scores ============

def test_zero_shot_scores_equal_a_hand_computation(clip_root, tiny_st):
    fdir = clip_feature_dir(clip_root)
    s = Searcher.zero_shot(tiny_st, feature_dir=fdir, cache=False)
    queries = TEXTS[:3]
    got = s.scores(queries)
    bf = BigFile(fdir)
    v2f = read_video2frames(os.path.join(fdir, 'video2frames.txt'))
    q = st.SentenceTransformer(tiny_st, device='cpu').encode(queries, convert_to_tensor=True).double()
    assert any(len(v) > 64 for v in v2f.values())                      # long videos: 64 spread over the video
    for j, vid in enumerate(s.video_ids):
        frames = torch.from_numpy(bf.read(v2f[vid])).double()
        if len(frames) > 64:
            frames = frames[np.linspace(0, len(frames) - 1, 64).round().astype(int)]
        video = torch.nn.functional.normalize(frames, dim=1).mean(0)
        want = (q @ video) / (q.norm(dim=1) * video.norm())
        torch.testing.assert_close(got[:, j], want, atol=1e-6, rtol=0)


def test_zero_shot_search_finds_the_colour(tmp_path, capsys):
    """The demo: coloured videos, the tiny CLIP, a tiny text model aligned to it by a few optimiser steps
    (util/make_demo_videos.py); with no training the colour's videos come first, in English and Chinese."""
    pytest.importorskip('av', reason='PyAV is optional (requirements-optional.txt): pip install av')
    from util import extract_features
    from util.make_demo_videos import COLOURS, make_demo
    demo = make_demo(str(tmp_path / 'demo'))
    fdir = os.path.join(demo['collection_dir'], 'FeatureData', 'tiny_clip')
    extract_features.main(['--videos', demo['video_dir'], '--out', fdir, '--model', demo['clip_dir'], '--device',
                           'cpu', '--progress', '0'])
    colour_of = {vid: COLOURS[c][0] for vid, _, c in demo['videos']}
    s = Searcher.zero_shot(demo['text_model_dir'], feature_dir=fdir, cache=False)
    per_colour = sum(1 for v in colour_of.values() if v == 'red')
    for en, zh, _ in COLOURS:
        for query in (en, zh, f'all {en}'):
            hits = s.search(query, k=per_colour)[0].hits
            assert [colour_of[h.video_id] for h in hits] == [en] * per_colour, query
    capsys.readouterr()
    out = search.main(['--text_model', demo['text_model_dir'], '--feature_dir', fdir, '--query', '红色', '-k', '1',
                       '--json', '--device', 'cpu'])
    assert colour_of[out[0].hits[0].video_id] == 'red'
    printed = json.loads(capsys.readouterr().out)
    assert printed[0]['query'] == '红色' and printed[0]['hits'][0]['video_id'] == out[0].hits[0].video_id
    assert os.path.isdir(os.path.join(fdir, 'search_cache'))          # cached beside the features by default


def test_gallery_cache_is_keyed_by_the_text_model(clip_root, tiny_st, tmp_path, toy_root):
    fdir = clip_feature_dir(clip_root)
    logs = []
    Searcher.zero_shot(tiny_st, feature_dir=fdir, cache_dir=str(tmp_path), log=logs.append)
    Searcher.zero_shot(tiny_st, feature_dir=fdir, cache_dir=str(tmp_path), log=logs.append)
    assert 'from the cache' in logs[-1]
    other = build_tiny_st(str(tmp_path / 'other_st'), os.path.join(toy_root, 'tiny_bert'), seed=1)
    Searcher.zero_shot(other, feature_dir=fdir, cache_dir=str(tmp_path), log=logs.append)
    assert 'encoding' in logs[-2] and len(os.listdir(tmp_path)) == 3           # two caches and the other model


# ============ the untrained model is zero-shot; the tester's zero-shot row ============

def test_untrained_mclip_scores_as_zero_shot(clip_root, tiny_st, tmp_path):
    run = trainer.main(mclip_argv(clip_root, 'untrained', tiny_st, '--num_epochs', '0'))
    zero = tester.main(['--rootpath', clip_root, '--collection', 'toy', '--visual_feature', 'tiny_clip',
                        '--text_model', tiny_st, '--device', 'cpu', '--workers', '0', '--eval_batch_size', '8'])
    assert zero['results_dir'].endswith(os.path.join('results', 'zero_shot', zero['results_dir'].split(os.sep)[-2],
                                                     'tiny_clip_test'))
    assert set(zero['metrics']) == {'w=1.0', 'w=0.8', 'w=0.5', 'w=0.2', 'w=0.0'}     # the same sweep
    assert result_metrics(run['test']) == zero['metrics']
    for name in ('sims_primary.npy', 'sims_second.npy', 'sims_w=0.2.npy', 'caption_ids.txt', 'video_ids.txt'):
        a, b = os.path.join(run['test']['results_dir'], name), os.path.join(zero['results_dir'], name)
        with open(a, 'rb') as fa, open(b, 'rb') as fb:
            assert fa.read() == fb.read(), name
    # the search engine gives the tester's matrix too
    s = Searcher.zero_shot(tiny_st, clip_root, 'toy', 'tiny_clip', split='test', frame_sampling='first', cache=False,
                           batch_size=8)
    from test_search import _split_texts
    _, _, chinese = _split_texts(clip_root, 'mclip')
    sims = torch.from_numpy(np.load(os.path.join(zero['results_dir'], 'sims_second.npy')))
    torch.testing.assert_close(s.scores(chinese).float(), sims, atol=1e-6, rtol=0)


# ============ mclip trains through the scripts ============

def _script(*argv, timeout=900):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS='1')
    proc = subprocess.run([str(REPO / argv[0]), *argv[1:]], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_do_all_toy_trains_and_tests_mclip(toy_root):
    """On the toy's own (non-CLIP) features: a learned video projection, the tiny BERT + a projection."""
    out = _script('do_all_toy.sh', toy_root, 'cpu', '--model', 'mclip', '--num_epochs', '2', '--workers', '0',
                  '--batch_size', '16', '--eval_batch_size', '8')
    run_dir = [line.split('run dir: ')[1].strip() for line in out.splitlines() if 'run dir: ' in line][0]
    assert f'{os.sep}mclip{os.sep}' in run_dir and 'mclip_toy_feature_google_enc2zh_mean_cfg' in run_dir
    saved = torch.load(os.path.join(run_dir, 'model_best.pth.tar'), weights_only=True)
    assert saved['model_cfg']['video_projection'] is True and saved['model_cfg']['tower_format'] == 'encoder'
    assert saved['data_cfg']['model'] == 'nrccr'                    # it reads NRCCR's caption files
    assert 'w=0.2' in json.load(open(os.path.join(toy_root, 'toy', 'results', *run_dir.split(os.sep)[-2:],
                                                   'model_best_test', 'metrics.json')))


def test_do_all_mclip_and_do_test_mclip(clip_root, tiny_st):
    out = _script('do_all_mclip.sh', clip_root, 'toy', 'tiny_clip', 'cpu', '--bert_name', tiny_st, '--num_epochs',
                  '1', '--workers', '0', '--batch_size', '16', '--eval_batch_size', '8', '--c2kd_w', '1',
                  '--temporal', 'transformer')
    run_dir = [line.split('run dir: ')[1].strip() for line in out.splitlines() if 'run dir: ' in line][0]
    saved = torch.load(os.path.join(run_dir, 'model_best.pth.tar'), weights_only=True)
    assert saved['model_cfg']['video_projection'] is False          # the tower's CLIP: raw features
    record = json.loads(open(os.path.join(run_dir, 'metrics.jsonl')).readline())
    assert record['train/c2kd'] >= 0 and 'train/temperature' in record
    out = _script('do_test_mclip.sh', clip_root, run_dir, 'cpu', '--eval_batch_size', '8', '--workers', '0')
    assert 'results written to' in out
    # a fine-tuned checkpoint searches like any other
    hits = Searcher.from_checkpoint(run_dir, clip_root, cache=False).search('a man is cooking', k=3)[0].hits
    assert len(hits) == 3 and hits[0].score >= hits[1].score


# ============ exact resume, DDP, AMP ============

RESUME_EXTRA = ('--temporal', 'transformer', '--c2kd_w', '0.5', '--bt_w', '0.5', '--feat_w', '0.1',
                '--video_projection', '1')


def test_mclip_resumes_exactly_after_a_kill(clip_root, tiny_st, tmp_path):
    extra = ('--model', 'mclip', '--visual_feature', 'tiny_clip', '--bert_name', tiny_st, *RESUME_EXTRA)
    reference = trainer.main(run_argv(clip_root, 'mclip_ref', *extra))
    killed_run(clip_root, 'mclip_kill', 'checkpoint_last.pth.tar', 2, tmp_path, *extra)
    resumed = trainer.main(run_argv(clip_root, 'mclip_kill', *extra))
    assert_same_run(reference['run_dir'], os.path.join(os.path.dirname(reference['run_dir']), 'mclip_kill'))
    assert result_metrics(resumed['test']) == result_metrics(reference['test'])


def test_mclip_two_process_epoch(clip_root, tiny_st, tmp_path):
    argv = mclip_argv(clip_root, 'ddp_mclip', tiny_st, '--num_epochs', '1', '--skip_test', '1', '--batch_size', '8',
                      '--temporal', 'transformer', '--c2kd_w', '0.5')
    spawn_ranks(ddp_worker, (2, free_port(), argv, str(tmp_path)))
    r0, r1 = (json.load(open(tmp_path / f'rank{r}.json')) for r in (0, 1))
    assert len(r0['checks']) == len(r1['checks']) == 5              # 72 captions, 36 per rank, batches of 8
    assert all(r0['checks']) and all(r1['checks']) and r1['writes'] == []


def _mclip_batch(n=8, frames=5, dim=CLIP_DIM, vocab=200, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, frames + 1, (n,), generator=g)
    mask = (torch.arange(frames)[None] < lengths[:, None]).float()
    video = {'frames': torch.randn(n, frames, dim, generator=g) * mask[..., None], 'mask': mask, 'lengths': lengths}
    text = {}
    for role in ('src', 'tr', 'bt'):
        ids = torch.randint(104, vocab, (n, 7), generator=g)
        text[role] = {'ids': ids, 'mask': torch.ones(n, 7), 'lengths': torch.full((n,), 7)}
    video_index = torch.arange(n) // 2
    same = (video_index[:, None] == video_index[None]) & ~torch.eye(n, dtype=torch.bool)
    return {'index': torch.arange(n), 'video': video, 'text': text, 'video_index': video_index, 'same_video': same}


def _gradient_model(tiny_st):
    cfg = models.model_config('mclip', bert_name=tiny_st, visual_feat_dim=CLIP_DIM, video_projection=True,
                              temporal='transformer', c2kd_w=0.5, bt_w=0.5, feat_w=0.1, dedup_negatives=True)
    torch.manual_seed(0)
    return models.build_model(cfg).eval()


def gradient_worker(rank, world, port, tiny_st, out_path):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    import torch.distributed as tdist
    from basic import distributed as dist
    tdist.init_process_group('gloo', rank=rank, world_size=world)
    model = _gradient_model(tiny_st)
    half = torch.arange(rank * 4, rank * 4 + 4)
    model.set_distributed(dist.all_gather_with_grad, dist.all_reduce_mean_, world)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    loss, logs = model.training_loss(ddp(slice_batch(_mclip_batch(), half)))
    loss.backward()
    if rank == 0:
        torch.save({'grads': [p.grad for p in model.main_parameters()], 'loss': float(logs['loss'])}, out_path)
    del ddp
    leave_group()


def test_mclip_global_batch_gradient_equals_single_process(tiny_st, tmp_path):
    """Embeddings gathered with gradient, the loss of the global batch times the world size, and the temperature's
    gradient shared out over the ranks: DDP's averaged gradient is the single-process one, temperature included."""
    out = tmp_path / 'grads.pt'
    spawn_ranks(gradient_worker, (2, free_port(), tiny_st, str(out)))
    model = _gradient_model(tiny_st)
    loss, logs = model.training_loss(model(_mclip_batch()))
    loss.backward()
    ddp = torch.load(out, weights_only=True)
    assert ddp['loss'] == pytest.approx(float(logs['loss']), rel=1e-5)
    params = model.main_parameters()
    assert any(p is model.logit_scale for p in params) and float(model.logit_scale.grad) != 0
    for p, g in zip(params, ddp['grads']):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6)


def test_mclip_trains_in_bf16(clip_root, tiny_st):
    from basic import precision
    if not precision.bf16_support(torch.device('cpu'))[0]:
        pytest.skip('this CPU has no native bf16')
    run = trainer.main(mclip_argv(clip_root, 'bf16', tiny_st, '--num_epochs', '1', '--amp', 'bf16', '--skip_test',
                                  '1', '--temporal', 'transformer'))
    record = json.loads(open(os.path.join(run['run_dir'], 'metrics.jsonl')).readline())
    assert np.isfinite(record['train/loss']) and json.load(open(os.path.join(run['run_dir'], 'args.json')))[
        'amp_resolved'] == 'bf16'


# ============ the model's parts and losses ============

def test_temporal_transformer_starts_as_the_mean(tiny_st):
    batch = _mclip_batch()
    mean = models.build_model(models.model_config('mclip', bert_name=tiny_st, visual_feat_dim=CLIP_DIM,
                                                  video_projection=False, joint_dim=CLIP_DIM))
    torch.manual_seed(3)
    tf = models.build_model(models.model_config('mclip', bert_name=tiny_st, visual_feat_dim=CLIP_DIM,
                                                video_projection=False, joint_dim=CLIP_DIM, temporal='transformer'))
    with torch.no_grad():
        assert torch.equal(tf.embed_videos(batch['video']), mean.embed_videos(batch['video']))


def test_clip_info_nce_and_c2kd_by_hand():
    g = torch.Generator().manual_seed(0)
    t, s, v = (torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=1) for _ in range(3))
    scale = torch.tensor(7.0)
    z = scale * t @ v.T
    want = 0.5 * sum(-z[i].log_softmax(0)[i] - z[:, i].log_softmax(0)[i] for i in range(5)) / 5
    torch.testing.assert_close(losses.clip_info_nce(t, v, scale), want)
    same = torch.zeros(5, 5, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True
    zm = z.clone()
    zm[0, 1] = zm[1, 0] = float('-inf')
    want = 0.5 * sum(-zm[i].log_softmax(0)[i] - zm[:, i].log_softmax(0)[i] for i in range(5)) / 5
    torch.testing.assert_close(losses.clip_info_nce(t, v, scale, same), want)
    teacher = (scale * t @ v.T).softmax(1)
    student = (scale * s @ v.T).log_softmax(1)
    want = -sum((teacher[i] * student[i]).sum() for i in range(5)) / 5
    torch.testing.assert_close(losses.c2kd_loss(s, t, v, scale), want)
    s.requires_grad_(True)
    t.requires_grad_(True)
    losses.c2kd_loss(s, t, v, scale).backward()
    assert t.grad is None and s.grad is not None                   # the teacher is detached


# ============ the plug-in: other models' run folders do not move ============

def test_other_models_run_folders_are_unchanged():
    """The run-folder hashes of NRCCR and MLCMR before mclip existed (main at the layout commit)."""
    assert runs.run_dir(trainer.parse_args(['--rootpath', '/r'])) == \
        '/r/vatex/MM_2022/vatex/nrccr_i3d_kinetics_google_enc2zh_weak_cfg8c447cda/runs_0'
    assert runs.run_dir(trainer.parse_args(['--rootpath', '/r', '--model', 'mlcmr'])) == \
        '/r/vatex/mlcmr/vatex/mlcmr_i3d_kinetics_parallel_translate_zh_cfgcbc91261/runs_0'
    args = trainer.parse_args(['--rootpath', '/r', '--model', 'mlcmr'])
    assert not hasattr(args, 'c2kd_w') and not hasattr(args, 'temporal')


def test_a_flag_of_another_model_is_refused():
    with pytest.raises(SystemExit, match='--c2kd_w is a flag of --model mclip'):
        trainer.parse_args(['--model', 'nrccr', '--c2kd_w', '1'])


# ============ bad input: one line, nothing written ============

def _one_line_error(argv, main=search.main):
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value)
    assert message.startswith('error: ') and '\n' not in message, message
    return message


def test_missing_sentence_transformers_is_one_line(clip_root, tiny_st, monkeypatch):
    fdir = clip_feature_dir(clip_root)
    monkeypatch.setitem(sys.modules, 'sentence_transformers', None)
    msg = _one_line_error(['--text_model', tiny_st, '--feature_dir', fdir, '--query', 'x', '--cache_dir',
                           os.path.join(fdir, 'never')])
    assert 'pip install sentence-transformers' in msg and not os.path.exists(os.path.join(fdir, 'never'))
    argv = mclip_argv(clip_root, 'no_st', tiny_st, '--num_epochs', '1')
    assert 'pip install sentence-transformers' in _one_line_error(argv, main=trainer.main)
    assert not os.path.exists(runs.run_dir(trainer.parse_args(argv)))


def test_features_of_another_size_are_one_line(toy_root, tiny_st):
    fdir = os.path.join(toy_root, 'toy', 'FeatureData', 'toy_feature')        # 32-d, not the tiny CLIP's 16
    msg = _one_line_error(['--text_model', tiny_st, '--feature_dir', fdir, '--query', 'x'])
    assert '32-d' in msg and '16 dims' in msg and 'extract_features.py --model' in msg
    assert not os.path.exists(os.path.join(fdir, 'search_cache'))


def test_features_of_another_clip_are_one_line(toy_root, tiny_st, tmp_path):
    other = save_tiny_clip(str(tmp_path / 'other_clip'), seed=1)
    fdir = write_clip_features(toy_root, str(tmp_path / 'toy' / 'FeatureData' / 'other'), other)
    msg = _one_line_error(['--text_model', tiny_st, '--feature_dir', fdir, '--query', 'x'])
    assert msg.startswith(f'error: {fdir}: features of {other}') and 'different weights' in msg
    assert 'tiny_clip' in msg and 'util/extract_features.py --model' in msg
    assert not os.path.exists(os.path.join(fdir, 'search_cache'))
    out = tmp_path / 'results'
    again = _one_line_error(['--rootpath', str(tmp_path), '--collection', 'toy', '--visual_feature', 'other',
                             '--text_model', tiny_st, '--results_dir', str(out), '--device', 'cpu'], main=tester.main)
    assert again == msg and not out.exists()


def test_a_folder_of_neither_format_is_one_line(clip_root, tmp_path):
    folder = tmp_path / 'not_a_model'
    folder.mkdir()
    (folder / 'weights.bin').write_bytes(b'x')
    msg = _one_line_error(['--text_model', str(folder), '--feature_dir', clip_feature_dir(clip_root), '--query', 'x'])
    assert 'neither a sentence-transformers folder' in msg


def test_an_unaligned_encoder_cannot_search_with_no_training(clip_root, toy_root):
    msg = _one_line_error(['--text_model', os.path.join(toy_root, 'tiny_bert'), '--feature_dir',
                           clip_feature_dir(clip_root), '--query', 'x'])
    assert 'aligned to no CLIP' in msg and '--model mclip' in msg


def test_zero_shot_evaluation_on_an_image_collection(tmp_path, tiny_st, tiny_clip):
    """Image collections with CLIP features: the same protocol (the toy image collection, 16-d 'CLIP' features)."""
    from util.make_toy_data import make_toy_image_collection
    root = str(tmp_path / 'img')
    make_toy_image_collection(root, 'toyimg', n_train=8, n_val=4, n_test=6, captions_per_image=2, dim=CLIP_DIM,
                              bert_hidden=32, bert_layers=2)
    fdir = os.path.join(root, 'toyimg', 'FeatureData', 'toy_clip')
    with open(os.path.join(fdir, 'extract_info.json'), 'w') as f:
        json.dump({'model': tiny_clip, 'dim': CLIP_DIM, 'clip': ClipImageEmbedder(tiny_clip).identity}, f)
    out = tester.main(['--rootpath', root, '--collection', 'toyimg', '--text_model', tiny_st, '--device', 'cpu',
                       '--workers', '0'])
    assert set(out['metrics']) == {'w=1.0', 'w=0.8', 'w=0.5', 'w=0.2', 'w=0.0'}
    assert os.path.isfile(os.path.join(out['results_dir'], 'sims_primary.npy'))


def test_benchmark_times_the_mclip_training_step(tmp_path):
    from util import benchmark
    report = benchmark.main(['--quick', '--device', 'cpu', '--only', 'train', '--train_models', 'nrccr,mclip',
                             '--amps', 'off', '--out', str(tmp_path / 'b.json')])
    rows = {r['model']: r for r in report['train']}
    assert list(rows) == ['nrccr', 'mclip']
    assert rows['mclip']['samples_per_s'] > 0 and 0 < rows['mclip']['mfu'] < 1 and rows['mclip']['flops_per_sample'] > 0


def test_zero_shot_search_benchmark_smoke():
    from util.bench import search as bench_search
    rows = bench_search.run_zero_shot(quick=True, indexes=('exact',), log=lambda *_: None)
    assert [r[0] for r in rows] == ['zero_shot_query_tokenise', 'zero_shot_query_text_encoder',
                                    'zero_shot_search_exact_1000', 'zero_shot_query_exact_1000',
                                    'zero_shot_search_exact_100000', 'zero_shot_query_exact_100000']
    assert all(r[1] > 0 for r in rows) and 'dim 16' in rows[-1][3]
