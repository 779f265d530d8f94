"""util/extract_features.py on generated .mp4 files with a tiny offline CLIP: sampling, numbers, resume, bad files."""
import os

import numpy as np
import pytest

av = pytest.importorskip('av', reason='PyAV is optional (requirements-optional.txt): pip install av')

from basic.bigfile import BigFile                                   # noqa: E402
from basic.video2frames import read_video2frames                    # noqa: E402
from util import extract_features as ef                             # noqa: E402
from basic.clip_encoder import ClipImageEmbedder, save_tiny_clip     # noqa: E402
from util.make_demo_videos import COLOURS, write_video              # noqa: E402

SECONDS, FPS = 3.0, 8          # 24 frames per video


@pytest.fixture(scope='module')
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(str(tmp_path_factory.mktemp('clip')))


@pytest.fixture()
def video_dir(tmp_path):
    d = tmp_path / 'videos'
    d.mkdir()
    for i in range(4):
        write_video(str(d / f'clip{i}.mp4'), COLOURS[i][2], SECONDS, FPS, size=40, seed=i)
    (d / 'broken.mp4').write_bytes(b'\x00\x01 not a video' * 50)
    write_video(str(d / 'has space.mp4'), COLOURS[5][2], 1.0, FPS, size=40)
    (d / 'notes.txt').write_text('ignored')
    return d


def _run(video_dir, out, clip, *extra):
    return ef.main(['--videos', str(video_dir), '--out', str(out), '--model', clip, '--fps', '2', '--device', 'cpu',
                    '--progress', '0', *extra])


def _reference_frames(path, every):
    """Every `every`-th decoded frame, by index (an independent statement of 2 fps sampling at 8 fps)."""
    with av.open(path) as c:
        frames = [f.to_image() for f in c.decode(video=0)]
    return frames[::every]


def test_features_equal_clip_of_sampled_frames(video_dir, tmp_path, tiny_clip, capsys):
    out = tmp_path / 'feat'
    summary = _run(video_dir, out, tiny_clip)
    assert summary['videos'] == 4 and summary['extracted'] == 4
    failed = {os.path.basename(p): r for p, r in summary['failed']}
    assert set(failed) == {'broken.mp4', 'has space.mp4'}
    assert 'unreadable' in failed['broken.mp4'] and 'whitespace' in failed['has space.mp4']
    err = capsys.readouterr().err
    assert 'broken.mp4' in err and 'has space.mp4' in err
    assert 'broken.mp4' in (out / ef.FAILED).read_text()

    bf = BigFile(str(out))
    v2f = read_video2frames(str(out / 'video2frames.txt'))
    embedder = ClipImageEmbedder(tiny_clip)
    for i in range(4):
        frames = _reference_frames(str(video_dir / f'clip{i}.mp4'), FPS // 2)
        assert len(frames) == 6 and v2f[f'clip{i}'] == [f'clip{i}_{j}' for j in range(6)]
        np.testing.assert_allclose(bf.read(v2f[f'clip{i}']), embedder.embed(frames), rtol=1e-5, atol=1e-6)
    assert not os.path.exists(out / ef.SHARD_DIR)


def _assert_same_features(ref, out):
    """Same ids and rows; the values may differ in the last bits, because a batch mixing other videos runs the
    vision model's matrix products with another blocking when torch uses several threads."""
    assert (out / 'id.txt').read_bytes() == (ref / 'id.txt').read_bytes()
    a, b = BigFile(str(ref)), BigFile(str(out))
    np.testing.assert_allclose(b.read(b.names), a.read(a.names), rtol=1e-5, atol=1e-6)


def test_rerun_skips_finished_videos_and_adds_new_ones(video_dir, tmp_path, tiny_clip):
    out = tmp_path / 'feat'
    _run(video_dir, out, tiny_clip)
    before = (out / 'feature.bin').read_bytes()
    again = _run(video_dir, out, tiny_clip)
    assert again['extracted'] == 0 and again['skipped_done'] == 4
    assert (out / 'feature.bin').read_bytes() == before
    write_video(str(video_dir / 'clip9.mp4'), COLOURS[4][2], SECONDS, FPS, size=40, seed=9)
    more = _run(video_dir, out, tiny_clip)
    assert more['extracted'] == 1 and more['videos'] == 5
    v2f = read_video2frames(str(out / 'video2frames.txt'))
    assert sorted(v2f) == ['clip0', 'clip1', 'clip2', 'clip3', 'clip9']
    ref = tmp_path / 'fresh'
    _run(video_dir, ref, tiny_clip)
    _assert_same_features(ref, out)


def test_interrupted_run_is_redone_never_half_written(video_dir, tmp_path, tiny_clip, monkeypatch):
    out, ref = tmp_path / 'feat', tmp_path / 'ref'
    _run(video_dir, ref, tiny_clip, '--decode_workers', '1')
    real, calls = ClipImageEmbedder.embed_pixels, []

    def dying(self, pixels):
        calls.append(len(pixels))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, pixels)

    monkeypatch.setattr(ClipImageEmbedder, 'embed_pixels', dying)
    with pytest.raises(KeyboardInterrupt):       # batch 6 = one video per forward pass: 2 videos finished
        _run(video_dir, out, tiny_clip, '--batch_size', '6', '--decode_workers', '1')
    shards = sorted(n for n in os.listdir(out / ef.SHARD_DIR) if n.endswith('.npy'))
    assert shards == ['clip0.npy', 'clip1.npy'] and not os.path.exists(out / 'feature.bin')
    monkeypatch.setattr(ClipImageEmbedder, 'embed_pixels', real)
    resumed = _run(video_dir, out, tiny_clip, '--batch_size', '6')
    assert resumed['extracted'] == 2 and resumed['skipped_done'] == 2
    _assert_same_features(ref, out)


