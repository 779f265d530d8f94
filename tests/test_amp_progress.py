"""Issue #10 in the trainer and the tester: --amp resolved once for the device (bf16 refused where the
hardware lacks it, auto falling back with a warning, evaluation under the same autocast), progress lines in
train.log when stderr is not a terminal, and a training loop without per-step host synchronisation whose
non-finite check still names the step. Tests with `cuda` in their name run on a GPU (util/gpu_check.sh)."""
import contextlib
import io
import json
import os
import re
import sys
import warnings

import pytest
import torch

import evaluation
import model as models
import trainer
from conftest import tiny_train_argv
from basic import precision, runs
from basic.training import NonFiniteWatch, log_values, train_step

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


def cpu_with_flags(monkeypatch, *flags):
    monkeypatch.setattr(precision, 'cpu_flags', lambda path='/proc/cpuinfo': {'sse2', 'avx2', *flags})


def read(path):
    with open(path) as f:
        return f.read()


# ============ --amp ============

def test_amp_bf16_without_native_bf16_stops_in_one_line_before_any_folder(toy_root, monkeypatch):
    cpu_with_flags(monkeypatch)
    argv = tiny_train_argv(toy_root, 'amp_refused', '--amp', 'bf16', '--num_epochs', '1', '--skip_test', '1')
    with pytest.raises(SystemExit) as e:
        trainer.main(argv)
    message = str(e.value)
    assert message.startswith('error: --amp bf16: cpu has no native bf16') and '\n' not in message
    assert '--amp off' in message and '--amp auto' in message
    assert not os.path.exists(runs.run_dir(trainer.parse_args(argv)))


@pytest.mark.parametrize('flags, resolved', [((), 'off'), (('avx512_bf16',), 'bf16')])
def test_amp_auto_resolves_once_and_evaluation_runs_under_the_same_autocast(toy_root, monkeypatch, flags, resolved):
    """auto -> bf16 on a CPU reporting avx512_bf16, fp32 (with a warning) on one without; the precision is
    stored as amp_resolved; validation and the test after training encode under that autocast."""
    cpu_with_flags(monkeypatch, *flags)
    seen = []
    real_encode_texts = evaluation.encode_texts

    def spy(model, dataset, batch_size, device, workers=0, autocast=contextlib.nullcontext, dist=None, batches=None):
        with autocast():
            seen.append(torch.get_autocast_dtype('cpu') if torch.is_autocast_enabled('cpu') else None)
        return real_encode_texts(model, dataset, batch_size, device, workers, autocast, dist, batches)
    monkeypatch.setattr(evaluation, 'encode_texts', spy)

    result = trainer.main(tiny_train_argv(toy_root, f'amp_auto_{resolved}', '--amp', 'auto', '--num_epochs', '1',
                                          '--max_steps_per_epoch', '2'))
    expected = torch.bfloat16 if resolved == 'bf16' else None
    assert seen == [expected, expected]                                   # validation, then the test
    stored = json.loads(read(os.path.join(result['run_dir'], 'args.json')))
    assert stored['amp'] == 'auto' and stored['amp_resolved'] == resolved
    saved = torch.load(os.path.join(result['run_dir'], 'model_best.pth.tar'), weights_only=True)
    assert saved['args']['amp_resolved'] == resolved
    log = read(os.path.join(result['run_dir'], 'train.log'))
    if resolved == 'off':
        assert re.search(r'WARNING precision: fp32 \(--amp auto: CPU lacks avx512_bf16 and amx_bf16\)', log)
    else:
        assert re.search(r'INFO precision: bf16 autocast \(--amp auto: CPU has avx512_bf16\)', log)
    test_log = read(os.path.join(result['test']['results_dir'], 'test.log'))
    assert f'(--amp {resolved}' in test_log           # the trainer passes the resolved precision on


