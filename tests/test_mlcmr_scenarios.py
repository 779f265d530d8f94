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


@pytest.mark.parametrize('model,batch,expected', [('mlcmr', 12, 12), ('nrccr', 12, 12)])
def test_validation_batch_follows_the_original(toy_root, monkeypatch, model, batch, expected):
    """Both originals validate with their training batch size (only their testers use 64 / 16): read off the run's
    args.json and off the batches validation encoded."""
    import evaluation
    seen, real = [], evaluation.encode_split
    monkeypatch.setattr(evaluation, 'encode_split', lambda m, d, batch_size, *a, **k:
                        seen.append(batch_size) or real(m, d, batch_size, *a, **k))
    argv = tiny_train_argv(toy_root, f'valbatch{batch}', '--model', model, '--num_epochs', '0', '--skip_test', '1')
    i = argv.index('--eval_batch_size')
    del argv[i:i + 2]                                        # the default, not the tests' 8
    argv[argv.index('--batch_size') + 1] = str(batch)
    run = trainer.main(argv)['run_dir']
    with open(os.path.join(run, 'args.json')) as f:
        assert json.load(f)['val_batch_size'] == expected
    assert seen == [expected]                                # --num_epochs 0 validates the untrained model once
