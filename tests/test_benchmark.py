"""The benchmark runs end to end at tiny sizes and writes its JSON (no timing is asserted)."""
import json

from util import benchmark


def test_quick_benchmark_writes_json(tmp_path):
    out = tmp_path / 'bench.json'
    benchmark.main(['--quick', '--device', 'cpu', '--out', str(out)])
    report = json.loads(out.read_text())
    assert report['machine']['device'] == 'cpu'
    assert {'bigfile_rows_per_s', 'batch_assembly_ms', 'loader_samples_per_s_workers0',
            'loader_samples_per_s_workers2'} <= set(report['data'])
    assert all(v > 0 for v in report['data'].values())
    assert {(r['model'], r['bert']) for r in report['train']} == {('nrccr', 'toy'), ('mlcmr', 'toy')}
    assert all(r['samples_per_s'] > 0 for r in report['train'])
    assert {r['mode'] for r in report['eval']} == {'matrix', 'embeddings'}
