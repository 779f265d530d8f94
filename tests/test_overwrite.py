"""`--overwrite 1` never loses a finished run or its results (issue #17, item 1): every input is read before
the folder is touched, the previous files wait aside until the new attempt's commit point
(basic/replacement.py), a failure before it puts them back byte for byte, and a kill at any moment leaves
one complete run, which the next start puts in place."""
import os
import shutil

import numpy as np
import pytest
import torch

import tester
import trainer
from basic import checkpoint as ckpt
from basic import data_provider as dp
from basic import replacement
from basic import runs
from basic.captions import read_captions
from conftest import run_killed, tiny_train_argv


def snapshot(directory):
    """{relative path: bytes} of every file below `directory`, hidden ones included."""
    out = {}
    for parent, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(parent, name)
            with open(path, 'rb') as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def one_line(message):
    assert '\n' not in message, message
    return message


# ============ the protocol, killed at every step ============

class Killed(BaseException):
    """The process dies here: no handler of the code under test runs (as with kill -9)."""


OWNED = lambda name: name.endswith('.txt') or name == 'mark'           # noqa: E731
COMMITTED = lambda d: os.path.isfile(os.path.join(d, 'mark'))          # noqa: E731


def old_folder(tmp_path):
    d = tmp_path / 'run'
    (d / 'sub').mkdir(parents=True)
    for name, text in (('a.txt', 'old a'), ('b.txt', 'old b'), ('c.txt', 'old c'), ('notes.md', 'mine'),
                       ('sub/x.txt', 'below')):
        (d / name).write_text(text)
    return str(d)


def write_new(directory, commit):
    for name in ('a.txt', 'd.txt') + (('mark',) if commit else ()):
        with open(os.path.join(directory, name), 'w') as f:
            f.write(f'new {name}')


def kill_at(monkeypatch, n):
    """os.replace kills the process at its nth call from now; returns the call counter."""
    real, calls = os.replace, [0]

    def replace(src, dst):
        calls[0] += 1
        if calls[0] == n:
            raise Killed
        return real(src, dst)
    monkeypatch.setattr(replacement.os, 'replace', replace)
    return calls


def steps(monkeypatch, fn):
    """How many os.replace calls `fn` makes."""
    calls = kill_at(monkeypatch, 0)
    fn()
    monkeypatch.undo()
    return calls[0]


def test_a_kill_while_setting_aside_leaves_the_previous_files(tmp_path, monkeypatch):
    n_steps = steps(monkeypatch, lambda: replacement.Replacement(old_folder(tmp_path / 'count'), OWNED,
                                                                 COMMITTED).set_aside())
    assert n_steps == 4                        # three files, then the folder
    for n in range(1, n_steps + 1):
        directory = old_folder(tmp_path / str(n))
        before = snapshot(directory)
        kill_at(monkeypatch, n)
        with pytest.raises(Killed):
            replacement.Replacement(directory, OWNED, COMMITTED).set_aside()
        monkeypatch.undo()
        assert replacement.Replacement(directory, OWNED, COMMITTED).recover().startswith('put back')
        assert snapshot(directory) == before, n


@pytest.mark.parametrize('commit', [False, True])
def test_a_kill_during_the_new_attempt(tmp_path, commit):
    """Before the commit mark the previous files come back; after it the new ones stay."""
    directory = old_folder(tmp_path)
    before = snapshot(directory)
    folder = replacement.Replacement(directory, OWNED, COMMITTED)
    assert folder.set_aside() == ['a.txt', 'b.txt', 'c.txt']
    assert sorted(os.listdir(directory)) == ['.previous', 'notes.md', 'sub']
    write_new(directory, commit)
    after_new = {k: v for k, v in snapshot(directory).items() if not k.startswith('.previous')}
    message = replacement.Replacement(directory, OWNED, COMMITTED).recover()     # the next start
    if commit:
        assert message.startswith('removed') and snapshot(directory) == after_new
    else:
        assert message.startswith('put back') and snapshot(directory) == before


