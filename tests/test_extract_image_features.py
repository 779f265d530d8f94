"""util/extract_image_features.py: features equal to the CLIP vision model called directly, resumable, atomic
chunks, unreadable and missing images listed (fatal with --strict 1), and a store the trainer's data layer reads."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from basic.bigfile import BigFile
from basic.errors import DataError
from util import extract_image_features as ex
from basic.clip_encoder import ClipImageEmbedder, save_tiny_clip


@pytest.fixture(scope='module')
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(str(tmp_path_factory.mktemp('clip')))


def make_images(folder, n, seed=0, size=(40, 30)):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = [f'{1000 + i}' for i in range(n)]
    for i in ids:
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
            os.path.join(folder, f'{i}.jpg'), quality=90)
    return ids


def direct_embeddings(model_dir, folder, ids):
    """The same vision tower + projection, called image by image through transformers directly."""
    from transformers import CLIPVisionModelWithProjection
    from basic.clip_encoder import load_image_processor
    model = CLIPVisionModelWithProjection.from_pretrained(model_dir).eval()
    processor = load_image_processor(model_dir)
    out = []
    with torch.no_grad():
        for i in ids:
            with Image.open(os.path.join(folder, f'{i}.jpg')) as im:
                pixels = processor(images=[im.convert('RGB')], return_tensors='pt')['pixel_values']
            out.append(model(pixel_values=pixels).image_embeds[0].numpy())
    return np.stack(out)


def test_features_equal_direct_call_and_rerun_skips(tiny_clip, tmp_path):
    images, out = str(tmp_path / 'img'), str(tmp_path / 'feat')
    ids = make_images(images, 7)
    s = ex.extract(images, out, tiny_clip, batch_size=3, chunk_size=4, progress=False)
    assert (s['extracted'], s['skipped_done'], s['rows'], s['unreadable'], s['missing']) == (7, 0, 7, [], [])
    big = BigFile(out)
    assert sorted(big.names) == ids and big.ndims == 16
    assert not os.path.exists(os.path.join(out, ex.CHUNK_DIR))
    np.testing.assert_allclose(big.read(ids), direct_embeddings(tiny_clip, images, ids), atol=1e-5, rtol=0)
    # the shared embedder gives the same numbers too
    ref = ClipImageEmbedder(tiny_clip).embed([Image.open(os.path.join(images, f'{i}.jpg')) for i in ids])
    np.testing.assert_allclose(big.read(ids), ref, atol=1e-5, rtol=0)

    before = big.read(ids)
    again = ex.extract(images, out, tiny_clip, batch_size=3, progress=False)
    assert (again['extracted'], again['skipped_done'], again['rows']) == (0, 7, 7)

    new = make_images(images, 9)[7:]                    # two more images: only they are extracted
    third = ex.extract(images, out, tiny_clip, batch_size=3, progress=False)
    assert (third['extracted'], third['skipped_done'], third['rows']) == (2, 7, 9)
    big = BigFile(out)
    np.testing.assert_array_equal(big.read(ids), before)
    np.testing.assert_allclose(big.read(new), direct_embeddings(tiny_clip, images, new), atol=1e-5, rtol=0)


def test_interrupted_run_resumes_from_chunks(tiny_clip, tmp_path, monkeypatch):
    images, out = str(tmp_path / 'img'), str(tmp_path / 'feat')
    ids = make_images(images, 6)
    calls = {'n': 0}
    real = ClipImageEmbedder.embed_pixels

    def dying(self, pixels):
        calls['n'] += 1
        if calls['n'] == 3:
            raise KeyboardInterrupt                    # killed while embedding the third batch
        return real(self, pixels)

    monkeypatch.setattr(ClipImageEmbedder, 'embed_pixels', dying)
    with pytest.raises(KeyboardInterrupt):
        ex.extract(images, out, tiny_clip, batch_size=2, chunk_size=2, progress=False)
    chunks = sorted(os.listdir(os.path.join(out, ex.CHUNK_DIR)))
    assert chunks == ['chunk_000000.npz', 'chunk_000001.npz']      # finished chunks only, no temporary file
    assert not os.path.exists(os.path.join(out, 'feature.bin'))

    monkeypatch.setattr(ClipImageEmbedder, 'embed_pixels', real)
    s = ex.extract(images, out, tiny_clip, batch_size=2, chunk_size=2, progress=False)
    assert (s['extracted'], s['skipped_done'], s['rows']) == (2, 4, 6)
    np.testing.assert_allclose(BigFile(out).read(ids), direct_embeddings(tiny_clip, images, ids), atol=1e-5, rtol=0)


def test_unreadable_and_missing_images(tiny_clip, tmp_path):
    images, out = str(tmp_path / 'img'), str(tmp_path / 'feat')
    ids = make_images(images, 4)
    with open(os.path.join(images, 'broken.jpg'), 'wb') as f:
        f.write(b'not a jpeg at all')
    id_file = tmp_path / 'train_id.txt'
    id_file.write_text('\n'.join(ids[:3] + ['broken', 'gone']) + '\n')

    with pytest.raises(DataError, match=r'img: 2 images unreadable or missing .*broken\.jpg.*--strict 0'):
        ex.extract(images, out, tiny_clip, strict=True, id_files=[str(id_file)], progress=False)
    assert not os.path.exists(os.path.join(out, 'feature.bin'))

    s = ex.extract(images, out, tiny_clip, id_files=[str(id_file)], progress=False)
    assert s['rows'] == 3 and sorted(BigFile(out).names) == ids[:3]          # only the listed, readable ones
    assert [i for i, _ in s['unreadable']] == ['broken'] and s['missing'] == ['gone']
    skipped = (tmp_path / 'feat' / ex.SKIPPED_FILE).read_text()
    assert 'broken.jpg' in skipped and 'gone' in skipped


def test_other_model_in_same_folder_refused(tiny_clip, tmp_path):
    images, out = str(tmp_path / 'img'), str(tmp_path / 'feat')
    make_images(images, 2)
    ex.extract(images, out, tiny_clip, progress=False)
    other = save_tiny_clip(str(tmp_path / 'clip2'), projection_dim=8)
    make_images(images, 3)
    with pytest.raises(DataError, match='another --out folder'):
        ex.extract(images, out, other, progress=False)


def test_cli_and_store_reads_output(tiny_clip, tmp_path, capsys):
    from basic.image_data import ImageStore
    images, out = str(tmp_path / 'img'), str(tmp_path / 'feat')
    ids = make_images(images, 3)
    ex.main(['--images', images, '--out', out, '--model', tiny_clip, '--device', 'cpu', '--workers', '0'])
    assert '3 images (3 extracted now, 0 already done)' in capsys.readouterr().out
    store = ImageStore.from_bigfile(out)
    assert store.dim == 16 and store.frames(ids[1]).shape == (1, 16)
    np.testing.assert_array_equal(store.frames(ids[1])[0], BigFile(out).read_one(ids[1]))
    with pytest.raises(SystemExit, match='error: .*nowhere: no such image folder'):
        ex.main(['--images', str(tmp_path / 'nowhere'), '--out', out, '--model', tiny_clip])
