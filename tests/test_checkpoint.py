"""Checkpoints (docs/models.md, 'Checkpoint formats'): atomic save, safe load, legacy allow-list, RNG state, key prefixes."""
import argparse
import collections
import os
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from basic.errors import DataError
from basic import checkpoint as ckpt


def tiny_model():
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 1))


def train_step(model, opt, x):
    opt.zero_grad()
    loss = model(x).pow(2).mean()      # dropout makes this depend on the torch RNG
    loss.backward()
    opt.step()
    return loss.item()


def training_state(model, opt, epoch):
    return {'model': model.state_dict(), 'optimizers': {'main': opt.state_dict()}, 'epoch': epoch,
            'best_score': 12.5, 'args': {'lr': 1e-3, 'layers': ['a', 'b'], 'resume': None},
            'rng': [ckpt.capture_rng_state()]}


def test_round_trip_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 4)
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_step(model, opt, x)
    path = tmp_path / 'run' / 'checkpoint_last.pth.tar'        # the directory is created
    ckpt.save_checkpoint(training_state(model, opt, epoch=1), path)
    expected = [train_step(model, opt, x) for _ in range(2)]     # what an uninterrupted run does next

    # weights_only loading works on the raw file too
    raw = torch.load(path, weights_only=True)
    assert raw['format_version'] == ckpt.FORMAT_VERSION

    saved = ckpt.load_checkpoint(path)
    assert saved['epoch'] == 1 and saved['args'] == {'lr': 1e-3, 'layers': ['a', 'b'], 'resume': None}
    assert 'legacy' not in saved
    model2 = tiny_model()
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    model2.load_state_dict(saved['model'])
    opt2.load_state_dict(saved['optimizers']['main'])
    ckpt.restore_rng_state(saved['rng'][0])
    assert [train_step(model2, opt2, x) for _ in range(2)] == expected


def test_restore_rng_state_repeats_every_generator():
    random.gauss(0, 1)                 # leaves a cached second gaussian in python's state
    np.random.standard_normal()        # and in numpy's (has_gauss = 1)
    state = ckpt.capture_rng_state()
    assert state['numpy']['has_gauss'] == 1 and state['python']['gauss_next'] is not None
    first = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
             torch.rand(3).tolist(), torch.randn(2).tolist())
    ckpt.restore_rng_state(state)
    again = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
             torch.rand(3).tolist(), torch.randn(2).tolist())
    assert again == first


def test_rng_state_survives_weights_only_file(tmp_path):
    ckpt.save_checkpoint({'rng': ckpt.capture_rng_state()}, tmp_path / 'r.pth.tar')
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.restore_rng_state(torch.load(tmp_path / 'r.pth.tar', weights_only=True)['rng'])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


@pytest.mark.parametrize('partial_bytes', [0, 100])
def test_crash_while_saving_keeps_previous_file(tmp_path, monkeypatch, partial_bytes):
    path = tmp_path / 'model_best.pth.tar'
    ckpt.save_checkpoint({'epoch': 1}, path)
    before = path.read_bytes()

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b'\0' * partial_bytes)
        raise OSError('disk full')

    monkeypatch.setattr(torch, 'save', crashing_save)
    with pytest.raises(OSError, match='disk full'):
        ckpt.save_checkpoint({'epoch': 2}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ['model_best.pth.tar']      # no temporary file left behind
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)['epoch'] == 1


@pytest.mark.parametrize('bad', [np.float64(1.5), argparse.Namespace(lr=1)])
def test_save_refuses_what_weights_only_cannot_load(tmp_path, bad):
    path = tmp_path / 'c.pth.tar'
    ckpt.save_checkpoint({'best_score': 1.0}, path)
    with pytest.raises(TypeError, match='weights_only'):
        ckpt.save_checkpoint({'best_score': bad}, path)
    assert ckpt.load_checkpoint(path)['best_score'] == 1.0 and os.listdir(tmp_path) == ['c.pth.tar']


def test_save_replaces_existing_file(tmp_path):
    path = tmp_path / 'c.pth.tar'
    ckpt.save_checkpoint({'epoch': 1}, path)
    ckpt.save_checkpoint({'epoch': 2}, path)
    assert ckpt.load_checkpoint(path)['epoch'] == 2 and os.listdir(tmp_path) == ['c.pth.tar']


def test_missing_file(tmp_path):
    path = tmp_path / 'nope.pth.tar'
    with pytest.raises(DataError, match='not found') as e:
        ckpt.load_checkpoint(path)
    assert str(path) in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('damage', ['truncated', 'empty', 'random', 'text'])
def test_damaged_file_is_a_one_line_data_error(tmp_path, damage):
    path = tmp_path / 'bad.pth.tar'
    ckpt.save_checkpoint({'w': torch.arange(1000.)}, path)
    data = path.read_bytes()
    path.write_bytes({'truncated': data[:len(data) // 2], 'empty': b'',
                      'random': bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8)),
                      'text': b'epoch_3: 120.5\n'}[damage])
    with pytest.raises(DataError) as e:
        ckpt.load_checkpoint(path)
    msg = str(e.value)
    assert msg.startswith(f'{path}:') and 're-download' in msg and '\n' not in msg