def test_a_kill_while_restoring_or_committing(tmp_path, monkeypatch):
    def prepared(name, commit):
        directory = old_folder(tmp_path / name)
        folder = replacement.Replacement(directory, OWNED, COMMITTED)
        folder.set_aside()
        write_new(directory, commit)
        return directory, folder

    counted = prepared('count', False)[1]
    n_restore = steps(monkeypatch, counted.restore)
    assert n_restore == 4                      # the folder renamed, then three files back
    for n in range(1, n_restore + 1):
        before = snapshot(old_folder(tmp_path / f'ref{n}'))
        directory, folder = prepared(f'r{n}', False)
        kill_at(monkeypatch, n)
        with pytest.raises(Killed):
            folder.restore()
        monkeypatch.undo()
        replacement.Replacement(directory, OWNED, COMMITTED).recover()
        assert snapshot(directory) == before, n

    directory, folder = prepared('c1', True)
    new = {k: v for k, v in snapshot(directory).items() if not k.startswith('.previous')}
    kill_at(monkeypatch, 1)                    # before the rename to .previous.discard
    with pytest.raises(Killed):
        folder.commit()
    monkeypatch.undo()
    assert replacement.Replacement(directory, OWNED, COMMITTED).recover().startswith('removed')
    assert snapshot(directory) == new
    directory, folder = prepared('c2', True)   # killed half-way through deleting .previous.discard
    real_rmtree = shutil.rmtree

    def half_rmtree(path, *a, **k):
        os.remove(os.path.join(path, 'a.txt'))
        raise Killed
    monkeypatch.setattr(replacement.shutil, 'rmtree', half_rmtree)
    with pytest.raises(Killed):
        folder.commit()
    monkeypatch.setattr(replacement.shutil, 'rmtree', real_rmtree)
    replacement.Replacement(directory, OWNED, COMMITTED).recover()
    assert snapshot(directory) == new


def test_attempt_puts_back_on_error_and_keeps_after_commit(tmp_path):
    directory = old_folder(tmp_path / 'error')
    before = snapshot(directory)
    folder = replacement.Replacement(directory, OWNED, COMMITTED)
    with pytest.raises(KeyboardInterrupt):
        with folder.attempt(replace=True):
            write_new(directory, commit=False)
            raise KeyboardInterrupt
    assert snapshot(directory) == before

    directory = old_folder(tmp_path / 'late')
    folder = replacement.Replacement(directory, OWNED, COMMITTED)
    with pytest.raises(RuntimeError):
        with folder.attempt(replace=True):
            write_new(directory, commit=True)
            assert folder.commit()
            raise RuntimeError('after the commit point')
    assert snapshot(directory) == {'a.txt': b'new a.txt', 'd.txt': b'new d.txt', 'mark': b'new mark',
                                   'notes.md': b'mine', 'sub/x.txt': b'below'}
    empty = str(tmp_path / 'empty')
    os.makedirs(empty)
    nothing = replacement.Replacement(empty, OWNED, COMMITTED)
    assert nothing.set_aside() == [] and not nothing.pending and os.listdir(empty) == []


# ============ the trainer: twelve broken inputs leave the finished run byte-identical ============

FEATURE = os.path.join('toy', 'FeatureData', 'toy_feature')
TEXT = os.path.join('toy', 'TextData')


@pytest.fixture(scope='module')
def pristine(toy_root, tmp_path_factory):
    """(work root, pristine copy): a private toy collection and tiny BERT with a finished NRCCR run and its test
    results, trained in `work` and copied aside; each test gets `work` back as it was (same absolute paths,
    so the same run folder)."""
    base = tmp_path_factory.mktemp('overwrite')
    work, keep = str(base / 'VS'), str(base / 'pristine')
    os.makedirs(work)
    shutil.copytree(os.path.join(toy_root, 'toy'), os.path.join(work, 'toy'))
    shutil.copytree(os.path.join(toy_root, 'tiny_bert'), os.path.join(work, 'tiny_bert'))
    run = trainer.main(train_argv(work))['run_dir']
    tester.main(cli_of_tester(work, run))
    shutil.copytree(work, keep)
    return work, keep, run


