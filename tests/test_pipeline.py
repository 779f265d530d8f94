"""End to end on the tiny toy collection: train, test, interrupt and resume, skip, bad input."""
import json
import os
import shutil

import pytest
import torch

import evaluation
import tester
import trainer
from conftest import interrupt_after_epochs, tiny_train_argv, val_score_of_checkpoint


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def finished_run(toy_root):
    """Two epochs of NRCCR without interruption (the reference for the resume test)."""
    result = trainer.main(tiny_train_argv(toy_root, 'A', '--num_epochs', '2', '--skip_test', '1'))
    return result


def test_training_writes_run_files(finished_run):
    d = finished_run['run_dir']
    for name in ('model_best.pth.tar', 'checkpoint_last.pth.tar', 'args.json', 'env.json', 'train.log',
                 'metrics.jsonl', 'val_metric.txt', 'val_metric_hist.txt'):
        assert os.path.exists(os.path.join(d, name)), name
    assert any(n.startswith('events.out.tfevents') for n in os.listdir(d))
    records = read_jsonl(os.path.join(d, 'metrics.jsonl'))
    assert [r['epoch'] for r in records] == [0, 1]
    saved = torch.load(os.path.join(d, 'checkpoint_last.pth.tar'), weights_only=True)
    assert saved['epoch'] == 2 and saved['args']['model'] == 'nrccr'


def test_learning_rate_schedule(finished_run):
    """docs/training.md, 'Schedule': x0.99 every epoch, x0.5 after a non-improving epoch once the counter exceeds 2."""
    records = read_jsonl(os.path.join(finished_run['run_dir'], 'metrics.jsonl'))
    lr, counter = 1e-4, 0
    for r in records:
        lr *= 0.99
        counter += 1
        if not r['improved'] and counter > 2:
            lr, counter = lr * 0.5, 0
        assert r['lr'] == pytest.approx(lr, rel=1e-12)


def test_reloaded_best_checkpoint_reproduces_its_validation_score(finished_run, toy_root):
    d = finished_run['run_dir']
    records = read_jsonl(os.path.join(d, 'metrics.jsonl'))
    best = max(records, key=lambda r: r['score'])
    score = val_score_of_checkpoint(os.path.join(d, 'model_best.pth.tar'), tiny_train_argv(toy_root, 'A'))
    assert score == pytest.approx(best['score'], abs=1e-9)


def test_interrupt_and_resume_matches_uninterrupted_run(finished_run, toy_root, monkeypatch):
    argv = tiny_train_argv(toy_root, 'B', '--num_epochs', '2', '--skip_test', '1')
    interrupt_after_epochs(monkeypatch, argv)
    run_b = os.path.join(os.path.dirname(finished_run['run_dir']), 'B')
    partial = torch.load(os.path.join(run_b, 'checkpoint_last.pth.tar'), weights_only=True)
    assert partial['epoch'] == 1 and not os.path.exists(os.path.join(run_b, 'val_metric.txt'))

    resumed = trainer.main(argv)                       # the same command continues the run
    assert resumed['run_dir'] == run_b and resumed['epochs'] == 2
    a = torch.load(os.path.join(finished_run['run_dir'], 'checkpoint_last.pth.tar'), weights_only=True)
    b = torch.load(os.path.join(run_b, 'checkpoint_last.pth.tar'), weights_only=True)
    assert b['epoch'] == a['epoch'] == 2
    assert b['lr'] == a['lr'] and b['best_score'] == a['best_score'] and b['global_step'] == a['global_step']
    for key in a['model']:
        assert torch.equal(a['model'][key], b['model'][key]), key
    exp_a = a['optimizers']['main']['state'][0]['exp_avg']
    assert torch.equal(exp_a, b['optimizers']['main']['state'][0]['exp_avg'])
    with open(os.path.join(run_b, 'train.log')) as f:
        assert 'resumed from' in f.read()


def test_finished_run_is_skipped(finished_run, toy_root):
    again = trainer.main(tiny_train_argv(toy_root, 'A', '--num_epochs', '2', '--skip_test', '1'))
    assert again == {'run_dir': finished_run['run_dir'], 'skipped': True}


def test_other_configuration_gets_its_own_directory(finished_run, toy_root):
    args_a = trainer.finalize_args(trainer.get_args_parser().parse_args(tiny_train_argv(toy_root, 'A')))
    args_b = trainer.finalize_args(trainer.get_args_parser().parse_args(
        tiny_train_argv(toy_root, 'A', '--tri_alpha', '0.5')))
    from basic import runs
    assert runs.run_dir(args_a) != runs.run_dir(args_b)