def test_other_settings_are_refused(video_dir, tmp_path, tiny_clip):
    out = tmp_path / 'feat'
    _run(video_dir, out, tiny_clip)
    with pytest.raises(SystemExit, match='overwrite'):
        ef.main(['--videos', str(video_dir), '--out', str(out), '--model', tiny_clip, '--fps', '1',
                 '--progress', '0', '--device', 'cpu'])
    summary = ef.main(['--videos', str(video_dir), '--out', str(out), '--model', tiny_clip, '--fps', '1',
                       '--progress', '0', '--device', 'cpu', '--overwrite', '1'])
    assert summary['frames'] == 4 * 3


# ============ frame times and thumbnails ============

def _frame_times(out):
    from basic import media
    return {vid: list(t) for vid, t in media.read_frame_times(str(out / media.FRAME_TIMES)).items()}


def test_frame_times_video_folder_and_thumbnails(video_dir, tmp_path, tiny_clip):
    from PIL import Image
    from basic import media
    out = tmp_path / 'feat'
    _run(video_dir, out, tiny_clip, '--thumbnails', '1', '--thumb_size', '32')
    # 8 fps files sampled at 2 fps: frames 0, 4, 8, ... at 0, 0.5, 1.0, ... s
    assert _frame_times(out) == {f'clip{i}': [0.5 * j for j in range(6)] for i in range(4)}
    assert media.read_video_folder(str(out)) == str(video_dir)
    thumbs = out / media.THUMBNAILS
    for i in range(4):
        names = sorted(os.listdir(thumbs / f'clip{i}'))
        assert names == [f'{j}.jpg' for j in range(6)]
        for j, reference in enumerate(_reference_frames(str(video_dir / f'clip{i}.mp4'), FPS // 2)):
            with Image.open(thumbs / f'clip{i}' / f'{j}.jpg') as im:
                assert im.size == (32, 32)              # 40 x 40 frames, at most 32 a side
                small = np.asarray(reference.resize((32, 32)), dtype=np.float64)
                assert np.abs(np.asarray(im, dtype=np.float64) - small).mean() < 12    # the frame, as JPEG
        with Image.open(thumbs / f'clip{i}.jpg') as whole, Image.open(thumbs / f'clip{i}' / '3.jpg') as middle:
            assert np.array_equal(np.asarray(whole), np.asarray(middle))
    assert not os.path.exists(thumbs / 'broken') and not os.path.exists(thumbs / 'has space.jpg')


def test_thumbnails_and_times_are_completed_without_clip(video_dir, tmp_path, tiny_clip, monkeypatch):
    """A re-run with --thumbnails after a run without writes them, a folder whose frame times are missing (made
    before they were recorded) gets them, and a video whose thumbnails were cut short is redone: all by decoding
    again, never by running CLIP again; the features stay byte for byte."""
    from basic import media
    out = tmp_path / 'feat'
    _run(video_dir, out, tiny_clip)
    features, times = (out / 'feature.bin').read_bytes(), _frame_times(out)
    assert not os.path.exists(out / media.THUMBNAILS)

    def no_clip(self, pixels):
        raise AssertionError('CLIP ran again')
    monkeypatch.setattr(ClipImageEmbedder, 'embed_pixels', no_clip)
    summary = _run(video_dir, out, tiny_clip, '--thumbnails', '1')
    assert summary['extracted'] == 0 and summary['completed'] == 4
    assert all(os.path.exists(out / media.THUMBNAILS / f'clip{i}.jpg') for i in range(4))

    os.remove(out / media.FRAME_TIMES)
    os.remove(out / media.THUMBNAILS / 'clip2.jpg')                 # its per-frame files may be partial
    summary = _run(video_dir, out, tiny_clip, '--thumbnails', '1')
    assert summary['extracted'] == 0 and summary['completed'] == 4 and summary['timed'] == 4
    assert _frame_times(out) == times and (out / 'feature.bin').read_bytes() == features
    assert os.path.exists(out / media.THUMBNAILS / 'clip2.jpg')
    again = _run(video_dir, out, tiny_clip, '--thumbnails', '1')
    assert again['completed'] == 0 and again['extracted'] == 0
