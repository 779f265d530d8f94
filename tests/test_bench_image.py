"""util/bench/image.py: a smoke run at tiny sizes (row keys, positive numbers — no timings asserted), and the two
paths feeding the model the same features."""
import json
import math

import torch

from util.bench import image as bench_image


def test_quick_run_rows(tmp_path):
    out = tmp_path / 'bench.json'
    threads = torch.get_num_threads()
    rows = bench_image.main(['--quick', '--device', 'cpu', '--threads', '1', '--out', str(out)])
    assert torch.get_num_threads() == threads
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    assert [r['path'] for r in rows] == ['cached_features', 'clip_per_step']
    for r in rows:
        assert (r['what'], r['device'], r['batch'], r['clip'], r['bert']) == ('image_train', 'cpu', 4, 'tiny', 'tiny')
        for k in ('median_step_s', 'samples_per_s'):
            assert math.isfinite(r[k]) and r[k] > 0
        assert math.isclose(r['samples_per_s'], r['batch'] / r['median_step_s'])
    assert math.isclose(rows[0]['speedup_vs_clip_per_step'], rows[0]['samples_per_s'] / rows[1]['samples_per_s'])


def test_both_paths_give_the_model_the_same_features():
    clip, model = bench_image.build_models(bench_image.QUICK, torch.device('cpu'))
    batch = bench_image.make_batches(1, 3, bench_image.CLIP_CONFIGS['tiny'], 200)[0]
    with torch.no_grad():
        batch['features'] = clip(pixel_values=batch['pixels']).image_embeds
    seen = []
    real = model.video_encoder.forward
    model.video_encoder.forward = lambda frames, mask: seen.append(frames.clone()) or real(frames, mask)
    opts = model.configure_optimizers(1e-4, 1e-3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bench_image.train_step(model, opts, batch, torch.device('cpu'))
    model.load_state_dict(state)
    bench_image.train_step(model, opts, batch, torch.device('cpu'), clip)
    assert len(seen) == 2 and seen[0].shape == (3, 1, 16)
    torch.testing.assert_close(seen[0], seen[1])
