"""Model building blocks and both models: shapes, norms, gradients, parity switches, legacy checkpoints."""
import argparse
import math
import os

import numpy as np
import pytest
import torch

import model as models
from nets import common, mlcmr, nrccr
from basic import checkpoint as ckpt
from basic import precision


def small_cfg(root, name, **overrides):
    base = dict(bert_name=os.path.join(root, 'tiny_bert'), visual_feat_dim=32, mapping_dim=48)
    if name == 'nrccr':
        base.update(trainable_layers=['layer.2', 'layer.3'], text_hidden_size=32, video_hidden_size=32,
                    text_num_attention=4, visual_num_attention=4)
    else:
        base.update(trainable_layers=['layer.3'], visual_rnn_size=16, visual_kernel_num=8)
    base.update(overrides)
    return models.model_config(name, **base)


def fake_stream(B, L, vocab=200, lengths=None):
    lengths = lengths or [L - (i % 3) for i in range(B)]
    ids = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(104, vocab, (n,))
        ids[i, 0], ids[i, n - 1] = 101, 102
        mask[i, :n] = 1
    return {'ids': ids, 'mask': mask, 'lengths': torch.tensor(lengths)}


def fake_video(B, L, D=32, lengths=None):
    lengths = lengths or [L - (i % 4) for i in range(B)]
    frames = torch.zeros(B, L, D)
    mask = torch.zeros(B, L)
    for i, n in enumerate(lengths):
        frames[i, :n] = torch.randn(n, D)
        mask[i, :n] = 1
    return {'frames': frames, 'mask': mask, 'lengths': torch.tensor(lengths), 'mean': torch.randn(B, D)}


def nrccr_batch(B=6):
    vid = torch.arange(B) // 2                         # two captions per video
    return {'video': fake_video(B, 9), 'text': {'src': fake_stream(B, 7), 'tr': fake_stream(B, 8),
                                               'bt': fake_stream(B, 6)},
            'video_index': vid, 'same_video': (vid[:, None] == vid[None]) & ~torch.eye(B, dtype=torch.bool)}


# ============ building blocks ============

def test_attention_block_matches_hand_formula():
    """One head, H=4, key size 4: scores Q K^T / sqrt(H/h), additive mask, residual + LayerNorm."""
    torch.manual_seed(0)
    block = nrccr.AttentionBlock(hidden=4, heads=1, key_size=4, dropout=0.0).eval()
    x = torch.randn(1, 3, 4)
    m = torch.tensor([[1.0, 1.0, 0.0]])
    q, k, v = block.self.query(x), block.self.key(x), block.self.value(x)
    scores = q @ k.transpose(1, 2) / math.sqrt(4 / 1) + (1 - m[:, :, None] * m[:, None, :]) * -10000.0
    ctx = scores.softmax(-1) @ v
    expected = block.output.LayerNorm(block.output.dense(ctx) + x)
    assert torch.allclose(block(x, x, m, m), expected, atol=1e-6)
    cross = block.output.LayerNorm(block.output.dense(ctx))          # cross mode: no residual
    assert torch.allclose(block(x, x, m, m, cross=True), cross, atol=1e-6)


def test_attention_scale_switch():
    parity = nrccr.AttentionBlock(hidden=768, heads=8)
    clean = nrccr.AttentionBlock(hidden=768, heads=8, scale_by_key=True)
    assert parity.scale == pytest.approx(1 / math.sqrt(96)) and clean.scale == pytest.approx(1 / math.sqrt(64))


def test_pooling_parity_and_masked():
    x = torch.tensor([[[1.0], [3.0], [0.0], [0.0]]])
    m = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert common.pool(x, m, masked=False).item() == pytest.approx(1.0)    # (1+3+0+0)/4, padding included
    assert common.pool(x, m, masked=True).item() == pytest.approx(2.0)


def test_resblock_residual_switch():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5)
    parity, clean = nrccr.ResBlock(4, True), nrccr.ResBlock(4, False)
    clean.load_state_dict(parity.state_dict())
    body = 0.3 * parity.conv2(torch.relu(parity.conv1(torch.relu(x))))
    assert torch.allclose(parity(x), torch.relu(x) + body, atol=1e-6)
    assert torch.allclose(clean(x), x + body, atol=1e-6)


def test_mfc_is_unit_norm_and_xavier_init():
    torch.manual_seed(0)
    mfc = common.MFC(100, 50)
    bound = math.sqrt(6 / 150)
    assert mfc.fc1.weight.abs().max() <= bound and torch.all(mfc.fc1.bias == 0)
    out = mfc(torch.randn(8, 100))
    assert torch.allclose(out.norm(dim=1), torch.ones(8), atol=1e-5)


