"""basic/media.py: frame times, windows worked out by hand, windows as short videos, video files; and the
progress listener the search page reads."""
import os

import numpy as np
import pytest

from basic import data_provider as dp
from basic import media, progress
from basic.bigfile import BigFileWriter
from basic.errors import DataError
from basic.video2frames import write_video2frames


def spans(windows):
    return [(w.first, w.stop, w.start, w.end) for w in windows]


def test_windows_by_hand():
    t = np.arange(6.0)                                   # frames at 0..5 s, one per second: the video ends at 6
    assert spans(media.windows_of('v', t, 4, 2)) == [(0, 4, 0.0, 4.0), (2, 6, 2.0, 6.0)]
    assert spans(media.windows_of('v', t, 2, 2)) == [(0, 2, 0.0, 2.0), (2, 4, 2.0, 4.0), (4, 6, 4.0, 6.0)]
    # stride 1.5: starts 0, 1.5, 3, 4.5 -> frames [0,1], [2,3] (1.5 <= t < 3.5), [3,4], [5] (4.5 <= t < 6.5)
    assert spans(media.windows_of('v', t, 2, 1.5)) == [(0, 2, 0.0, 2.0), (2, 4, 1.5, 3.5), (3, 5, 3.0, 5.0),
                                                       (5, 6, 4.5, 6.0)]
    # a video shorter than the window is one window
    assert spans(media.windows_of('v', t, 10, 5)) == [(0, 6, 0.0, 6.0)]
    # frames 2 s apart (the video ends at 6), windows of 1 s every 0.5 s: the first window holding frame 1 (at
    # 2 s) starts at 1.5, the first holding frame 2 (at 4 s) at 3.5; windows without frames are dropped
    assert spans(media.windows_of('v', [0.0, 2.0, 4.0], 1, 0.5)) == [(0, 1, 0.0, 1.0), (1, 2, 1.5, 2.5),
                                                                     (2, 3, 3.5, 4.5)]
    # the same frames as the window before: dropped (start 0.5 holds frame 1 only, as does start 1.0)
    assert spans(media.windows_of('v', [0.0, 1.0, 2.0], 1, 0.5)) == [(0, 1, 0.0, 1.0), (1, 2, 0.5, 1.5),
                                                                     (2, 3, 1.5, 2.5)]
    # one frame: its time, to the end of the file
    assert spans(media.windows_of('v', [3.0], 2, 1)) == [(0, 1, 3.0, None)]
    assert media.video_span(np.array([0.5, 1.5, 2.5])) == (0.5, 3.5)


def test_parse_moments():
    assert media.parse_moments('4') == (4.0, 2.0) and media.parse_moments('4:1') == (4.0, 1.0)
    assert media.format_moments(4.0, 2.0) == '4:2'
    for bad in ('', 'x', '4:', '0', '-1:1', '4:0', 'nan', 'inf:1', '1:2:3'):
        with pytest.raises(ValueError, match='moments'):
            media.parse_moments(bad)


def _store(tmp_path, frames):
    """A FrameStore of videos {id: n frames}: frame j of video i has features [i, j, 1]."""
    folder = str(tmp_path / 'feat')
    mapping = {}
    with BigFileWriter(folder, 3) as w:
        for i, (vid, n) in enumerate(frames.items()):
            names = [f'{vid}_{j}' for j in range(n)]
            w.add_rows(names, np.array([[i, j, 1] for j in range(n)], dtype=np.float32))
            mapping[vid] = names
    write_video2frames(os.path.join(folder, 'video2frames.txt'), mapping)
    return dp.FrameStore(folder)


