"""util/benchmark.py: a smoke run at tiny sizes (JSON keys, positive numbers — no timings asserted), and the
pieces a wrong number would come from (synthetic data shapes, the scaled fine-tuning policy, section choice)."""
import json
import math

import numpy as np
import pytest
import torch

from util import benchmark
from util import data_provider as dp


def _positive(row, keys):
    for k in keys:
        assert isinstance(row[k], (int, float)) and math.isfinite(row[k]) and row[k] > 0, (k, row)


def test_quick_run_writes_every_section(tmp_path):
    out = tmp_path / 'bench.json'
    threads = torch.get_num_threads()
    returned = benchmark.main(['--quick', '--device', 'cpu', '--threads', '1', '--out', str(out)])
    assert torch.get_num_threads() == threads           # --threads is undone for in-process callers
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))
    assert {'machine', 'settings', 'data', 'train', 'eval', 'notes', 'total_s'} <= set(report)
    machine = report['machine']
    assert {'date', 'torch', 'python', 'cpu', 'cpu_count', 'devices'} <= set(machine)
    assert machine['threads'] == 1 and machine['devices'] == ['cpu'] and machine['torch'] == torch.__version__

    data = {(r['what'], r.get('model'), r.get('workers')): r for r in report['data']}
    assert set(data) == {('bigfile_gather', None, None), ('batch_assembly', 'nrccr', None),
                         ('batch_assembly', 'mlcmr', None), ('loader', 'nrccr', 0), ('loader', 'nrccr', 2),
                         ('loader', 'mlcmr', 0), ('loader', 'mlcmr', 2)}
    gather = data['bigfile_gather', None, None]
    _positive(gather, ['rows_per_s', 'mib_per_s'])
    assert gather['dim'] == benchmark.QUICK['dim'] and gather['rows_per_read'] == 64
    for model in ('nrccr', 'mlcmr'):
        row = data['batch_assembly', model, None]
        _positive(row, ['median_ms', 'max_ms', 'samples_per_s'])
        assert row['threads'] == 1 and row['batch'] == benchmark.QUICK['batch'] and row['target_ms'] == 50
        assert row['median_ms'] <= row['max_ms']
        for workers in (0, 2):
            _positive(data['loader', model, workers], ['samples_per_s', 'first_batch_s'])

    assert [(r['model'], r['encoder'], r['amp']) for r in report['train']] == [('nrccr', 'toy', 'off'),
                                                                            ('mlcmr', 'toy', 'off')]
    for row in report['train']:
        _positive(row, ['median_step_s', 'samples_per_s', 'params_m', 'trainable_m'])
        assert row['samples_per_s'] == pytest.approx(row['batch'] / row['median_step_s'])
        assert row['trainable_m'] < row['params_m']      # frozen BERT layers below the fine-tuned ones

    sizes = [(r['threads'], r['mode'], r['captions'], r['videos']) for r in report['eval']]
    assert sizes == [(1, m, c, v) for c, v in [benchmark.QUICK['one_thread_eval'], *benchmark.QUICK['cpu_eval']]
                     for m in ('matrix', 'embeddings')]
    for row in report['eval']:
        _positive(row, ['seconds', 'sumr'])
    assert [r.get('target_s') for r in report['eval'][:2]] == [2.0, 2.0]


def test_only_runs_the_named_sections_and_budget_skips_with_a_note(tmp_path):
    out = tmp_path / 'eval.json'
    report = benchmark.main(['--quick', '--device', 'cpu', '--only', 'eval', '--eval_budget', '0', '--out', str(out)])
    assert 'data' not in report and 'train' not in report
    # every size after the first is predicted over a zero budget: skipped and said so
    assert [(r['captions'], r['videos']) for r in report['eval']][-2:] == [benchmark.QUICK['cpu_eval'][0]] * 2
    assert len(report['notes']) == 1 and 'skipped 1,200 x 120' in report['notes'][0]


@pytest.mark.parametrize('argv', [['--only', 'data,speed'], ['--only', ','], ['--device', 'tpu'], ['--threads', '0']])
def test_bad_arguments_are_refused(argv, tmp_path, capsys):
    with pytest.raises(SystemExit):
        benchmark.main(['--quick', '--out', str(tmp_path / 'x.json'), *argv])
    assert '--' in capsys.readouterr().err
    assert not (tmp_path / 'x.json').exists()


def test_trainable_layers_scale_the_reference_policy():
    from model import MLCMR, NRCCR
    assert benchmark.trainable_layers('nrccr', 12) == NRCCR.DEFAULTS['trainable_layers']      # layer.5..11
    assert benchmark.trainable_layers('mlcmr', 12) == MLCMR.DEFAULTS['trainable_layers']      # layer.6..11
    assert benchmark.trainable_layers('nrccr', 4) == ['layer.2', 'layer.3']                  # round(7/3) = 2
    assert benchmark.trainable_layers('mlcmr', 4) == ['layer.2', 'layer.3']


def test_synthetic_collection_matches_its_description(tmp_path):
    sizes = dict(benchmark.QUICK, videos=7, frames=(3, 5), captions_per_video=2, dim=8)
    data = benchmark.Synthetic(str(tmp_path), sizes)
    store = data.store
    assert store.dim == 8 and len(data.videos) == 7
    counts = [len(store.video2frames[v]) for v in data.videos]
    assert all(3 <= n <= 5 for n in counts) and sum(counts) == len(store.bigfile)
    for name, roles, augment in (('nrccr', benchmark.NRCCR_ROLES, False), ('mlcmr', benchmark.MLCMR_ROLES, True)):
        ds = data.datasets[name]
        assert len(ds) == 14 and tuple(ds.table.tokens) == roles and ds.augment is augment
        for toks in ds.table.tokens.values():
            for ids in toks:
                assert ids.dtype == np.int32 and 12 <= len(ids) <= 32
                assert ids[0] == benchmark.CLS and ids[-1] == benchmark.SEP
                assert ids[1:-1].min() >= benchmark.FIRST_WORD
                assert ids.max() < benchmark.ENCODERS['toy']['vocab_size']
    batch = data.batch('mlcmr', 4, seed=0)
    assert batch['video']['frames'].shape[0] == 4 and batch['video']['frames'].shape[2] == 8
    assert set(batch['text']) == {'en', 'zh', 'en_masked', 'zh_masked'} and 'video_aug' in batch
    # a batch is rows of the dataset, collated as the loader does
    index = batch['index'].tolist()
    again = dp.collate([data.datasets['mlcmr'][i] for i in index])
    assert torch.equal(again['video']['frames'], batch['video']['frames'])
