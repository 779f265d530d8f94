"""A run loses nothing (issue #11, items 1, 2, 3, 6, 7, 11): kills at several moments, stale temporary
files, history files, the test after training, output errors, input checks, --overwrite, tester flags."""
import errno
import json
import os

import pytest
import torch

import tester
import trainer
from conftest import interrupt_after_epochs, run_killed, tiny_train_argv
from basic import checkpoint as ckpt
from basic import runs

TIMING = ('seconds', 'samples_per_s')


def run_argv(root, tag, *extra):
    return tiny_train_argv(root, tag, '--num_epochs', '2', *extra)


def killed_run(root, tag, target, nth, tmp_path, *extra):
    run_killed('trainer', run_argv(root, tag, *extra), target, nth, tmp_path)


def records(path):
    with open(path) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def run_files(directory):
    return sorted(n for n in os.listdir(directory) if not n.startswith('events.out.tfevents'))


def assert_same_run(ref_dir, run_dir):
    """Same files (no strays), same history, same weights, optimiser state and schedule."""
    assert run_files(run_dir) == run_files(ref_dir)
    assert records(os.path.join(run_dir, 'metrics.jsonl')) == records(os.path.join(ref_dir, 'metrics.jsonl'))
    for name in ('val_metric_hist.txt', 'val_metric.txt'):
        with open(os.path.join(ref_dir, name)) as a, open(os.path.join(run_dir, name)) as b:
            assert a.read() == b.read(), name
    for name in ('checkpoint_last.pth.tar', 'model_best.pth.tar'):
        a = torch.load(os.path.join(ref_dir, name), weights_only=True)
        b = torch.load(os.path.join(run_dir, name), weights_only=True)
        for key in ('epoch', 'global_step', 'lr', 'best_score', 'no_impr_counter', 'lr_counter'):
            assert a[key] == b[key], (name, key)
        assert [{k: v for k, v in r.items() if k not in TIMING} for r in a['history']] == \
            [{k: v for k, v in r.items() if k not in TIMING} for r in b['history']]
        for key in a['model']:
            assert torch.equal(a['model'][key], b['model'][key]), (name, key)
        for opt in a['optimizers']:
            for i, st in a['optimizers'][opt]['state'].items():
                for k, v in st.items():
                    assert torch.equal(v, b['optimizers'][opt]['state'][i][k]), (name, opt, i, k)


def result_metrics(result):
    with open(os.path.join(result['results_dir'], 'metrics.json')) as f:
        return json.load(f)


pytestmark = pytest.mark.usefixtures('one_torch_thread')  # the killed runs are one-thread subprocesses


@pytest.fixture(scope='module')
def reference(toy_root):
    """Two epochs of NRCCR and the test, without interruption."""
    return trainer.main(run_argv(toy_root, 'ref'))


# ============ items 1, 2, 3: kill -9 at several moments, then the same command again ============

@pytest.mark.parametrize('target,nth', [
    ('checkpoint_last.pth.tar', 2),   # during epoch 1's checkpoint save (a complete .tmp left, not renamed)
    ('metrics.jsonl', 2),             # just after epoch 0's checkpoint_last, before its history was written
    ('val_metric_hist.txt', 3),       # between the two history files of epoch 1
    ('metrics.json', 1),              # during the test that follows training (val_metric.txt already there)
])
def test_resume_after_kill_equals_uninterrupted_run(reference, toy_root, tmp_path, target, nth):
    tag = f'kill_{target.split(".")[0]}_{nth}'
    killed_run(toy_root, tag, target, nth, tmp_path)
    run_dir = os.path.join(os.path.dirname(reference['run_dir']), tag)
    if target == 'checkpoint_last.pth.tar':      # the killed save's temporary file is there (item 1)
        assert any(n.startswith('.checkpoint_last.pth.tar.') and n.endswith('.tmp') for n in os.listdir(run_dir))
    resumed = trainer.main(run_argv(toy_root, tag))
    assert_same_run(reference['run_dir'], run_dir)
    assert result_metrics(resumed['test']) == result_metrics(reference['test'])      # item 3: tested on re-run
    assert not resumed['test'].get('skipped')


