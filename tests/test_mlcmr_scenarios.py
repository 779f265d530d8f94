"""MLCMR in its three scenarios: one epoch on the tiny toy collection, then the tester (issue #4)."""
import json
import os

import pytest

import tester
import trainer
from conftest import tiny_train_argv


@pytest.mark.parametrize('train_mode,label_situation,target,files', [
    ('parallel', 'human_label', 'zh', ('toytrain.caption.txt', 'toytrain_zh.caption.txt')),
    ('parallel', 'translate', 'zh', ('toytrain.caption.txt', 'toytrain_google_enc2zh.caption.txt')),
    ('parallel', 'translate', 'en', ('toytrain_google_zhc2en.caption.txt', 'toytrain_zh.caption.txt')),
    ('unparallel', 'translate', 'zh', ()),
])
def test_scenario_trains_and_tests(toy_root, train_mode, label_situation, target, files):
    result = trainer.main(tiny_train_argv(
        toy_root, 'scn', '--model', 'mlcmr', '--train_mode', train_mode, '--label_situation', label_situation,
        '--target_language', target, '--num_epochs', '1'))
    run = result['run_dir']
    assert f'mlcmr_toy_feature_{train_mode}_{label_situation}_{target}_cfg' in run
    with open(os.path.join(run, 'train.log')) as f:
        log = f.read()
    for name in files:
        assert name in log                                  # the caption files of the scenario were read
    if train_mode == 'unparallel':
        assert 'derived a non-parallel split' in log
    record = json.loads(open(os.path.join(run, 'metrics.jsonl')).readline())
    assert {'val_en/t2v_r1', 'val_zh/t2v_r1'} <= set(record)      # distinct tags per language
    assert record['score'] == pytest.approx(sum(record[f'val_{lang}/{d}_r{k}'] for lang in ('en', 'zh')
                                                for d in ('t2v', 'v2t') for k in (1, 5, 10)))
    test = result['test']
    (label, metrics), = test['metrics'].items()
    w = 0.85 if label_situation == 'human_label' else 0.55
    assert label == f'w_{target}={w}'
    assert 0 <= metrics['t2v_r1'] <= 100 and metrics['sumr'] > 0
    assert test['results_dir'].endswith(f'_test_{target}')


def test_other_language_does_not_overwrite_results(toy_root):
    """The original tester's output path ignored the language, so the second language was skipped."""
    run = trainer.main(tiny_train_argv(toy_root, 'lang', '--model', 'mlcmr', '--num_epochs', '1',
                                       '--skip_test', '1'))['run_dir']
    common = ['--rootpath', toy_root, '--logger_name', run, '--device', 'cpu', '--workers', '0']
    zh = tester.main(common + ['--target_language', 'zh'])
    en = tester.main(common + ['--target_language', 'en'])
    assert zh['results_dir'] != en['results_dir'] and not en.get('skipped')
    with open(os.path.join(en['results_dir'], 'report.txt')) as f:
        assert 'toytest.caption.txt' in f.read()             # English queries for target en
