"""NRCCR image encoders: the two formulas, the mapping sizes, a training step, and the equivalence of cached CLIP
embeddings with the original's per-step CLIP forward (whose output it re-wrapped as a fresh leaf tensor)."""
import os

import pytest
import torch
import torch.nn.functional as F

import model as models
from nets import nrccr


def image_cfg(root, encoder, feat_dim, **overrides):
    base = dict(bert_name=os.path.join(root, 'tiny_bert'), visual_feat_dim=feat_dim, mapping_dim=48,
                trainable_layers=['layer.2', 'layer.3'], text_hidden_size=32, video_hidden_size=40,
                text_num_attention=4, visual_num_attention=4, visual_encoder=encoder, disc_type='not-so-weak')
    base.update(overrides)
    return models.model_config('nrccr', **base)


def one_frame(feats):
    """Image features (B, D) as the collate of one-frame videos gives them."""
    B, D = feats.shape
    return {'frames': feats.unsqueeze(1), 'mask': torch.ones(B, 1), 'lengths': torch.ones(B, dtype=torch.long),
            'mean': feats.clone()}


def stream(B, L, vocab=150, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(104, vocab, (B, L), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    return {'ids': ids, 'mask': torch.ones(B, L), 'lengths': torch.full((B,), L)}


def test_encoder_formulas():
    torch.manual_seed(0)
    x = torch.randn(5, 12)
    resnet = nrccr.ImageFeatureEncoder(12)
    assert resnet.out_dim == 12
    torch.testing.assert_close(resnet(x.unsqueeze(1), torch.ones(5, 1)),
                               torch.clamp(x @ resnet.proj.weight.T + resnet.proj.bias, min=0))
    clip = nrccr.ClipEmbeddingEncoder(12, 20)
    assert clip.out_dim == 20
    y = clip(x.unsqueeze(1), torch.ones(5, 1))
    torch.testing.assert_close(y, x @ clip.proj.weight.T + clip.proj.bias)
    assert (y < 0).any()                                # no ReLU on the CLIP path
    assert set(dict(resnet.named_parameters())) == {'proj.weight', 'proj.bias'}       # the original's keys


def test_nrccr_image_model_sizes(toy_root):
    resnet = models.build_model(image_cfg(toy_root, 'resnet', 24))
    assert resnet.video_mapping.fc1.in_features == 24           # ResNet: the mapping reads the 2048(-like) dims
    clip = models.build_model(image_cfg(toy_root, 'clip', 16))
    assert clip.video_encoder.proj.in_features == 16 and clip.video_mapping.fc1.in_features == 40   # video_hidden_size
    video = models.build_model(image_cfg(toy_root, 'transformer', 16))
    assert isinstance(video.video_encoder, nrccr.VideoTransformerEncoder)
    legacy_cfg = image_cfg(toy_root, 'transformer', 16)
    del legacy_cfg['visual_encoder']                           # a checkpoint written before image support
    assert isinstance(models.build_model(legacy_cfg).video_encoder, nrccr.VideoTransformerEncoder)
    with pytest.raises(ValueError, match='unknown visual_encoder'):
        models.build_model(image_cfg(toy_root, 'vit', 16))


@pytest.mark.parametrize('encoder, dim', [('resnet', 24), ('clip', 16)])
def test_training_step_and_embeddings(toy_root, encoder, dim):
    torch.manual_seed(0)
    m = models.build_model(image_cfg(toy_root, encoder, dim))
    opts = m.configure_optimizers(1e-3)
    B = 6
    batch = {'video': one_frame(torch.randn(B, dim)),
             'text': {'src': stream(B, 7, seed=1), 'tr': stream(B, 8, seed=2), 'bt': stream(B, 6, seed=3)},
             'video_index': torch.arange(B), 'same_video': torch.zeros(B, B, dtype=torch.bool)}
    before = m.video_encoder.proj.weight.detach().clone()
    out = m(batch)
    assert out['v'].shape == (B, 48)
    torch.testing.assert_close(out['v'].norm(dim=1), torch.ones(B))
    loss, logs = m.training_loss(out)
    opts['main'].zero_grad()
    loss.backward()
    assert m.video_encoder.proj.weight.grad.abs().sum() > 0
    opts['main'].step()
    assert not torch.equal(before, m.video_encoder.proj.weight)
    m.eval()
    with torch.no_grad():
        v = m.embed_videos(one_frame(torch.randn(3, dim)))
        t = m.embed_texts({'primary': stream(3, 5), 'second': stream(3, 6)})
    assert v.shape == (3, 48) and set(t) == {'primary', 'second'}


def test_cached_clip_embeddings_equal_the_original_per_step_clip(toy_root, tmp_path):
    """The original ran the CLIP vision tower on each batch, then `torch.tensor(out, requires_grad=True)`: a new
    leaf, so nothing flows back into CLIP. The loss and every gradient are the same as with embeddings computed
    once and fed as features."""
    from transformers import CLIPVisionModelWithProjection
    from basic.clip_encoder import save_tiny_clip
    clip = CLIPVisionModelWithProjection.from_pretrained(save_tiny_clip(str(tmp_path / 'clip'))).eval()
    torch.manual_seed(0)
    m = models.build_model(image_cfg(toy_root, 'clip', clip.config.projection_dim))
    m.eval()                                          # no dropout: the two passes see the same network
    B = 4
    pixels = torch.randn(B, 3, 32, 32)
    with torch.no_grad():
        cached = clip(pixel_values=pixels).image_embeds     # what util/extract_image_features.py stores

    def loss_of(video_feats):
        m.zero_grad()
        v = m.video_mapping(m.video_encoder(video_feats.unsqueeze(1), torch.ones(B, 1)))
        c = m.text_mapping(m.text_encoder.self_pool(*text_features(m, stream(B, 6))))
        loss = F.relu(0.2 - (v * c).sum(1)).sum()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    def text_features(model, s):
        _, F_s = model.text_encoder.features(s)
        return F_s, s['mask']

    per_step = clip(pixel_values=pixels).image_embeds
    per_step = per_step.detach().clone().requires_grad_(True)       # the original's re-wrap as a fresh leaf
    loss_a, grads_a = loss_of(per_step)
    loss_b, grads_b = loss_of(cached)
    assert loss_a == pytest.approx(loss_b, abs=1e-6) and set(grads_a) == set(grads_b)
    assert 'video_encoder.proj.weight' in grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5)
    assert all(p.grad is None for p in clip.parameters())            # CLIP itself never received a gradient
