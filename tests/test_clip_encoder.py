"""The shared CLIP image embedder: same numbers as calling the vision model directly, offline tiny model."""
import numpy as np
import pytest
import torch

from basic.clip_encoder import ClipImageEmbedder, save_tiny_clip
from basic.errors import DataError

PIL = pytest.importorskip('PIL.Image')


@pytest.fixture(scope='module')
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(str(tmp_path_factory.mktemp('tiny_clip')))


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [PIL.fromarray(rng.integers(0, 256, size=(40 + 7 * i, 50, 3), dtype=np.uint8)) for i in range(n)]


def test_embed_equals_direct_model_call(tiny_clip):
    from transformers import CLIPVisionModelWithProjection
    emb = ClipImageEmbedder(tiny_clip)
    images = _images(3)
    got = emb.embed(images)
    assert got.shape == (3, 16) and got.dtype == np.float32
    # independent path: resize/crop/normalise by hand as the clip package does (short side to 32, long side
    # truncated, bicubic; centre crop), then the raw model
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    pixels = []
    for im in images:
        w, h = im.size
        im = im.resize((32, int(32 * h / w)) if w <= h else (int(32 * w / h), 32), PIL.BICUBIC)
        w, h = im.size
        left, top = (w - 32) // 2, (h - 32) // 2
        a = np.asarray(im.crop((left, top, left + 32, top + 32)), dtype=np.float64) / 255.0
        pixels.append(((a - mean) / std).transpose(2, 0, 1))
    model = CLIPVisionModelWithProjection.from_pretrained(tiny_clip).eval()
    with torch.no_grad():
        ref = model(pixel_values=torch.tensor(np.stack(pixels), dtype=torch.float32)).image_embeds.numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4)
    np.testing.assert_allclose(got, emb.embed_pixels(emb.preprocess(images)), atol=1e-6)


def test_batching_does_not_change_embeddings(tiny_clip):
    emb = ClipImageEmbedder(tiny_clip)
    images = _images(5)
    together = emb.embed(images)
    apart = np.concatenate([emb.embed(images[:2]), emb.embed(images[2:])])
    np.testing.assert_allclose(together, apart, atol=1e-5)
    assert emb.embed([]).shape == (0, 16)


def test_missing_folder_is_one_line_error(tmp_path):
    with pytest.raises(DataError, match='config.json missing'):
        ClipImageEmbedder(str(tmp_path / 'nope'))
