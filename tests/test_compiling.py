"""basic/compiling.py: --compile auto|1|0 resolved per device, compiler and run length, with the eager path
(and a warning) where no compiler is found; the compiled training forward takes every caption and video
length of an epoch without compiling again; the trainer says in one log line which path it runs.

The graphs are compiled here by a counting backend that runs them eagerly: what is tested is when dynamo
compiles (its guards), not inductor's kernels, which take minutes to build on a CPU."""
import contextlib
import importlib.util
import logging
import os
import re
import shutil

import pytest
import torch

import model as models
import trainer
from conftest import tiny_train_argv
from basic import compiling
from basic.errors import DataError
from basic.training import train_step
from test_model import fake_stream, fake_video, small_cfg

CPU, CUDA = torch.device('cpu'), torch.device('cuda', 0)


def no_cxx(monkeypatch):
    monkeypatch.delenv('CXX', raising=False)
    monkeypatch.setattr(shutil, 'which', lambda name: None)


def triton(monkeypatch, present):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *a: (object() if present else None) if name == 'triton' else real(name, *a))


def test_parse_compile_accepts_auto_and_on_off_words():
    assert [compiling.parse_compile(s) for s in ('auto', 'AUTO', '1', 'on', 'true', '0', 'off', 'no')] == \
        ['auto', 'auto', '1', '1', '1', '0', '0', '0']
    with pytest.raises(DataError, match='--compile maybe: expected auto, 1 or 0'):
        compiling.parse_compile('maybe')


def test_auto_stays_eager_on_a_cpu_and_1_compiles_where_a_cxx_compiler_is_found(monkeypatch):
    monkeypatch.setenv('CXX', 'my-g++')
    monkeypatch.setattr(shutil, 'which', lambda name: f'/opt/bin/{name}' if name == 'my-g++' else None)
    on, message, level = compiling.resolve_compile('auto', CPU, 10 ** 6)
    assert not on and message.startswith('compile: eager (--compile auto: on cpu') and level == logging.INFO
    on, message, level = compiling.resolve_compile('1', CPU, 5)
    assert on and message == 'compile: torch.compile, dynamic shapes (--compile 1; C++ compiler /opt/bin/my-g++)'
    assert compiling.resolve_compile('0', CPU, 10 ** 6) == (False, 'compile: eager (--compile 0)', logging.INFO)


def test_without_a_compiler_1_falls_back_to_eager_with_a_warning(monkeypatch):
    no_cxx(monkeypatch)
    on, message, level = compiling.resolve_compile('1', CPU, 100)
    assert not on and level == logging.WARNING
    assert message == 'compile: eager (--compile 1, but no C++ compiler (g++, c++, clang++) on the PATH)'
    triton(monkeypatch, False)
    on, message, level = compiling.resolve_compile('1', CUDA, 100)
    assert not on and level == logging.WARNING and 'triton not installed' in message


def test_auto_on_a_gpu_compiles_long_runs_with_triton_only(monkeypatch):
    triton(monkeypatch, True)
    steps = compiling.AUTO_MIN_STEPS
    assert compiling.resolve_compile('auto', CUDA, steps)[0]
    on, message, _ = compiling.resolve_compile('auto', CUDA, steps - 1)
    assert not on and f'{steps - 1} training steps, fewer than the {steps}' in message
    triton(monkeypatch, False)
    on, message, _ = compiling.resolve_compile('auto', CUDA, 10 ** 6)
    assert not on and message == 'compile: eager (--compile auto: triton not installed)'


class CountingBackend:
    """A torch.compile backend that counts the graphs dynamo hands it and runs them eagerly."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def nrccr_batch_of(B, L_src, L_tr, L_bt, frames):
    vid = torch.arange(B)
    return {'video': fake_video(B, frames), 'text': {'src': fake_stream(B, L_src), 'tr': fake_stream(B, L_tr),
                                                     'bt': fake_stream(B, L_bt)},
            'video_index': vid, 'same_video': torch.zeros(B, B, dtype=torch.bool)}


def mlcmr_batch_of(B, L_en, L_zh, frames, aug_frames):
    text = {'en': fake_stream(B, L_en), 'zh': fake_stream(B, L_zh)}
    text.update({f'{k}_masked': fake_stream(B, v['ids'].shape[1]) for k, v in list(text.items())})
    return {'video': fake_video(B, frames), 'video_aug': fake_video(B, aug_frames, lengths=[aug_frames] * B),
            'text': text, 'video_index': torch.arange(B), 'same_video': torch.zeros(B, B, dtype=torch.bool)}


@pytest.mark.parametrize('name', ['nrccr', 'mlcmr'])
def test_the_compiled_forward_takes_every_length_without_compiling_again(toy_root, name):
    """The first batch has equal lengths where later ones differ (duck shaping would have tied them) and
    other batch sizes and frame counts follow: the graphs compiled for the first batch serve them all."""
    torch.manual_seed(0)
    model = models.build_model(small_cfg(toy_root, name)).train()
    backend = CountingBackend()
    compiled = compiling.compile_forward(model, backend=backend)
    optimizers = model.configure_optimizers(1e-3, 1e-3)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    if name == 'nrccr':
        batches = [nrccr_batch_of(4, 9, 9, 9, 6), nrccr_batch_of(5, 7, 11, 6, 9), nrccr_batch_of(3, 12, 5, 8, 4)]
    else:
        batches = [mlcmr_batch_of(4, 9, 9, 6, 6), mlcmr_batch_of(5, 7, 11, 9, 3), mlcmr_batch_of(3, 12, 5, 4, 2)]
    graphs = []
    for batch in batches:
        logs = train_step(model, compiled, batch, optimizers, scaler, contextlib.nullcontext, 2.0)
        assert torch.isfinite(logs['loss'])
        graphs.append(backend.graphs)
    assert graphs[0] >= 1 and graphs == [graphs[0]] * len(batches)


def test_trainer_says_which_path_it_runs(toy_root, monkeypatch):
    """--compile auto on a CPU: eager, one INFO line; --compile 1: the training forward goes through
    compile_forward (here with the counting backend) and the run completes."""
    result = trainer.main(tiny_train_argv(toy_root, 'compile_auto', '--num_epochs', '1', '--max_steps_per_epoch', '2',
                                          '--skip_test', '1'))
    log = open(os.path.join(result['run_dir'], 'train.log')).read()
    assert len(re.findall(r'INFO compile: eager \(--compile auto: on cpu', log)) == 1

    backend = CountingBackend()
    real = compiling.compile_forward
    monkeypatch.setattr(compiling, 'compile_forward', lambda module: real(module, backend=backend))
    monkeypatch.setattr(shutil, 'which', lambda name: f'/usr/bin/{name}')
    result = trainer.main(tiny_train_argv(toy_root, 'compile_on', '--compile', '1', '--num_epochs', '1',
                                          '--max_steps_per_epoch', '2', '--skip_test', '1'))
    log = open(os.path.join(result['run_dir'], 'train.log')).read()
    assert 'INFO compile: torch.compile, dynamic shapes (--compile 1; C++ compiler /usr/bin/g++)' in log
    assert backend.graphs >= 1