def test_not_a_checkpoint(tmp_path):
    tensor_file, plain_dict, newer = tmp_path / 't.pt', tmp_path / 'd.pt', tmp_path / 'n.pt'
    torch.save(torch.zeros(2), tensor_file)
    torch.save({'weight': torch.zeros(2)}, plain_dict)
    ckpt.save_checkpoint({'format_version': ckpt.FORMAT_VERSION + 1}, newer)
    with pytest.raises(DataError, match='not a checkpoint dict'):
        ckpt.load_checkpoint(tensor_file)
    with pytest.raises(DataError, match='no format_version'):
        ckpt.load_checkpoint(plain_dict)
    with pytest.raises(DataError, match='newer'):
        ckpt.load_checkpoint(newer)


def legacy_state_dicts():
    """Five state dicts in the original NRCCR release layout of docs/models.md (DataParallel `module.` prefixes)."""
    return [{'module.input_proj_layer.net.1.weight': torch.ones(2, 3)},
            {'module.text_bert.text_bert.embeddings.word_embeddings.weight': torch.ones(4, 2)},
            {'mapping.fc1.weight': torch.ones(2, 2)}, {'mapping.fc1.bias': torch.zeros(2)},
            {'discriminator.model.0.weight': torch.ones(2, 2)}]


def test_legacy_release_format_loads_through_allow_list(tmp_path):
    path = tmp_path / 'model_best.pth.tar'
    opt = argparse.Namespace(collection='vatex', layer_list=['layer.10', 'layer.11'], margin=0.2)
    torch.save({'epoch': 7, 'model': legacy_state_dicts(), 'best_rsum': 123.4, 'opt': opt, 'Eiters': 900}, path)
    with pytest.raises(Exception):      # plain weights_only loading refuses the Namespace...
        torch.load(path, weights_only=True)
    saved = ckpt.load_checkpoint(path)   # ...the allow-list accepts it
    assert saved['legacy'] is True and saved['epoch'] == 7 and saved['Eiters'] == 900
    assert saved['opt'] == {'collection': 'vatex', 'layer_list': ['layer.10', 'layer.11'], 'margin': 0.2}
    assert torch.equal(saved['model'][0]['module.input_proj_layer.net.1.weight'], torch.ones(2, 3))


def test_legacy_numpy_scalars_load(tmp_path):
    """The reference computed best_rsum with numpy: its pickle holds a numpy.float64 scalar."""
    import numpy as np
    path = tmp_path / 'model_best.pth.tar'
    torch.save({'epoch': 2, 'model': legacy_state_dicts(), 'best_rsum': np.float64(366.5),
                'opt': argparse.Namespace(a=1), 'Eiters': 9}, path)
    saved = ckpt.load_checkpoint(path)
    assert saved['best_rsum'] == 366.5 and saved['legacy'] is True


def test_namespace_outside_the_legacy_layout_is_refused(tmp_path):
    path = tmp_path / 'ns.pth.tar'
    torch.save({'model': legacy_state_dicts()[:2], 'opt': argparse.Namespace(a=1)}, path)
    with pytest.raises(DataError, match='release layout'):
        ckpt.load_checkpoint(path)


class SneakyDict(collections.OrderedDict):
    pass


class Payload:
    """Unpickling this would run code (create a marker file); the loader must never get that far."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, 'w'))


@pytest.mark.parametrize('make', [lambda tmp: SneakyDict(a=torch.ones(1)), lambda tmp: Payload(tmp / 'pwned')])
def test_other_classes_are_refused(tmp_path, make):
    path = tmp_path / 'evil.pth.tar'
    torch.save({'model': legacy_state_dicts(), 'opt': argparse.Namespace(a=1), 'extra': make(tmp_path)}, path)
    with pytest.raises(DataError, match='refusing to unpickle') as e:
        ckpt.load_checkpoint(path)
    assert str(path) in str(e.value) and '\n' not in str(e.value)
    assert not (tmp_path / 'pwned').exists()


def test_strip_module_prefix():
    inner = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    wrapped = nn.Module()
    wrapped.module = nn.Module()
    wrapped.module._orig_mod = inner            # DDP(compile(model)) key layout: 'module._orig_mod.0.weight'
    sd = wrapped.state_dict()
    assert 'module._orig_mod.1.running_mean' in sd
    stripped = ckpt.strip_module_prefix(sd)
    assert list(stripped) == list(inner.state_dict())
    assert stripped._metadata['1'] == inner.state_dict()._metadata['1']     # BatchNorm version kept
    fresh = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    fresh.load_state_dict(stripped)
    assert torch.equal(fresh[0].weight, inner[0].weight)
    other = {'_orig_mod.module.a': 1, 'encoder.module.b': 2, 'modules.c': 3}
    assert ckpt.strip_module_prefix(other) == {'a': 1, 'encoder.module.b': 2, 'modules.c': 3}