@pytest.mark.parametrize('kind', ['weak', 'not-so-weak', 'strong'])
def test_discriminator_kinds(kind):
    d = nrccr.Discriminator(32, kind)
    assert d(torch.randn(3, 5, 32), torch.ones(3, 5)).shape == (3, 2)


# ============ NRCCR ============

def test_nrccr_training_step_shapes_and_frozen_layers(toy_root):
    torch.manual_seed(0)
    model = models.build_model(small_cfg(toy_root, 'nrccr'))
    opts = model.configure_optimizers(1e-3)
    out = model(nrccr_batch())
    for key in ('v', 'c_src', 'c_tr', 'c_cross', 'c_bt'):
        assert out[key].shape == (6, 48)
        assert torch.allclose(out[key].norm(dim=1), torch.ones(6), atol=1e-5)
    logs = model.discriminator_step(out, opts)
    loss, loss_logs = model.training_loss(out)
    logs.update(loss_logs)
    assert math.isfinite(loss.item()) and {'tri_src', 'dtl', 'loss_disc', 'gen'} <= set(logs)
    opts['main'].zero_grad()
    loss.backward()
    for name, p in model.text_encoder.bert.named_parameters():
        trained = name.startswith('encoder.layer.2.') or name.startswith('encoder.layer.3.')
        assert p.requires_grad == trained, name
        if trained and 'LayerNorm' not in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        if not trained:
            assert p.grad is None, name
    assert all(p.grad is not None for p in model.video_encoder.parameters())


def test_layer_list_matches_exact_indices(toy_root):
    """The reference's substring test would let 'layer.1' select layers 10 and 11 too."""
    bert = common.load_pretrained_bert(os.path.join(toy_root, 'tiny_bert'))
    common.set_bert_trainable(bert, 'frozen', ['layer.1'])
    trained = {n.split('.')[2] for n, p in bert.named_parameters() if p.requires_grad}
    assert trained == {'1'}
    common.set_bert_trainable(bert, 'all_frozen', ['layer.1'])
    assert not any(p.requires_grad for p in bert.parameters())


def test_discriminator_step_updates_only_discriminator(toy_root):
    torch.manual_seed(0)
    model = models.build_model(small_cfg(toy_root, 'nrccr', disc_type='strong'))
    opts = model.configure_optimizers(1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.discriminator_step(model(nrccr_batch()), opts)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith('discriminator.') for n in changed)


def test_embeddings_independent_of_batch_order_and_mode(toy_root):
    """Eval embeddings are per-row deterministic: permuting the batch permutes the output."""
    torch.manual_seed(0)
    model = models.build_model(small_cfg(toy_root, 'nrccr')).eval()
    batch = nrccr_batch()
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    permuted = {k: v[perm] for k, v in batch['video'].items()}
    with torch.no_grad():
        assert torch.allclose(model.embed_videos(batch['video'])[perm], model.embed_videos(permuted), atol=1e-5)
        emb = model.embed_texts({'primary': batch['text']['src']})['primary']
        assert emb.shape == (6, 48)


def test_masked_pooling_makes_embeddings_padding_free(toy_root):
    torch.manual_seed(0)
    model = models.build_model(small_cfg(toy_root, 'nrccr', masked_pooling=True)).eval()
    video = fake_video(2, 5, lengths=[5, 3])
    padded = {k: v for k, v in video.items()}
    padded['frames'] = torch.cat([video['frames'], torch.zeros(2, 4, 32)], 1)
    padded['mask'] = torch.cat([video['mask'], torch.zeros(2, 4)], 1)
    with torch.no_grad():
        assert torch.allclose(model.embed_videos(video), model.embed_videos(padded), atol=1e-5)


# ============ MLCMR ============

def mlcmr_batch(B=6):
    vid = torch.arange(B)
    text = {'en': fake_stream(B, 7), 'zh': fake_stream(B, 9)}
    text.update({f'{k}_masked': fake_stream(B, v['ids'].shape[1]) for k, v in list(text.items())})
    return {'video': fake_video(B, 9), 'video_aug': fake_video(B, 3, lengths=[2] * B + []),
            'text': text, 'video_index': vid, 'same_video': torch.zeros(B, B, dtype=torch.bool)}