def test_stale_temp_files_removed_on_resume_only_own(toy_root, tmp_path, monkeypatch):
    argv = run_argv(toy_root, 'stale', '--skip_test', '1')
    interrupt_after_epochs(monkeypatch, argv)
    run_dir = runs.run_dir(trainer.parse_args(argv))
    stale = [os.path.join(run_dir, n) for n in ('.model_best.pth.tar.4242.0123abcd.tmp',
                                                '.checkpoint_last.pth.tar.17.deadbeef.tmp',
                                                '.metrics.jsonl.99.00ff00ff.tmp')]
    keep = [os.path.join(run_dir, 'notes.tmp'), os.path.join(run_dir, '.my.tmp'),
            os.path.join(os.path.dirname(run_dir), '.model_best.pth.tar.4242.0123abcd.tmp')]
    for path in stale + keep:
        with open(path, 'w') as f:
            f.write('x')
    trainer.main(argv)
    assert not any(os.path.exists(p) for p in stale)
    assert all(os.path.exists(p) for p in keep)
    for p in keep:
        os.remove(p)


def test_resume_rebuilds_history_without_duplicates(toy_root, tmp_path, monkeypatch):
    """A history file holding an epoch the checkpoint does not (killed between the two) and one missing an
    epoch the checkpoint holds both come back exact."""
    argv = run_argv(toy_root, 'hist', '--skip_test', '1')
    interrupt_after_epochs(monkeypatch, argv)
    run_dir = runs.run_dir(trainer.parse_args(argv))
    with open(os.path.join(run_dir, 'metrics.jsonl'), 'a') as f:       # epoch 1 written, checkpoint not
        f.write(json.dumps({'epoch': 1, 'score': -1.0}) + '\n')
    os.remove(os.path.join(run_dir, 'val_metric_hist.txt'))            # epoch 0 lost
    trainer.main(argv)
    got = records(os.path.join(run_dir, 'metrics.jsonl'))
    assert [r['epoch'] for r in got] == [0, 1] and got[1]['score'] != -1.0
    with open(os.path.join(run_dir, 'val_metric_hist.txt')) as f:
        assert [line.split(':')[0] for line in f] == ['epoch_0', 'epoch_1']


def test_finished_run_without_test_results_tests_on_rerun(toy_root):
    first = trainer.main(tiny_train_argv(toy_root, 'notest', '--num_epochs', '1', '--skip_test', '1'))
    assert 'test' not in first
    again = trainer.main(tiny_train_argv(toy_root, 'notest', '--num_epochs', '1'))
    assert again['skipped'] and 'metrics' in again['test'] and not again['test'].get('skipped')
    third = trainer.main(tiny_train_argv(toy_root, 'notest', '--num_epochs', '1'))
    assert third['test']['skipped']                                 # results exist now: nothing to do


# ============ item 6: output errors are one line ============

def enospc_open(real_open, match):
    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, 'No space left on device')

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake(file, mode='r', *a, **k):
        f = real_open(file, mode, *a, **k)
        return Full(f) if match in os.path.basename(str(file)) and ('w' in mode or 'x' in mode) else f
    return fake


def test_full_disk_during_checkpoint_save_is_one_line(toy_root, monkeypatch):
    monkeypatch.setattr(ckpt, 'open', enospc_open(open, 'checkpoint_last'), raising=False)
    argv = tiny_train_argv(toy_root, 'full', '--num_epochs', '1', '--skip_test', '1')
    with pytest.raises(SystemExit) as e:
        trainer.main(argv)
    msg = str(e.value)
    assert '\n' not in msg and 'checkpoint_last.pth.tar' in msg and 'No space left' in msg and 'free' in msg
    run_dir = runs.run_dir(trainer.parse_args(argv))
    assert not [n for n in os.listdir(run_dir) if n.endswith('.tmp')]


def test_save_reports_the_os_error_inside_torch_save(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, 'open', enospc_open(open, 'm.pth'), raising=False)
    with pytest.raises(OSError) as e:
        ckpt.save_checkpoint({'w': torch.zeros(10000)}, tmp_path / 'm.pth')
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / 'm.pth')


