"""The media behind a feature folder, and moments: when each feature row of a video was sampled, where the
videos and their thumbnails are, and windows of consecutive frames searched as short videos
(docs/search.md, 'Moments' and 'The search page').

util/extract_features.py writes, beside the features:
  frame_times.txt   one line per video, `<video id> <t_0> <t_1> ...`: the seconds from the start of the file
                    of the frames whose features are that video's rows, in row order (t_i belongs to the i-th
                    frame id of video2frames.txt)
  video_folder.txt  the absolute folder of the video files (`<video id>.<ext>`, ext one of VIDEO_EXTS)
  thumbnails/       with --thumbnails: `<video id>.jpg` (its middle frame) and `<video id>/<i>.jpg` (frame i)
Imported features have none of these: their times are unknown, and results show the video id only.

A window of W seconds with stride S over a video whose frames lie at t_0 < ... < t_{n-1}, sampled every
p seconds (p = the median gap; the video ends at t_{n-1} + p): windows start at t_0, t_0 + S, t_0 + 2S, ...
and hold the frames with start <= t_i < start + W; the last one is the first that reaches the end. A window
ends at min(start + W, video end). Windows without frames, or with the same frames as the one before, are
dropped; a video shorter than W is one window.
"""
import math
import os
from dataclasses import dataclass

import numpy as np

from basic.errors import DataError

FRAME_TIMES = 'frame_times.txt'
VIDEO_FOLDER = 'video_folder.txt'
THUMBNAILS = 'thumbnails'
VIDEO_EXTS = ('.mp4', '.avi', '.mkv', '.mov', '.webm', '.m4v', '.mpg', '.mpeg', '.flv', '.wmv')


# ============ video files and thumbnails ============

def check_file_name(vid):
    """None if `vid` can name a file inside a folder (thumbnails), else the reason."""
    if vid in ('.', '..') or '/' in vid or '\\' in vid or '\0' in vid:
        return f'video id {vid!r} cannot name a file; rename it'
    return None