def test_frame_times_round_trip_and_checks(tmp_path):
    store = _store(tmp_path, {'a': 3, 'b': 2})
    path = os.path.join(store.path, media.FRAME_TIMES)
    assert media.load_frame_times(store.path, store.video2frames) is None          # imported: unknown
    media.write_frame_times(path, {'b': [0.0, 0.5], 'a': [0.0, 1.0, 2.0004]})
    assert open(path).read() == 'a 0.000 1.000 2.000\nb 0.000 0.500\n'
    times = media.load_frame_times(store.path, store.video2frames)
    np.testing.assert_array_equal(times['a'], [0, 1, 2])
    for text, what in (('a 0 1\nb 0 0.5\n', '2 times but 3 frames'), ('a 0 x 2\n', ':1: expected'),
                       ('a 0 2 1\n', 'increasing'), ('a 0 1 2\na 0 1 2\n', 'twice'), ('a\n', 'increasing')):
        with open(path, 'w') as f:
            f.write(text)
        with pytest.raises(DataError, match=what):
            media.load_frame_times(store.path, store.video2frames)


def test_make_windows_needs_times(tmp_path):
    store = _store(tmp_path, {'a': 3, 'b': 2})
    with pytest.raises(DataError, match='imported features'):
        media.make_windows(['a', 'b'], None, 2, 1, store.path)
    with pytest.raises(DataError, match='no times for 1 videos'):
        media.make_windows(['a', 'b'], {'a': np.arange(3.0)}, 2, 1, store.path)
    windows = media.make_windows(['b', 'a'], {'a': np.arange(3.0), 'b': np.arange(2.0)}, 2, 1, store.path)
    assert [(w.video_id, w.first, w.stop) for w in windows] == [('b', 0, 2), ('a', 0, 2), ('a', 1, 3)]


def test_a_window_is_a_short_video_of_its_frames(tmp_path):
    """VideoDataset over WindowFrames yields the item VideoDataset yields for a video made of those frames."""
    store = _store(tmp_path, {'a': 5, 'b': 2})
    windows = [media.Window('a', 1, 4, 1.0, 4.0), media.Window('b', 0, 2, 0.0, None)]
    dataset = dp.VideoDataset(range(2), media.WindowFrames(store, windows))
    frames, mean = dataset[0]['video']
    expected = np.array([[0, j, 1] for j in (1, 2, 3)], dtype=np.float32)
    np.testing.assert_array_equal(frames, expected)
    np.testing.assert_array_equal(mean, expected.mean(axis=0))
    np.testing.assert_array_equal(dataset[1]['video'][0], store.frames('b'))


def test_video_files_and_names(tmp_path):
    (tmp_path / 'a.mp4').write_bytes(b'')
    (tmp_path / 'a.webm').write_bytes(b'')
    (tmp_path / 'b.MKV').write_bytes(b'')
    (tmp_path / 'c.txt').write_bytes(b'')
    assert media.video_files(str(tmp_path)) == {'a': 'a.mp4', 'b': 'b.MKV'}
    assert media.video_files(str(tmp_path / 'missing')) == {}
    assert media.check_file_name('ok id') is None
    assert all(media.check_file_name(v) for v in ('.', '..', 'a/b', 'a\\b'))
    media.write_video_folder(str(tmp_path), str(tmp_path / 'videos'))
    assert media.read_video_folder(str(tmp_path)) == str(tmp_path / 'videos')
    assert media.read_video_folder(str(tmp_path / 'missing')) is None


def test_progress_listeners_see_every_update_in_their_thread_only():
    seen = []
    with progress.listen(lambda p: seen.append((p.desc, p.steps, p.samples, p.closed))):
        for _ in progress.track(range(3), desc='encode videos', count=lambda i: 2, enabled=True):
            pass
    assert seen == [('encode videos', 1, 2, False), ('encode videos', 2, 4, False), ('encode videos', 3, 6, False),
                    ('encode videos', 3, 6, True)]
    seen.clear()
    for _ in progress.track(range(2), desc='after'):                 # outside the block: not heard
        pass
    assert seen == []
    import threading
    with progress.listen(lambda p: seen.append(p.desc)):
        other = threading.Thread(target=lambda: list(progress.track(range(2), desc='other thread')))
        other.start()
        other.join()
    assert seen == []