@pytest.mark.parametrize('concate,packed', [('full', False), ('reduced', True)])
def test_mlcmr_video_encoder_levels(toy_root, concate, packed):
    torch.manual_seed(0)
    model = models.build_model(small_cfg(toy_root, 'mlcmr', concate=concate, packed_gru=packed))
    enc = model.video_encoder
    assert enc.out_dim == 32 + 4 * 8 + (32 if concate == 'full' else 0)
    video = fake_video(4, 6)
    feats = enc(video)
    assert feats.shape == (4, enc.out_dim)
    if concate == 'full':                   # the last D_v entries are the frame mean, untouched
        assert torch.equal(feats[:, -32:], video['mean'])


def conv2d_level3(enc, states):
    """The original's level 3, written independently: the masked GRU states as a one-channel image
    (B, 1, L, 2*rnn), each Conv2d(1, K, (k, 2*rnn)), ReLU, max over the L + k - 1 positions."""
    x = states.unsqueeze(1)
    return torch.cat([torch.relu(conv(x)).squeeze(3).amax(dim=2) for conv in enc.convs], dim=1)


def test_mlcmr_conv1d_form_matches_the_conv2d_form(toy_root):
    """Level 3 runs as Conv1d over the GRU states with the Conv2d weights viewed (K, 2*rnn, k): outputs and
    gradients (input, weights, biases) equal the original Conv2d form within float rounding (1e-5 relative),
    on random states and weights; checkpoint keys and shapes stay the Conv2d ones."""
    torch.manual_seed(0)
    model = models.build_model(small_cfg(toy_root, 'mlcmr', visual_rnn_size=24, visual_kernel_num=16))
    enc = model.video_encoder
    assert [tuple(c.weight.shape) for c in enc.convs] == [(16, 1, k, 48) for k in (2, 3, 4, 5)]
    for conv in enc.convs:                            # random biases too (they start near zero)
        torch.nn.init.normal_(conv.bias)
    states = torch.randn(5, 11, 48)
    results = []
    for form in ('conv1d', 'conv2d'):
        x = states.clone().requires_grad_(True)
        y = (torch.cat([torch.relu(mlcmr.conv1d(x.transpose(1, 2), c)).amax(dim=2) for c in enc.convs], dim=1)
             if form == 'conv1d' else conv2d_level3(enc, x))
        params = [p for c in enc.convs for p in (c.weight, c.bias)]
        grads = torch.autograd.grad((y * torch.linspace(-1, 2, y.numel()).view_as(y)).sum(), [x] + params)
        results.append([y.detach(), *grads])
    for new, ref in zip(*results):
        assert new.shape == ref.shape
        assert (new - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_mlcmr_encoder_equals_the_conv2d_form_end_to_end(toy_root):
    """The whole video encoder (eval mode, padded videos) against the same encoder with level 3 recomputed
    in the original Conv2d form from its own GRU states."""
    torch.manual_seed(1)
    model = models.build_model(small_cfg(toy_root, 'mlcmr')).eval()
    enc, video = model.video_encoder, fake_video(4, 7)
    with torch.no_grad():
        feats = enc(video)
        out, _ = enc.rnn(video['frames'])
        ref = conv2d_level3(enc, out * video['mask'].unsqueeze(-1))
    g3 = feats[:, 32:32 + 4 * 8]
    assert (g3 - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize('fp32_rnn', [True, False])
def test_mlcmr_gru_precision_under_cpu_autocast(toy_root, fp32_rnn):
    """docs/training.md, 'Mixed precision': on a CPU without a fast bf16 GRU the GRU runs in fp32 inside a
    bf16 autocast (exactly the fp32 states); where bf16 is faster it stays under autocast (bf16 rounding)."""
    torch.manual_seed(0)
    enc = models.build_model(small_cfg(toy_root, 'mlcmr')).video_encoder
    enc.cpu_rnn_fp32 = fp32_rnn
    video = fake_video(3, 6)
    with torch.no_grad():
        fp32, _ = enc.rnn(video['frames'])
        with torch.autocast('cpu', dtype=torch.bfloat16):
            states = enc._rnn(video['frames'], video['lengths'])
    assert torch.equal(states.float(), fp32) == fp32_rnn


def test_mlcmr_bf16_gru_leaves_inference_mode(toy_root):
    """Evaluation encodes under inference mode, where oneDNN's bf16 GRU kernel is not taken (17x slower than
    fp32 on an AMX CPU): under a CPU bf16 autocast the GRU runs outside inference mode, without autograd, and
    gives the states it gives under no_grad."""
    torch.manual_seed(0)
    enc = models.build_model(small_cfg(toy_root, 'mlcmr')).video_encoder.eval()
    enc.cpu_rnn_fp32 = False
    video = fake_video(3, 6)
    seen, real = [], enc.rnn.forward
    enc.rnn.forward = lambda *a, **k: seen.append((torch.is_inference_mode_enabled(),
                                                    torch.is_grad_enabled())) or real(*a, **k)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        with torch.no_grad():
            expected = enc(video)
        with torch.inference_mode():
            got = enc(video)
    assert seen == [(False, False), (False, False)]
    assert torch.equal(got, expected)


def test_cpu_fast_bf16_rnn_needs_amx():
    assert precision.cpu_fast_bf16_rnn({'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile'})
    assert not precision.cpu_fast_bf16_rnn({'avx512f', 'avx512_bf16'})


def test_mlcmr_loss_terms(toy_root):
    torch.manual_seed(0)
    model = models.build_model(small_cfg(toy_root, 'mlcmr'))
    loss, logs = model.training_loss(model(mlcmr_batch()))
    expected = float(sum(logs[k] for k in ('nce_video', 'tri_en', 'nce_en', 'tri_zh', 'nce_zh')))
    assert loss.item() == pytest.approx(expected, rel=1e-5) and logs['loss'] == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.video_encoder.parameters())


@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_mlcmr_embeddings_are_unit_norm(toy_root, mode):
    """Every MLCMR embedding (videos, frame-dropped videos, each caption stream and its masked copy) lies on
    the unit sphere, in training and in evaluation (docs/models.md, 'Latent mapping')."""
    torch.manual_seed(0)
    model = models.build_model(small_cfg(toy_root, 'mlcmr'))
    getattr(model, mode)()
    batch = mlcmr_batch()
    with torch.no_grad():
        out = model(batch)
        embedded = {'videos': model.embed_videos(batch['video']), **model.embed_texts(batch['text'])}
    for name, emb in [(k, out[k]) for k in ('v', 'v_aug', 'en', 'zh', 'en_masked', 'zh_masked')] + \
            list(embedded.items()):
        assert torch.allclose(emb.norm(dim=1), torch.ones(len(emb)), atol=1e-5), name


def hand_t2v_score(primary, second, cap2vid, w):
    """t2v R@1 + R@5 + R@10 (percent) of w * minmax(primary) + (1 - w) * minmax(second), by hand."""
    def minmax(m):
        return (m - m.min()) / (m.max() - m.min())
    fused = w * minmax(primary) + (1 - w) * minmax(second)
    ranks = np.array([1 + int((row > row[c]).sum()) for row, c in zip(fused, cap2vid)])
    return sum(100.0 * np.mean(ranks <= k) for k in (1, 5, 10)), 100.0 * np.mean(ranks <= 1)


def test_nrccr_validation_score_is_the_sim_ratio_fusion(toy_root):
    """docs/training.md, 'Validation score': t2v R@1+5+10 of the min-max fusion with --sim_ratio on the English
    MT (the primary stream) and 1 - sim_ratio on the human caption, on an input where swapping them changes
    the score."""
    rng = np.random.default_rng(0)
    n_captions, n_videos = 40, 20
    cap2vid = np.arange(n_captions) % n_videos
    primary = rng.standard_normal((n_captions, n_videos))            # the English MT: a weak signal, wide range
    second = rng.standard_normal((n_captions, n_videos)) * 0.1        # the human caption: a strong one
    primary[np.arange(n_captions), cap2vid] += 0.8
    second[np.arange(n_captions), cap2vid] += 0.12
    model = models.build_model(small_cfg(toy_root, 'nrccr', sim_ratio=0.2))
    score, logs = model.validation_score({'primary': torch.from_numpy(primary), 'second': torch.from_numpy(second)},
                                         torch.from_numpy(cap2vid))
    expected, r1 = hand_t2v_score(primary, second, cap2vid, 0.2)
    assert hand_t2v_score(primary, second, cap2vid, 0.8)[0] != pytest.approx(expected)   # the swap shows
    assert score == pytest.approx(expected) and logs['val/t2v_r1'] == pytest.approx(r1)


def test_fusion_sweeps():
    assert [w for _, w in models.NRCCR.fusion_sweep()] == [1.0, 0.8, 0.5, 0.2, 0.0]
    assert models.MLCMR.fusion_sweep('zh', 'parallel', 'human_label')[0][1] == pytest.approx(0.15)
    assert models.MLCMR.fusion_sweep('en', 'parallel', 'translate')[0][1] == pytest.approx(0.55)
    assert models.MLCMR.fusion_sweep('zh', 'unparallel', 'translate')[0][1] == pytest.approx(0.45)


# ============ original NRCCR release checkpoints ============

def to_release_format(model):
    """Write our NRCCR's weights with the reference's names (docs/models.md, 'Checkpoint formats'), by the documented stems."""
    parts = [{}, {}, {}, {}, {}]
    for key, value in model.state_dict().items():
        comp, rest = key.split('.', 1)
        if comp == 'video_encoder':
            parts[0]['module.' + rest] = value
        elif comp == 'text_encoder':
            rest = 'text_bert.text_bert.' + rest[len('bert.'):] if rest.startswith('bert.') else rest
            parts[1]['module.' + rest] = value
        elif comp == 'video_mapping':
            parts[2]['mapping.' + rest] = value
        elif comp == 'text_mapping':
            parts[3]['mapping.' + rest] = value
        else:
            parts[4]['discriminator.' + rest] = value
    parts[1]['module.text_bert.text_bert.embeddings.position_ids'] = torch.arange(512)[None]
    parts[1]['module.text_bert.text_bert.pooler.dense.weight'] = torch.zeros(32, 32)
    return parts


def test_legacy_checkpoint_gives_identical_embeddings(toy_root, tmp_path):
    torch.manual_seed(0)
    cfg = small_cfg(toy_root, 'nrccr', disc_type='strong')
    ours = models.build_model(cfg).eval()
    parts = to_release_format(ours)
    assert 'module.input_proj_layer.net.1.weight' in parts[0]
    assert 'module.encoder_layer.self.query.weight' in parts[1]
    assert 'mapping.bn_1.running_mean' in parts[2]
    assert 'discriminator.convolve.1.conv1.weight' in parts[4]
    opt = argparse.Namespace(collection='toy', text_num_attention=4, visual_num_attention=4, disc_type='strong',
                             layer_list=['layer.2', 'layer.3'], frozen='frozen')
    path = tmp_path / 'model_best.pth.tar'
    torch.save({'epoch': 3, 'model': parts, 'best_rsum': 100.0, 'opt': opt, 'Eiters': 10}, path)
    loaded, train_args = models.load_model(str(path), bert_name=cfg['bert_name'])
    loaded.eval()
    assert train_args['collection'] == 'toy' and train_args['model'] == 'nrccr'
    batch = nrccr_batch()
    with torch.no_grad():
        assert torch.equal(ours.embed_videos(batch['video']), loaded.embed_videos(batch['video']))
        t1 = ours.embed_texts({'p': batch['text']['src']})['p']
        t2 = loaded.embed_texts({'p': batch['text']['src']})['p']
        assert torch.equal(t1, t2)


def test_our_checkpoint_round_trip(toy_root, tmp_path):
    torch.manual_seed(0)
    model = models.build_model(small_cfg(toy_root, 'mlcmr')).eval()
    path = tmp_path / 'm.pth.tar'
    ckpt.save_checkpoint({'format_version': ckpt.FORMAT_VERSION, 'model_cfg': model.cfg,
                          'model': model.state_dict(), 'args': {'model': 'mlcmr'}}, path)
    os.rename(os.path.join(toy_root, 'tiny_bert'), os.path.join(toy_root, 'tiny_bert_away'))
    try:                                    # rebuilding needs no BERT folder: the config is in the checkpoint
        loaded, _ = models.load_model(str(path))
    finally:
        os.rename(os.path.join(toy_root, 'tiny_bert_away'), os.path.join(toy_root, 'tiny_bert'))
    video = fake_video(3, 5)
    with torch.no_grad():
        assert torch.equal(model.embed_videos(video), loaded.eval().embed_videos(video))


def test_unknown_bert_folder_is_one_line_error(tmp_path):
    from basic.errors import DataError
    with pytest.raises(DataError, match='no BERT folder') as e:
        common.load_pretrained_bert(str(tmp_path / 'nope'))
    assert '\n' not in str(e.value)


@pytest.mark.parametrize('name', ['nrccr', 'mlcmr'])
def test_adam_is_fused_on_cpu_and_steps_like_the_loop(toy_root, name):
    """nets/common.py adam: torch's fused Adam, whose update equals the per-tensor Adam within float rounding."""
    torch.manual_seed(0)
    model = models.build_model(small_cfg(toy_root, name))
    fused = model.configure_optimizers(1e-3, 1e-3)
    assert all(opt.param_groups[0]['fused'] for opt in fused.values())
    params = [p for opt in fused.values() for g in opt.param_groups for p in g['params']]
    start = [p.detach().clone() for p in params]
    loop_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    loop = torch.optim.Adam(loop_params, lr=1e-3, foreach=False)
    for step in range(3):
        for p, q in zip(params, loop_params):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        for opt in fused.values():
            opt.step()
        loop.step()
    for p, q, p0 in zip(params, loop_params, start):
        assert not torch.equal(p, p0)
        assert (p - q).abs().max() <= 1e-6 * q.abs().max().clamp_min(1e-3)