def test_tester_outputs_match_printed_table(finished_run, toy_root, capsys):
    out = tester.main(['--rootpath', toy_root, '--logger_name', finished_run['run_dir'], '--device', 'cpu',
                       '--workers', '0', '--overwrite', '1'])
    printed = capsys.readouterr().out
    d = out['results_dir']
    with open(os.path.join(d, 'metrics.json')) as f:
        metrics = json.load(f)
    assert list(metrics) == ['w=1.0', 'w=0.8', 'w=0.5', 'w=0.2', 'w=0.0']
    for label, m in metrics.items():
        assert evaluation.format_table(m).split('\n')[-1] in printed          # the table row
        sims = torch.from_numpy(__import__('numpy').load(os.path.join(d, f'sims_{label}.npy')))
        with open(os.path.join(d, 'caption_ids.txt')) as f:
            caps = f.read().split()
        with open(os.path.join(d, 'video_ids.txt')) as f:
            vids = f.read().split()
        assert sims.shape == (len(caps), len(vids))
        cap2vid = torch.tensor([vids.index(c.split('#')[0]) for c in caps])
        recomputed = evaluation.compute_metrics(sims.double(), cap2vid)
        for k in ('t2v_r1', 't2v_r10', 'v2t_r5', 'sumr'):
            assert recomputed[k] == pytest.approx(m[k], abs=1e-6)
    assert os.path.exists(os.path.join(d, 'report.txt'))


# ============ bad input: one line naming the file and the fix ============

def test_missing_caption_file(toy_root, tmp_path):
    root = tmp_path / 'VS'
    shutil.copytree(os.path.join(toy_root, 'toy'), root / 'toy')
    os.remove(root / 'toy' / 'TextData' / 'toytrain_google_enc2zh2enc.caption.txt')
    argv = tiny_train_argv(str(root), 'x', '--num_epochs', '1')
    argv[argv.index('--bert_name') + 1] = os.path.join(toy_root, 'tiny_bert')
    with pytest.raises(SystemExit) as e:
        trainer.main(argv)
    assert 'toytrain_google_enc2zh2enc.caption.txt' in str(e.value) and '\n' not in str(e.value)


def test_unknown_bert_folder(toy_root, tmp_path):
    argv = tiny_train_argv(toy_root, 'x', '--num_epochs', '1')
    argv[argv.index('--bert_name') + 1] = str(tmp_path / 'no_such_bert')
    with pytest.raises(SystemExit) as e:
        trainer.main(argv)
    assert 'no_such_bert' in str(e.value) and '\n' not in str(e.value)


def test_feature_dimension_mismatch(finished_run, toy_root, tmp_path):
    from basic.bigfile import BigFile, write_bigfile
    src = BigFile(os.path.join(toy_root, 'toy', 'FeatureData', 'toy_feature'))
    write_bigfile(os.path.join(toy_root, 'toy', 'FeatureData', 'half_dims'), src.names,
                  src.read(src.names)[:, :16])
    with pytest.raises(SystemExit) as e:
        tester.main(['--rootpath', toy_root, '--logger_name', finished_run['run_dir'], '--device', 'cpu',
                     '--visual_feature', 'half_dims', '--results_dir', str(tmp_path / 'r')])
    assert 'half_dims' in str(e.value) and '16' in str(e.value) and '32' in str(e.value)


def test_corrupt_checkpoint(finished_run, tmp_path):
    bad = tmp_path / 'model_best.pth.tar'
    with open(os.path.join(finished_run['run_dir'], 'model_best.pth.tar'), 'rb') as f:
        bad.write_bytes(f.read()[:1000])
    with pytest.raises(SystemExit) as e:
        tester.main(['--checkpoint', str(bad), '--device', 'cpu', '--results_dir', str(tmp_path / 'r')])
    assert str(bad) in str(e.value) and '\n' not in str(e.value)


def test_streamed_gallery_metrics_equal_full_matrix(finished_run, toy_root, tmp_path):
    """--save_sims 0 (the path for galleries too large to hold) reports the same numbers."""
    common = ['--rootpath', toy_root, '--logger_name', finished_run['run_dir'], '--device', 'cpu', '--workers', '0']
    full = tester.main(common + ['--results_dir', str(tmp_path / 'full'), '--save_sims', '1'])['metrics']
    streamed = tester.main(common + ['--results_dir', str(tmp_path / 'stream'), '--save_sims', '0'])['metrics']
    assert not list((tmp_path / 'stream').glob('*.npy'))
    for label in full:
        for key in full[label]:
            assert streamed[label][key] == pytest.approx(full[label][key], abs=1e-6), (label, key)


@pytest.mark.parametrize('normalize', [True, False])
def test_fusion_embeddings_rank_like_fused_matrix(normalize):
    g = torch.Generator().manual_seed(0)
    ta, tb, v = (torch.randn(n, 8, generator=g, dtype=torch.float64) for n in (40, 40, 12))
    cap2vid = torch.randint(0, 12, (40,), generator=g)
    sa, sb = ta @ v.T, tb @ v.T
    fused = evaluation.fuse(sa, sb, 0.3) if normalize else 0.3 * sa + 0.7 * sb
    t, vv = evaluation.fusion_embeddings(ta, tb, v, 0.3, normalize)
    assert evaluation.compute_metrics_from_embeddings(t, vv, cap2vid) == \
        pytest.approx(evaluation.compute_metrics(fused, cap2vid), abs=1e-9)
