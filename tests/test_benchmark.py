"""util/benchmark.py: a smoke run at tiny sizes (JSON keys, positive numbers — no timings asserted), and the
pieces a wrong number would come from (synthetic data shapes, the scaled fine-tuning policy, section choice)."""
import json
import math

import numpy as np
import pytest
import torch

from util import benchmark
from basic import data_provider as dp


def _positive(row, keys):
    for k in keys:
        assert isinstance(row[k], (int, float)) and math.isfinite(row[k]) and row[k] > 0, (k, row)


def test_quick_run_writes_every_section(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    threads = torch.get_num_threads()
    returned = benchmark.main(['--quick', '--device', 'cpu', '--threads', '1', '--out', str(out),
                               '--amps', 'off,bf16', '--profile', '--profile_rows', '5'])
    assert torch.get_num_threads() == threads           # --threads is undone for in-process callers
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))
    assert {'machine', 'settings', 'peak', 'data', 'train', 'profile', 'components', 'encode', 'eval', 'image',
            'search', 'page', 'epoch', 'notes', 'total_s'} <= set(report)
    assert 'compile' not in report                      # asked for by name only (minutes per configuration)
    machine = report['machine']
    assert {'date', 'torch', 'python', 'cpu', 'cpu_count', 'devices'} <= set(machine)
    assert machine['threads'] == 1 and machine['devices'] == ['cpu'] and machine['torch'] == torch.__version__

    # the matrix-product peak of each precision the runs use, measured in this run
    assert [(r['device'], r['dtype'], r['n']) for r in report['peak']] == [('cpu', 'fp32', 128), ('cpu', 'bf16', 128)]
    for row in report['peak']:
        _positive(row, ['best_s', 'flops_per_s'])
        assert row['flops_per_s'] == pytest.approx(2 * 128 ** 3 / row['best_s'])
    peak = {r['dtype']: r['flops_per_s'] for r in report['peak']}

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

    # fp32 and bf16 side by side, each with its MFU against its own precision's peak
    assert [(r['model'], r['encoder'], r['amp']) for r in report['train']] == [
        ('nrccr', 'toy', 'off'), ('mlcmr', 'toy', 'off'), ('nrccr', 'toy', 'bf16'), ('mlcmr', 'toy', 'bf16')]
    for row in report['train']:
        _positive(row, ['median_step_s', 'samples_per_s', 'params_m', 'trainable_m', 'flops_per_sample',
                        'achieved_flops_per_s', 'mfu'])
        assert row['samples_per_s'] == pytest.approx(row['batch'] / row['median_step_s'])
        assert row['trainable_m'] < row['params_m']      # frozen BERT layers below the fine-tuned ones
        assert row['achieved_flops_per_s'] == pytest.approx(row['flops_per_sample'] * row['samples_per_s'])
        assert row['mfu'] == pytest.approx(row['achieved_flops_per_s'] / peak['fp32' if row['amp'] == 'off' else 'bf16'])
    by = {(r['model'], r['amp']): r for r in report['train']}
    for model in ('nrccr', 'mlcmr'):       # autocast changes the precision, not the products computed
        assert by[model, 'off']['flops_per_sample'] == by[model, 'bf16']['flops_per_sample']

    # one profiled step per model and precision, its top ops
    assert [(r['model'], r['amp']) for r in report['profile']] == [('nrccr', 'off'), ('mlcmr', 'off'),
                                                                   ('nrccr', 'bf16'), ('mlcmr', 'bf16')]
    for row in report['profile']:
        assert len(row['ops']) == 5 and all(op['self_ms'] >= 0 and 0 <= op['share'] <= 1 for op in row['ops'])
        assert [op['self_ms'] for op in row['ops']] == sorted((op['self_ms'] for op in row['ops']), reverse=True)
    assert 'top 5 ops by self time' in capsys.readouterr().out
    # each component alone in each precision
    assert [(r['model'], r['component'], r['amp']) for r in report['components']] == [
        (m, c, a) for m in ('nrccr', 'mlcmr') for c in benchmark.COMPONENTS[m] for a in ('off', 'bf16')]
    for row in report['components']:
        _positive(row, ['seconds'])

    # caption encoding: file order vs length buckets, same embeddings, less padding, fewer FLOPs
    texts = [r for r in report['encode'] if r['what'] == 'encode_texts']
    assert [(r['model'], r['amp'], r['order']) for r in texts] == [
        (m, a, o) for a in ('off', 'bf16') for m in ('nrccr', 'mlcmr') for o in ('file', 'length')]
    for file_row, length_row in zip(texts[::2], texts[1::2]):
        for row in (file_row, length_row):
            _positive(row, ['seconds', 'captions_per_s', 'flops_per_caption', 'achieved_flops_per_s', 'mfu'])
            assert row['captions'] == benchmark.QUICK['encode_captions'] and row['streams'] == 2
        assert length_row['padding_fraction'] < file_row['padding_fraction']
        assert length_row['flops_per_caption'] < file_row['flops_per_caption']
        if length_row['amp'] == 'off':
            assert length_row['max_abs_diff_vs_file_order'] < 1e-5
    videos = [r for r in report['encode'] if r['what'] == 'encode_videos']
    assert [(r['model'], r['amp']) for r in videos] == [(m, a) for a in ('off', 'bf16') for m in ('nrccr', 'mlcmr')]
    for row in videos:
        _positive(row, ['seconds', 'videos_per_s', 'flops_per_video', 'mfu'])
        assert row['videos'] == benchmark.QUICK['videos']

    sizes = [(r['threads'], r['mode'], r['captions'], r['videos']) for r in report['eval']]
    assert sizes == [(1, m, c, v) for c, v in [benchmark.QUICK['one_thread_eval'], *benchmark.QUICK['cpu_eval']]
                     for m in ('matrix', 'embeddings')]
    for row in report['eval']:
        _positive(row, ['seconds', 'sumr'])
    assert [r.get('target_s') for r in report['eval'][:2]] == [2.0, 2.0]

    # image: cached CLIP features vs a CLIP forward per batch (util/bench/image.py)
    assert [(r['what'], r['path'], r['device']) for r in report['image']] == [
        ('image_train', 'cached_features', 'cpu'), ('image_train', 'clip_per_step', 'cpu')]
    for row in report['image']:
        _positive(row, ['median_step_s', 'samples_per_s'])
    # search: indexing and the exact search at each quick gallery size (FAISS rows only where installed)
    names = [r['name'] for r in report['search']]
    first_gallery = benchmark.bench_search.QUICK['galleries'][0]
    assert names[0] == 'index_videos_per_s' and f'search_exact_{first_gallery}' in names
    for row in report['search']:
        assert row['device'] == 'cpu'
        _positive(row, ['value'])
    # page: latency under concurrent clients and no errors (empty where starlette / uvicorn are missing)
    page = {r['name']: r['value'] for r in report['page']}
    assert not page or (page['page_errors'] == 0 and page['page_query_p50'] > 0
                        and page['page_queries'] == benchmark.bench_page.QUICK['clients']
                        * benchmark.bench_page.QUICK['queries_per_client'])
    # epoch: trainer.py processes, NRCCR and MLCMR side by side, --amp off and auto, the other defaults
    assert [(r['model'], r['amp']) for r in report['epoch']] == [
        (m, a) for a in ('off', 'auto') for m in ('nrccr', 'mlcmr')]
    for row in report['epoch']:
        _positive(row, ['wall_s', 'epoch_s', 'samples_per_s', 'peak_rss_gib'])
        assert row['epoch_s'] < row['wall_s'] and row['compile'].startswith('eager (--compile auto')
    assert report['epoch'][0]['amp_resolved'] == 'fp32 (--amp off)'