@pytest.fixture
def world(pristine):
    work, keep, run = pristine
    shutil.rmtree(work)
    shutil.copytree(keep, work)
    dp.build_tokenizer.cache_clear()           # a BERT folder damaged by a test must be read again
    yield work, run
    dp.build_tokenizer.cache_clear()


def train_argv(root, *extra):
    argv = tiny_train_argv(root, 'old', '--num_epochs', '1', '--skip_test', '1', *extra)
    argv[argv.index('--bert_name') + 1] = os.path.join(root, 'tiny_bert')
    return argv


def cli_of_tester(root, run, *extra):
    return ['--rootpath', root, '--logger_name', run, '--device', 'cpu', '--workers', '0', *extra]


def results_dir(root, run):
    return tester.results_dir_for(root, 'toy', 'test', os.path.join(run, 'model_best.pth.tar'), None)


def append(path, data):
    with open(path, 'ab') as f:
        f.write(data)


def write(path, data):
    with open(path, 'wb') as f:
        f.write(data)


def poison_video(root, caption_file):
    """A NaN in the second frame of the first video of `caption_file`."""
    fdir = os.path.join(root, FEATURE)
    store = dp.FrameStore(fdir)
    video = read_captions(os.path.join(root, TEXT, caption_file)).video_ids[0]
    row = store.bigfile.name2index[store.video2frames[video][1]]
    data = np.memmap(os.path.join(fdir, 'feature.bin'), dtype='<f4', mode='r+',
                     shape=(store.bigfile.nrows, store.bigfile.ndims))
    data[row, 0] = np.nan
    data.flush()
    del data


def truncate(path, keep_bytes=-4):
    size = os.path.getsize(path)
    os.truncate(path, size + keep_bytes if keep_bytes < 0 else keep_bytes)


def rewrite(path, keep=lambda lines: lines):
    with open(path, encoding='utf-8') as f:
        lines = f.readlines()
    with open(path, 'w', encoding='utf-8') as f:
        f.writelines(keep(lines))


def other_model_checkpoint(root, run):
    """A readable checkpoint whose weights do not fit this configuration (one tensor of another shape)."""
    saved = torch.load(os.path.join(run, 'checkpoint_last.pth.tar'), weights_only=True)
    name = next(k for k, v in saved['model'].items() if v.dim() == 2)
    saved['model'][name] = torch.zeros(3, 3)
    path = os.path.join(root, 'other_config.pth.tar')
    ckpt.save_checkpoint(saved, path)
    return ['--resume', path]


MT = 'toytrain_google_enc2zh.caption.txt'
# name: (damage(root, run) -> extra trainer flags or None, text the one-line error holds)
TRAINER_CASES = {
    'truncated feature.bin': (lambda r, _: truncate(os.path.join(r, FEATURE, 'feature.bin')), 'truncated'),
    'NaN rows (found lazily, in the first batch)': (lambda r, _: poison_video(r, 'toytrain.caption.txt'),
                                                    'holds NaN'),
    'shape.txt disagrees with id.txt': (lambda r, _: write(os.path.join(r, FEATURE, 'shape.txt'), b'99999 32'),
                                        'shape.txt says 99999 rows'),
    'code in video2frames.txt': (lambda r, _: write(os.path.join(r, FEATURE, 'video2frames.txt'),
                                                    b"__import__('os').system('echo pwned')"),
                                 'video2frames.txt: not a literal'),
    'invalid UTF-8 in a caption file': (lambda r, _: append(os.path.join(r, TEXT, MT), b'v#enc2zh#0 \xff\xfe\n'),
                                        'invalid UTF-8'),
    'empty caption file': (lambda r, _: truncate(os.path.join(r, TEXT, 'toytrain.caption.txt'), 0), 'no captions'),
    'a caption line without #tag#k': (lambda r, _: append(os.path.join(r, TEXT, MT), b'someVideo a dog\n'),
                                      '"#"-separated fields'),
    'duplicate caption id': (lambda r, _: rewrite(os.path.join(r, TEXT, MT), lambda ls: ls + ls[:1]),
                             'repeats video'),
    'missing partner translation (--strict 1)': (
        lambda r, _: rewrite(os.path.join(r, TEXT, MT), lambda ls: ls[1:]) or ['--strict', '1'],
        'have no partner caption'),
    'empty validation caption file': (lambda r, _: truncate(os.path.join(r, TEXT, 'toyval_zh.caption.txt'), 0),
                                      'no captions'),
    'BERT folder without vocab.txt': (lambda r, _: os.remove(os.path.join(r, 'tiny_bert', 'vocab.txt')),
                                      'neither vocab.txt nor tokenizer.json'),
    'BERT weights truncated': (lambda r, _: truncate(os.path.join(r, 'tiny_bert', 'model.safetensors'), 100),
                               'could not load BERT'),
    'checkpoint to resume missing': (lambda r, _: ['--resume', os.path.join(r, 'no_such.pth.tar')],
                                     'checkpoint not found'),
    'checkpoint to resume of another configuration': (other_model_checkpoint, 'does not fit this run'),
}