def test_tester_refuses_bf16_without_it_and_a_resume_says_when_auto_resolves_differently(toy_root, monkeypatch):
    import tester
    cpu_with_flags(monkeypatch, 'amx_bf16')
    argv = tiny_train_argv(toy_root, 'amp_resume', '--amp', 'auto', '--num_epochs', '1', '--max_steps_per_epoch', '1',
                           '--skip_test', '1')
    first = trainer.main(argv)
    os.remove(os.path.join(first['run_dir'], 'val_metric.txt'))   # as if killed before the end: it resumes
    cpu_with_flags(monkeypatch)                                   # the same command on a CPU without bf16
    assert trainer.main(argv)['run_dir'] == first['run_dir']
    log = read(os.path.join(first['run_dir'], 'train.log'))
    assert re.search(r'WARNING \S+checkpoint_last.pth.tar was trained with --amp bf16; it continues with off', log)
    with pytest.raises(SystemExit) as e:
        tester.main(['--checkpoint', os.path.join(first['run_dir'], 'model_best.pth.tar'), '--rootpath', toy_root,
                     '--device', 'cpu', '--workers', '0', '--amp', 'bf16', '--results_dir', os.path.join(
                         first['run_dir'], 'test_bf16')])
    assert str(e.value).startswith('error: --amp bf16: cpu has no native bf16') and '\n' not in str(e.value)


def test_amp_auto_and_log_every_keep_the_run_folder_of_their_flags(toy_root):
    base = trainer.parse_args(tiny_train_argv(toy_root, 'h'))
    assert runs.run_dir(trainer.parse_args(tiny_train_argv(toy_root, 'h', '--log_every', '7'))) == runs.run_dir(base)
    resolved = trainer.parse_args(tiny_train_argv(toy_root, 'h'))
    resolved.amp_resolved = 'bf16'                     # derived: the hash follows --amp as given
    assert runs.run_dir(resolved) == runs.run_dir(base)
    assert runs.run_dir(trainer.parse_args(tiny_train_argv(toy_root, 'h', '--amp', 'auto'))) != runs.run_dir(base)


# ============ progress ============

PROGRESS = re.compile(r'INFO (?P<desc>[a-z0-9 ]+): step (?P<step>\d+)/(?P<total>\d+) \(\d+%\)'
                      r'(?: \| loss=(?P<loss>\S+))? \| (?P<rate>[\d.]+) (?P<unit>\w+)/s'
                      r' \| elapsed \d+:\d\d:\d\d \| (?P<end>ETA \d+:\d\d:\d\d|done)$')


def test_progress_lines_reach_train_log_when_stderr_is_not_a_terminal(toy_root, monkeypatch):
    monkeypatch.setattr(sys, 'stderr', io.StringIO())        # not a terminal, whatever runs pytest
    result = trainer.main(tiny_train_argv(toy_root, 'progress', '--num_epochs', '1', '--log_every', '2',
                                          '--skip_test', '1'))
    lines = [m.groupdict() for m in map(PROGRESS.search, read(os.path.join(result['run_dir'], 'train.log'))
                                        .splitlines()) if m]
    # 72 training captions in batches of 16: 5 steps; a line at step 1, then every 2 steps, then the end
    train = [d for d in lines if d['desc'] == 'epoch 0']
    assert [(d['step'], d['total']) for d in train] == [('1', '5'), ('3', '5'), ('5', '5')]
    assert all(d['end'].startswith('ETA') for d in train) and train[-1]['end'] == 'ETA 0:00:00'
    for d in train:
        assert d['unit'] == 'samples' and float(d['rate']) > 0
        assert d['loss'] is not None and 0 < float(d['loss']) < 100
    # validation encoding: 8 videos in one batch of 8, 24 captions in 3 batches of 8
    videos = [d for d in lines if d['desc'] == 'encode videos']
    captions = [d for d in lines if d['desc'] == 'encode captions']
    assert videos and videos[0]['step'] == '1' and videos[0]['total'] == '1' and videos[0]['unit'] == 'videos'
    assert captions[0]['step'] == '1' and captions[-1]['step'] == captions[-1]['total'] == '3'
    assert captions[-1]['end'] == 'done' and captions[0]['unit'] == 'captions'
    assert sys.stderr.getvalue().count('\r') == 0                         # no bar was drawn


# ============ no per-step host synchronisation; the non-finite check ============

def test_a_non_finite_loss_stops_training_naming_epoch_and_step(toy_root, monkeypatch):
    calls = []
    real_loss = models.NRCCR.training_loss

    def loss_nan_at_second_step(self, out):
        loss, logs = real_loss(self, out)
        calls.append(1)
        return (loss * float('nan'), logs) if len(calls) == 2 else (loss, logs)
    monkeypatch.setattr(models.NRCCR, 'training_loss', loss_nan_at_second_step)
    argv = tiny_train_argv(toy_root, 'nonfinite', '--num_epochs', '1', '--skip_test', '1')
    with pytest.raises(FloatingPointError, match=r'^epoch 0 step 1: non-finite loss nan \(lr 0\.0001\); logs: '):
        trainer.main(argv)
    run_dir = runs.run_dir(trainer.parse_args(argv))
    assert not os.path.exists(os.path.join(run_dir, 'checkpoint_last.pth.tar'))