def test_compile_section_times_eager_and_compiled_calls_and_counts_recompilations(tmp_path, monkeypatch):
    """--only compile: the training step and both evaluation encoders, eager against compiled, per model. Here
    dynamo hands its graphs to the eager backend (inductor takes minutes on a CPU): the rows, the graph counts
    and the absence of recompilations over the three lengths are what is checked, not the speed."""
    from basic import compiling
    real = compiling.compile_forward
    monkeypatch.setattr(compiling, 'compile_forward', lambda module: real(module, backend='eager'))
    report = benchmark.main(['--quick', '--device', 'cpu', '--threads', '1', '--only', 'compile', '--amps', 'off',
                             '--out', str(tmp_path / 'c.json')])
    assert [(r['what'], r['model'], r['encoder'], r['amp']) for r in report['compile']] == [
        (w, m, 'toy', 'off') for m in ('nrccr', 'mlcmr') for w in ('train_step', 'encode_texts', 'encode_videos')]
    for row in report['compile']:
        _positive(row, ['eager_s', 'compiled_s', 'speedup', 'graphs'])
        assert row['recompiles'] == 0 and row['compile_s'] >= 0
        assert (row['pays_after_calls'] is None) == (row['compiled_s'] >= row['eager_s'])


def test_only_runs_the_named_sections_and_budget_skips_with_a_note(tmp_path):
    out = tmp_path / 'eval.json'
    report = benchmark.main(['--quick', '--device', 'cpu', '--only', 'eval', '--eval_budget', '0', '--out', str(out)])
    assert 'data' not in report and 'train' not in report and 'peak' not in report and 'encode' not in report
    # every size after the first is predicted over a zero budget: skipped and said so
    assert [(r['captions'], r['videos']) for r in report['eval']][-2:] == [benchmark.QUICK['cpu_eval'][0]] * 2
    assert len(report['notes']) == 1 and 'skipped 1,200 x 120' in report['notes'][0]


@pytest.mark.parametrize('argv', [['--only', 'data,speed'], ['--only', ','], ['--device', 'tpu'], ['--threads', '0'],
                                  ['--amps', 'fp8'], ['--amps', ','], ['--search_index', 'annoy']])