@pytest.mark.parametrize('case', list(TRAINER_CASES))
def test_broken_input_leaves_the_finished_run_byte_identical(world, case, monkeypatch):
    root, run = world
    damage, expected = TRAINER_CASES[case]
    before = snapshot(run)
    assert {'model_best.pth.tar', 'checkpoint_last.pth.tar', 'metrics.jsonl', 'val_metric.txt',
            'val_metric_hist.txt', 'train.log', 'args.json'} <= set(before)
    extra = damage(root, run) or []
    set_aside, real = [], replacement.Replacement.set_aside
    monkeypatch.setattr(replacement.Replacement, 'set_aside', lambda self: set_aside.append(1) or real(self))
    with pytest.raises(SystemExit) as e:
        trainer.main(train_argv(root, '--overwrite', '1', *extra))
    assert expected in one_line(str(e.value))
    assert snapshot(run) == before                 # no file changed, none added (no .previous_run left)
    # found before the run folder was touched; only NaN rows are found once training reads them
    assert set_aside == ([1] if 'lazily' in case else [])


def test_overwrite_replaces_the_run_and_leaves_other_files(world):
    root, run = world
    with open(os.path.join(run, 'notes.txt'), 'w') as f:
        f.write('mine')
    before = snapshot(run)
    trainer.main(train_argv(root, '--overwrite', '1'))
    after = snapshot(run)
    assert after['notes.txt'] == b'mine' and not any(k.startswith('.previous') for k in after)
    assert after['checkpoint_last.pth.tar'] != before['checkpoint_last.pth.tar']
    assert after['train.log'].count(b'run dir:') == 1 and b'kept the previous run aside' in after['train.log']
    assert b'removed the previous run' in after['train.log']


# ============ the trainer killed during the replacement ============

def assert_previous_run_back(run, before):
    """The finished run is in place again: every file as before, train.log only appended to (the re-run
    says it found the run finished)."""
    after = snapshot(run)
    assert set(after) == set(before)
    assert {k: v for k, v in after.items() if k != 'train.log'} == {k: v for k, v in before.items()
                                                                      if k != 'train.log'}
    assert after['train.log'].startswith(before['train.log'])