def test_nonfinite_watch_names_the_first_bad_step_and_the_range_checked():
    watch = NonFiniteWatch(torch.device('cpu'))
    for step in range(4):
        watch.update(step, torch.tensor(1.0))
    watch.check('epoch 2')                                     # fine: nothing raised
    for step, value in zip(range(4, 8), (1.0, float('inf'), float('nan'), 2.0)):
        watch.update(step, torch.tensor(value))
    with pytest.raises(FloatingPointError,
                       match=r'^epoch 2 step 5: non-finite loss \(found when checking steps 4-7\)$'):
        watch.check('epoch 2')


def test_log_values_reads_tensors_and_numbers():
    assert log_values({'a': torch.tensor(0.25), 'b': 3, 'c': torch.tensor(1.5, dtype=torch.float64)}) == \
        {'a': 0.25, 'b': 3.0, 'c': 1.5}
    assert log_values({}) == {}


@pytest.mark.parametrize('name', ['nrccr', 'mlcmr'])
def test_train_step_logs_are_detached_device_scalars(toy_root, name):
    from test_model import mlcmr_batch, nrccr_batch, small_cfg
    torch.manual_seed(0)
    model = models.build_model(small_cfg(toy_root, name)).train()
    opts = model.configure_optimizers(1e-3, 1e-3)
    batch = nrccr_batch() if name == 'nrccr' else mlcmr_batch()
    logs = train_step(model, model, batch, opts, torch.amp.GradScaler('cpu', enabled=False),
                      contextlib.nullcontext, 2.0)
    assert all(torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad for v in logs.values())
    values = log_values(logs)
    assert values['loss'] > 0 and all(isinstance(v, float) for v in values.values())
    if name == 'nrccr':
        assert 0 <= values['real_acc'] <= 1 and 0 <= values['fake_acc'] <= 1


@needs_cuda
def test_nonfinite_watch_cuda():
    device = torch.device('cuda')
    watch = NonFiniteWatch(device)
    for step, value in enumerate((1.0, 2.0, float('nan'), 1.0)):
        watch.update(step, torch.tensor(value, device=device))
    assert watch.first.device.type == 'cuda'
    with pytest.raises(FloatingPointError, match=r'^step 2: non-finite loss \(found when checking steps 0-3\)$'):
        watch.check()


@needs_cuda
@pytest.mark.parametrize('name', ['nrccr', 'mlcmr'])
@pytest.mark.parametrize('amp', ['off', 'bf16'])
def test_train_step_cuda_waits_for_the_device_nowhere_in_our_code(toy_root, name, amp):
    """torch's sync debug mode warns at every host synchronisation, attributed to the Python line that
    caused it: none of them may come from the step's own code (model.py, loss.py, basic/training.py).
    Syncs inside third-party code (transformers' mask handling, for one) are not ours to remove."""
    from test_model import mlcmr_batch, nrccr_batch, small_cfg
    from basic.batching import move_to
    device = torch.device('cuda')
    if amp == 'bf16' and not precision.bf16_support(device)[0]:
        pytest.skip('this GPU has no native bf16')
    torch.manual_seed(0)
    model = models.build_model(small_cfg(toy_root, name)).to(device).train()
    opts = model.configure_optimizers(1e-3, 1e-3)
    scaler = torch.amp.GradScaler('cuda', enabled=False)
    autocast = precision.autocast_factory(amp, device)
    batch = move_to(nrccr_batch() if name == 'nrccr' else mlcmr_batch(), device)
    watch = NonFiniteWatch(device)
    train_step(model, model, batch, opts, scaler, autocast, 2.0)            # warm-up (lazy initialisation)
    torch.cuda.synchronize()
    ours = {os.path.abspath(p) for p in (models.__file__, sys.modules['loss'].__file__,
                                          sys.modules['basic.training'].__file__)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            for step in range(2):
                logs = train_step(model, model, batch, opts, scaler, autocast, 2.0)
                watch.update(step, logs['loss'])
        finally:
            torch.cuda.set_sync_debug_mode('default')
    syncs = [f'{os.path.basename(w.filename)}:{w.lineno}' for w in caught
             if 'synchroniz' in str(w.message) and os.path.abspath(w.filename) in ours]
    assert syncs == []
    watch.check()
    assert all(v.device.type == 'cuda' for v in logs.values())