def test_read_only_folder_is_one_line(toy_root, monkeypatch):
    real_open = open

    def read_only(file, mode='r', *a, **k):
        if any(c in mode for c in 'wax+'):
            raise OSError(errno.EROFS, 'Read-only file system', str(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(runs, 'open', read_only, raising=False)
    with pytest.raises(SystemExit) as e:
        trainer.main(tiny_train_argv(toy_root, 'ro', '--num_epochs', '1', '--skip_test', '1'))
    assert '\n' not in str(e.value) and 'args.json' in str(e.value) and 'read-only' in str(e.value)


@pytest.mark.parametrize('error', [OSError(errno.ENOENT, 'No such file or directory', 'x'), OSError('plain'),
                                   RuntimeError('a bug')])
def test_other_errors_keep_their_traceback(error):
    def body(_):
        raise error
    with pytest.raises(type(error)):
        runs.run_cli(body, None)


# ============ item 7: inputs checked before the run folder; --overwrite 1 starts clean ============

@pytest.mark.parametrize('flag,value', [('--collection', 'no_such_collection'), ('--visual_feature', 'no_such')])
def test_unknown_collection_or_feature_leaves_nothing(toy_root, flag, value):
    argv = tiny_train_argv(toy_root, 'nothing', '--num_epochs', '1')
    argv[argv.index(flag) + 1] = value
    before = sorted(os.walk(toy_root))
    with pytest.raises(SystemExit) as e:
        trainer.main(argv)
    assert value in str(e.value) and '\n' not in str(e.value)
    assert sorted(os.walk(toy_root)) == before


def test_overwrite_starts_clean(toy_root):
    argv = tiny_train_argv(toy_root, 'over', '--num_epochs', '1', '--skip_test', '1')
    first = trainer.main(argv)
    d = first['run_dir']
    trainer.main(argv + ['--overwrite', '1', '--num_epochs', '1'])
    assert [r['epoch'] for r in records(os.path.join(d, 'metrics.jsonl'))] == [0]
    with open(os.path.join(d, 'val_metric_hist.txt')) as f:
        assert f.read().count('epoch_0') == 1
    assert len([n for n in os.listdir(d) if n.startswith('events.out.tfevents')]) == 1
    with open(os.path.join(d, 'train.log')) as f:
        assert f.read().count('run dir:') == 1
    assert os.path.exists(os.path.join(d, 'checkpoint_last.pth.tar'))


# ============ item 11: the test after training uses the run's evaluation settings ============

def test_test_after_training_gets_the_run_settings(toy_root, monkeypatch):
    seen = []
    real_main = tester.main

    def spy(argv):
        seen.append(list(argv))
        return real_main(argv)

    monkeypatch.setattr(tester, 'main', spy)
    argv = tiny_train_argv(toy_root, 'settings', '--num_epochs', '0', '--amp', 'bf16', '--strict', '1')
    argv[argv.index('--eval_batch_size') + 1] = '5'
    trainer.main(argv)
    (t_argv,) = seen
    opts = tester.get_args_parser().parse_args(t_argv)
    assert opts.eval_batch_size == 5 and opts.amp == 'bf16' and opts.strict is True
    assert opts.bert_name == argv[argv.index('--bert_name') + 1]
    assert opts.device == 'cpu' and opts.workers == 0


def test_resume_of_a_checkpoint_without_history(reference, toy_root, monkeypatch):
    """Checkpoints written before the history was stored in them resume with the history of metrics.jsonl."""
    argv = run_argv(toy_root, 'nohist', '--skip_test', '1')
    interrupt_after_epochs(monkeypatch, argv)
    run_dir = runs.run_dir(trainer.parse_args(argv))
    last = os.path.join(run_dir, 'checkpoint_last.pth.tar')
    saved = torch.load(last, weights_only=True)
    ckpt.save_checkpoint({k: v for k, v in saved.items() if k != 'history'}, last)
    trainer.main(argv)
    assert records(os.path.join(run_dir, 'metrics.jsonl')) == records(os.path.join(reference['run_dir'],
                                                                                   'metrics.jsonl'))