def test_bad_arguments_are_refused(argv, tmp_path, capsys):
    with pytest.raises(SystemExit):
        benchmark.main(['--quick', '--out', str(tmp_path / 'x.json'), *argv])
    assert '--' in capsys.readouterr().err
    assert not (tmp_path / 'x.json').exists()


def test_the_benchmark_steps_as_the_trainer_does(tmp_path):
    """The benchmark's optimiser settings are the trainer's defaults, and its step is the trainer's
    (basic/training.py train_step: the NRCCR discriminator moves too)."""
    import trainer
    parser = trainer.get_args_parser()
    assert (benchmark.LEARNING_RATE, benchmark.DISC_LEARNING_RATE, benchmark.GRAD_CLIP) == tuple(
        parser.get_default(k) for k in ('learning_rate', 'glr', 'grad_clip'))
    from basic import training
    assert benchmark.train_step is training.train_step
    data = benchmark.Synthetic(str(tmp_path), dict(benchmark.QUICK, videos=6, frames=(3, 5), captions_per_video=2))
    setup = benchmark.TrainSetup('nrccr', 'toy', data.store.dim, benchmark.QUICK['model_overrides']['nrccr'],
                                 torch.device('cpu'), 'off')
    before = [p.detach().clone() for p in setup.model.discriminator.parameters()]
    logs = setup.step(data.batch('nrccr', 4, seed=0))
    assert {'loss', 'loss_disc', 'real_acc'} <= set(logs)
    assert all(torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad for v in logs.values())
    assert not all(torch.equal(a, b) for a, b in zip(before, setup.model.discriminator.parameters()))


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


def test_flop_count_of_a_linear_step_and_of_cpu_attention():
    """Hand counts: Linear(8 -> 4) on 3 rows is 2*3*8*4 = 192 FLOPs forward, twice that backward (input and
    weight gradients). Attention q (1,2,5,4), k (1,2,6,4), v (1,2,6,3): QK^T 2*2*5*4*6 = 480, PV 2*2*5*6*3 = 360.
    Without gradients a CPU runs the fused kernel, which FlopCounterMode's own table lacks (it would count 0).
    That kernel wants one head size: with v (1,2,6,4) every product is 2*2*5*6*4 = 480, so 960 forward, and
    its backward recomputes QK^T, then dP, dV, dQ, dK: 5 * 480 = 2400. With
    gradients torch takes the unfused path, whose products are counted as they run: dP + dQ when only q needs
    a gradient, all four when every input does."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    _, forward = benchmark.count_flops(layer, x)
    assert forward == 192
    _, both = benchmark.count_flops(lambda: layer(x).sum().backward())
    assert both == 3 * 192

    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 3)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        assert benchmark.count_flops(sdpa, q, k, v)[1] == 840
        v4 = torch.randn(1, 2, 6, 4)
        fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        (out, logsumexp), forward = benchmark.count_flops(fused, q, k, v4)
        assert forward == 960
        _, backward = benchmark.count_flops(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward,
                                            torch.ones_like(out), q, k, v4, out, logsumexp, 0.0, False)
        assert backward == 2400
    q.requires_grad_(True)
    assert benchmark.count_flops(lambda: sdpa(q, k, v).sum().backward())[1] == 840 + 360 + 480
    k.requires_grad_(True), v.requires_grad_(True)
    assert benchmark.count_flops(lambda: sdpa(q, k, v).sum().backward())[1] == 840 + 360 + 360 + 480 + 480


def test_matmul_peak_row():
    row = benchmark.matmul_peak(torch.device('cpu'), torch.float32, 64, 2)
    assert row['dtype'] == 'fp32' and row['n'] == 64 and row['reps'] == 2
    assert row['flops_per_s'] == pytest.approx(2 * 64 ** 3 / row['best_s'])


def test_auto_amps_follow_the_hardware(monkeypatch):
    from basic import precision
    cpu = torch.device('cpu')
    monkeypatch.setattr(precision, 'bf16_support', lambda device: (True, 'CPU has avx512_bf16'))
    assert benchmark.train_amps(cpu, 'auto') == ['off', 'bf16']
    monkeypatch.setattr(precision, 'bf16_support', lambda device: (False, 'CPU lacks avx512_bf16 and amx_bf16'))
    assert benchmark.train_amps(cpu, 'auto') == ['off']
    assert benchmark.train_amps(cpu, 'bf16, off') == ['bf16', 'off']


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message on a machine without CUDA')
def test_gpu_check_without_a_gpu_says_so_and_exits_cleanly(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path
    script = Path(benchmark.__file__).with_name('gpu_check.sh')
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES='')
    done = subprocess.run(['bash', str(script), str(tmp_path / 'out')], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0
    assert done.stdout.startswith('gpu_check: no CUDA device visible to torch')
    assert not (tmp_path / 'out').exists()           # nothing run, nothing written