def video_files(folder):
    """{video id: file name} of the video files directly inside `folder` (the extractor's naming); {} when the
    folder does not exist."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return {}
    out = {}
    for name in names:
        stem, ext = os.path.splitext(name)
        if ext.lower() in VIDEO_EXTS:
            out.setdefault(stem, name)
    return out


def write_video_folder(feature_dir, folder):
    tmp = os.path.join(feature_dir, f'.{VIDEO_FOLDER}.tmp{os.getpid()}')
    with open(tmp, 'w', encoding='utf-8') as f:
        f.write(os.path.abspath(folder) + '\n')
    os.replace(tmp, os.path.join(feature_dir, VIDEO_FOLDER))


def read_video_folder(feature_dir):
    """The video folder the extractor recorded for `feature_dir`, or None (imported features)."""
    try:
        with open(os.path.join(feature_dir, VIDEO_FOLDER), encoding='utf-8') as f:
            return f.read().strip() or None
    except OSError:
        return None


def thumbnail_path(folder, vid, frame=None):
    """`folder`/<vid>.jpg, or `folder`/<vid>/<frame>.jpg for one frame."""
    return os.path.join(folder, f'{vid}.jpg') if frame is None else os.path.join(folder, vid, f'{int(frame)}.jpg')


def _save_jpeg(image, path, size):
    im = image.convert('RGB')
    im.thumbnail((size, size))
    tmp = os.path.join(os.path.dirname(path), f'.{os.path.basename(path)}.tmp{os.getpid()}')
    im.save(tmp, 'JPEG', quality=80)
    os.replace(tmp, path)


def write_thumbnails(folder, vid, images, size=160):
    """One JPEG per frame (at most `size` pixels a side), then the video's own (its middle frame): the video's
    file is written last, so its presence means all are there."""
    os.makedirs(os.path.join(folder, vid), exist_ok=True)
    for i, image in enumerate(images):
        _save_jpeg(image, thumbnail_path(folder, vid, i), size)
    _save_jpeg(images[len(images) // 2], thumbnail_path(folder, vid), size)


# ============ frame_times.txt ============

def write_frame_times(path, times):
    """Write {video id: [seconds]} one video per line, sorted by id, milliseconds precision; atomic."""
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w', encoding='latin-1') as f:
        for vid in sorted(times):
            f.write(' '.join([vid] + [f'{t:.3f}' for t in times[vid]]) + '\n')
    os.replace(tmp, path)


def read_frame_times(path):
    """{video id: float64 array of seconds} of a frame_times.txt; a bad line is a DataError naming it."""
    out = {}
    fix = 're-run util/extract_features.py on the videos to write it again'
    with open(path, encoding='latin-1') as f:
        for number, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                t = np.array([float(x) for x in parts[1:]], dtype=np.float64)
            except ValueError:
                raise DataError(f'{path}:{number}: expected "<video id> <seconds> ...", got {line.strip()[:80]!r}; '
                                f'{fix}') from None
            if not len(t) or not np.isfinite(t).all() or (np.diff(t) <= 0).any():
                raise DataError(f'{path}:{number}: the times of {parts[0]} must be finite and increasing; {fix}')
            if parts[0] in out:
                raise DataError(f'{path}:{number}: {parts[0]} appears twice; {fix}')
            out[parts[0]] = t
    return out


def load_frame_times(feature_dir, video2frames):
    """{video id: seconds} of `feature_dir`'s frame_times.txt, checked against the frame counts of
    video2frames; None when the folder has no such file (imported features). Videos missing from the file
    (extracted before times were recorded) are missing from the dict."""
    path = os.path.join(feature_dir, FRAME_TIMES)
    if not os.path.exists(path):
        return None
    times = read_frame_times(path)
    for vid, t in times.items():
        frames = video2frames.get(vid)
        if frames is not None and len(frames) != len(t):
            raise DataError(f'{path}: {vid} has {len(t)} times but {len(frames)} frames in video2frames.txt; '
                            're-run util/extract_features.py on the videos to write it again')
    return times


# ============ spans and windows ============

def parse_moments(spec):
    """'W' or 'W:S' (seconds) -> (window, stride); the stride defaults to half the window."""
    window, sep, stride = str(spec).partition(':')
    try:
        w = float(window)
        s = float(stride) if sep else w / 2
    except ValueError:
        raise ValueError(f'moments {spec!r}: expected WINDOW_S or WINDOW_S:STRIDE_S in seconds, e.g. 4 or 4:2') \
            from None
    if not (math.isfinite(w) and math.isfinite(s) and w > 0 and s > 0):
        raise ValueError(f'moments {spec!r}: window and stride must be positive seconds')
    return w, s


def format_moments(window, stride):
    return f'{window:g}:{stride:g}'


def sampling_period(t):
    """The median gap between frame times, None for a single frame."""
    return float(np.median(np.diff(t))) if len(t) > 1 else None


def video_span(t):
    """(start, end) seconds of a video's frames: its first time, and its last plus the sampling period (None
    when the video has one frame: it plays to the end of the file)."""
    p = sampling_period(t)
    return float(t[0]), (None if p is None else float(t[-1]) + p)


@dataclass(frozen=True)
class Window:
    video_id: str
    first: int            # first frame row of the video
    stop: int             # one past its last frame row
    start: float          # seconds
    end: object           # seconds, or None: to the end of the file


def windows_of(video_id, t, window, stride):
    """The windows of one video with frame times `t` (ascending), in time order (rules in the docstring)."""
    t = np.asarray(t, dtype=np.float64)
    _, video_end = video_span(t)
    if video_end is None:
        return [Window(video_id, 0, 1, float(t[0]), None)]
    out = []
    j = 0
    while True:
        start = float(t[0]) + j * stride
        first, stop = np.searchsorted(t, [start, start + window], side='left')
        if stop > first and not (out and (out[-1].first, out[-1].stop) == (first, stop)):
            out.append(Window(video_id, int(first), int(stop), start, min(start + window, video_end)))
        if start + window >= video_end:
            return out
        j += 1


def make_windows(video_ids, times, window, stride, source):
    """[Window] of every video, videos in `video_ids` order. `times`: {video id: seconds}, None when unknown
    (named `source` in the error)."""
    if times is None:
        raise DataError(f'{source}: no {FRAME_TIMES} (imported features?): moments need each frame\'s time; extract '
                        'the features from the videos with util/extract_features.py')
    missing = [v for v in video_ids if v not in times]
    if missing:
        raise DataError(f'{os.path.join(source, FRAME_TIMES)}: no times for {len(missing)} videos (first: '
                        f'{", ".join(missing[:3])}); re-run util/extract_features.py on the videos to record them')
    return [w for v in video_ids for w in windows_of(v, times[v], window, stride)]


class WindowFrames:
    """A FrameStore look-alike whose videos are windows: `data_provider.VideoDataset(range(len(windows)),
    WindowFrames(store, windows))` yields each window as a short video, so a gallery of windows is encoded by
    the same path, and the same model, as a gallery of videos."""

    def __init__(self, store, windows):
        self.store, self.windows, self.dim = store, list(windows), store.dim

    def frames(self, i):
        w = self.windows[i]
        return self.store.bigfile.read(self.store.video2frames[w.video_id][w.first:w.stop])     # (n, D)