@pytest.mark.parametrize('target,nth,moment', [
    ('metrics.jsonl', 1, 'while the previous run is set aside'),
    ('checkpoint_last.pth.tar', 2, "at the new run's first checkpoint_last (its model_best saved)"),
])
def test_kill_before_the_first_checkpoint_then_the_run_is_back(world, tmp_path, target, nth, moment):
    root, run = world
    before = snapshot(run)
    run_killed('trainer', train_argv(root, '--overwrite', '1'), target, nth, tmp_path)
    aside = [d for d in os.listdir(run) if d.startswith('.previous_run')]
    assert len(aside) == 1                      # one complete run on disk: the files in place + those aside
    on_disk = {k: v for k, v in snapshot(run).items() if runs.is_run_file(k)}
    on_disk.update({k.split(os.sep, 1)[1]: v for k, v in snapshot(run).items() if k.startswith(aside[0] + os.sep)})
    if nth == 1:
        assert on_disk == before, moment
    result = trainer.main(train_argv(root))     # the same command without --overwrite: the run is back
    assert result['skipped']
    assert_previous_run_back(run, before)


def test_kill_after_the_first_checkpoint_then_the_new_run_resumes(world, tmp_path):
    root, run = world
    before = snapshot(run)
    run_killed('trainer', train_argv(root, '--overwrite', '1'), '.previous_run.discard', 1, tmp_path)
    assert os.path.isdir(os.path.join(run, '.previous_run'))
    result = trainer.main(train_argv(root))     # resumes the new run, which had its checkpoint
    assert not result.get('skipped') and result['epochs'] == 1
    after = snapshot(run)
    assert not any(k.startswith('.previous') for k in after)
    assert after['checkpoint_last.pth.tar'] != before['checkpoint_last.pth.tar']
    assert b'removed the previous run: the new ones had reached their commit point' in after['train.log']


def test_kill_while_putting_the_run_back_after_a_lazy_error(world, tmp_path):
    root, run = world
    before = snapshot(run)
    poison_video(root, 'toytrain.caption.txt')          # the new run stops in its first batch
    # model_best.pth.tar: 1st rename = set aside, 2nd = put back (after args.json, checkpoint_last, ...)
    run_killed('trainer', train_argv(root, '--overwrite', '1'), 'model_best.pth.tar', 2, tmp_path)
    assert os.path.isdir(os.path.join(run, '.previous_run.restoring'))
    assert trainer.main(train_argv(root))['skipped']
    assert_previous_run_back(run, before)


# ============ the tester's results folder ============

@pytest.mark.parametrize('damage,expected', [
    (lambda r: truncate(os.path.join(r, TEXT, 'toytest_zh.caption.txt'), 0), 'no captions'),
    (lambda r: poison_video(r, 'toytest_zh.caption.txt'), 'holds NaN'),       # found while encoding
])
def test_tester_overwrite_with_broken_input_keeps_the_results(world, damage, expected):
    root, run = world
    out = results_dir(root, run)
    before = snapshot(out)
    assert {'metrics.json', 'report.txt', 'test.log', 'sims_primary.npy'} <= set(before)
    damage(root)
    with pytest.raises(SystemExit) as e:
        tester.main(cli_of_tester(root, run, '--overwrite', '1'))
    assert expected in one_line(str(e.value))
    assert snapshot(out) == before


def test_tester_overwrite_replaces_the_results(world):
    root, run = world
    out = results_dir(root, run)
    with open(os.path.join(out, 'notes.txt'), 'w') as f:
        f.write('mine')
    before = snapshot(out)
    result = tester.main(cli_of_tester(root, run, '--overwrite', '1', '--save_embeddings', '1'))
    after = snapshot(out)
    assert not result.get('skipped') and after['notes.txt'] == b'mine'
    assert not any(k.startswith('.previous') for k in after) and 'video_emb.npy' in after
    assert after['test.log'] != before['test.log'] and after['metrics.json'] == before['metrics.json']


def test_tester_killed_before_its_metrics_then_the_results_are_back(world, tmp_path):
    root, run = world
    out = results_dir(root, run)
    before = snapshot(out)
    # metrics.json: 1st rename = set aside, 2nd = the new results' metrics.json (their commit point)
    run_killed('tester', cli_of_tester(root, run, '--overwrite', '1'), 'metrics.json', 2, tmp_path)
    assert os.path.isdir(os.path.join(out, '.previous_results'))
    again = tester.main(cli_of_tester(root, run))
    assert again['skipped'] and snapshot(out) == before
