"""Extract CLIP frame features from a folder of videos into a BigFile feature folder.

    python util/extract_features.py --videos my_videos/ --out ~/VisualSearch/mine/FeatureData/clip_b32
    python util/extract_features.py --videos my_videos/ --out FEATURE_DIR --fps 2 --device cuda --batch_size 256

Each video (`.mp4 .avi .mkv .mov .webm .m4v .mpg .mpeg .flv .wmv`, directly inside --videos; id = file name
without extension) is decoded with PyAV (`pip install av`), frames are sampled at --fps (the first frame, then
the first frame at or after every 1/fps seconds), and each frame is embedded with the CLIP vision tower and its
projection (basic/clip_encoder.py; `--model` is a hub id or a local folder). The folder written is the one of
util/import_features.py: feature.bin / id.txt / shape.txt with frame ids `<video>_<i>`, and video2frames.txt.

Resumable: every finished video is first written, atomically, as its own shard `OUT/.shards/<video>.npy`; the
BigFile is assembled from the shards (and from the rows of a previous BigFile in OUT) when all videos are done,
then the shards are removed. Re-running the same command skips finished videos (so adding videos to the folder
and re-running extracts only the new ones); a video interrupted mid-way has no shard and is redone. The settings
(model, fps, max frames) and the identity of the CLIP (its name, size and a fingerprint of its visual projection,
basic/clip_encoder.py `clip_identity`; a zero-shot text model is checked against it) are kept in
OUT/extract_settings.json, and a re-run with other settings is refused unless --overwrite 1. Frames of several
videos share one batch. Decoding runs in --decode_workers threads ahead of the model. Unreadable videos (and ids
id.txt cannot hold) are listed, written to OUT/extract_failed.txt and skipped; they are tried again on the next
run.

Frame times and thumbnails (docs/search.md, 'The search page'): each sampled frame's time (seconds from the
start of the file) goes to OUT/frame_times.txt (basic/media.py), and the absolute --videos folder to
OUT/video_folder.txt, for search to show and play the matched moment. With --thumbnails, one small JPEG per
frame (OUT/thumbnails/<video>/<i>.jpg, i = the frame's row) and one per video (OUT/thumbnails/<video>.jpg, its
middle frame, written last) are written beside the features; resumable like the features: a re-run writes the
ones still missing (decoding those videos again, without the CLIP pass when their features exist), and records
the times of videos extracted before times were kept.

Note: the models read at most 64 frames per video (the first 64, or 64 spread over the video with
`--frame_sampling uniform` at training time); at --fps 1 that is a minute of video.
"""
import argparse
import collections
import concurrent.futures
import json
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from basic.bigfile import FILES, BigFile, BigFileWriter      # noqa: E402
from basic.errors import DataError                           # noqa: E402
from basic import media                                      # noqa: E402
from basic.video2frames import FILENAME as V2F_FILENAME      # noqa: E402
from basic.video2frames import load_video2frames, write_video2frames  # noqa: E402
from basic.clip_encoder import DEFAULT_CLIP                   # noqa: E402
from util.import_features import check_video_id              # noqa: E402

VIDEO_EXTS = media.VIDEO_EXTS
SHARD_DIR = '.shards'
TIMES_DIR = 'times'          # OUT/.shards/times/<video>.npy: frame times, written before the features shard
SETTINGS = 'extract_settings.json'
FAILED = 'extract_failed.txt'


def _require_av():
    try:
        import av
    except ImportError:
        raise DataError('decoding videos needs PyAV: pip install av (see requirements-optional.txt)') from None
    return av


def list_videos(folder):
    """[(video id, path)] of the video files directly inside `folder`, sorted by id."""
    if not os.path.isdir(folder):
        raise DataError(f'--videos {folder}: not a folder')
    out = []
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in VIDEO_EXTS and os.path.isfile(os.path.join(folder, name)):
            out.append((stem, os.path.join(folder, name)))
    if not out:
        raise DataError(f'--videos {folder}: no video files there ({" ".join(VIDEO_EXTS)})')
    return out


def sample_frames(path, fps, max_frames=0):
    """(PIL images, their times in seconds) of `path` sampled at `fps`: the first frame, then the first frame at
    or after each 1/fps step.

    Frame times come from the stream's timestamps (index / average rate when a frame has none)."""
    av = _require_av()
    step = 1.0 / fps
    images, times = [], []
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError('no video stream')
        stream = container.streams.video[0]
        stream.thread_type = 'AUTO'
        rate = float(stream.average_rate) if stream.average_rate else 25.0
        next_t = None
        for i, frame in enumerate(container.decode(stream)):
            t = frame.time if frame.time is not None else i / rate
            if next_t is None:
                next_t = t                          # the first frame, whatever its start time
            if t + 1e-6 >= next_t:
                images.append(frame.to_image())
                times.append(float(t))
                while next_t <= t + 1e-6:
                    next_t += step
                if max_frames and len(images) >= max_frames:
                    break
    if not images:
        raise ValueError('no decodable frames')
    return images, times


def _settings(args, embedder):
    return {'model': args.model, 'fps': args.fps, 'max_frames': args.max_frames, 'dims': embedder.dim,
            'clip': embedder.identity}


def _same_settings(old, new):
    """A folder written before a setting was recorded (e.g. 'clip') accepts it; every recorded one must match."""
    return all(old[k] == new[k] for k in old if k in new)


def _write_shard(shard_dir, vid, rows):
    tmp = os.path.join(shard_dir, f'.{vid}.tmp{os.getpid()}.npy')
    np.save(tmp, rows)
    os.replace(tmp, os.path.join(shard_dir, f'{vid}.npy'))


def _previous_rows(out):
    """(BigFile, video2frames, frame times) of an assembled folder in `out`, or (None, {}, {})."""
    if not all(os.path.exists(os.path.join(out, n)) for n in FILES):
        return None, {}, {}
    bf = BigFile(out)
    v2f = load_video2frames(out, bf.names)
    return bf, v2f, media.load_frame_times(out, v2f) or {}


def extract(args, log=print):
    """Extract every video of args.videos into args.out; returns a summary dict."""
    from tqdm import tqdm

    _require_av()
    videos = list_videos(args.videos)
    failed = []
    good = []
    for vid, path in videos:
        reason = check_video_id(vid) or media.check_file_name(vid)
        (failed.append((path, reason)) if reason else good.append((vid, path)))

    # ============ settings and what is already done ============
    os.makedirs(args.out, exist_ok=True)
    shard_dir = os.path.join(args.out, SHARD_DIR)
    times_dir = os.path.join(shard_dir, TIMES_DIR)
    settings_path = os.path.join(args.out, SETTINGS)
    if args.overwrite:
        shutil.rmtree(shard_dir, ignore_errors=True)
        shutil.rmtree(os.path.join(args.out, media.THUMBNAILS), ignore_errors=True)
        for name in (*FILES, V2F_FILENAME, SETTINGS, media.FRAME_TIMES, media.VIDEO_FOLDER):
            if os.path.exists(os.path.join(args.out, name)):
                os.remove(os.path.join(args.out, name))
    old_settings = None
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            old_settings = json.load(f)
    elif any(os.path.exists(os.path.join(args.out, n)) for n in FILES):
        raise DataError(f'{args.out}: holds a feature folder not made by extract_features.py; choose another --out '
                        'or pass --overwrite 1')

    from basic.clip_encoder import ClipImageEmbedder
    embedder = ClipImageEmbedder(args.model, device=args.device)
    settings = _settings(args, embedder)
    if old_settings is not None and not _same_settings(old_settings, settings):
        raise DataError(f'{settings_path}: features there were made with {old_settings}, this run asks for '
                        f'{settings}; pass --overwrite 1 to start over, or choose another --out')
    with open(settings_path, 'w') as f:
        json.dump(settings, f, indent=2)
    os.makedirs(times_dir, exist_ok=True)
    thumb_dir = os.path.join(args.out, media.THUMBNAILS) if args.thumbnails else None

    previous, previous_v2f, previous_times = _previous_rows(args.out)

    def has_features(vid):
        return os.path.exists(os.path.join(shard_dir, f'{vid}.npy')) or vid in previous_v2f

    def has_times(vid):
        return os.path.exists(os.path.join(times_dir, f'{vid}.npy')) or vid in previous_times

    def has_thumbnails(vid):
        return thumb_dir is None or os.path.exists(media.thumbnail_path(thumb_dir, vid))

    done = {vid for vid, _ in good if has_features(vid)}
    todo = [(vid, path) for vid, path in good if vid not in done]
    touch_up = [(vid, path) for vid, path in good if vid in done and not (has_times(vid) and has_thumbnails(vid))]
    log(f'{len(videos)} videos: {len(done)} already extracted, {len(todo)} to do'
        + (f', {len(touch_up)} to complete (frame times or thumbnails)' if touch_up else '')
        + (f', {len(failed)} with unusable names' if failed else ''))

    # ============ decode (threads, thumbnails there too) -> batched CLIP -> shards ============
    def decode(item):
        vid, path, embed = item
        try:
            images, times = sample_frames(path, args.fps, args.max_frames)
            pixels = embedder.preprocess(images) if embed else None
        except Exception as e:     # PyAV raises many error types for broken files: name the file and go on
            first = str(e).splitlines()[0] if str(e) else '-'
            return vid, path, None, None, f'unreadable ({type(e).__name__}: {first})'
        if thumb_dir and not has_thumbnails(vid):
            media.write_thumbnails(thumb_dir, vid, images, args.thumb_size)
        return vid, path, times, pixels, None

    def record_times(vid, times):
        """Times of a video whose features exist: kept when they match its rows (same settings, same file)."""
        shard = os.path.join(shard_dir, f'{vid}.npy')
        rows = len(previous_v2f[vid]) if vid in previous_v2f else len(np.load(shard, mmap_mode='r'))
        if len(times) == rows:
            _write_shard(times_dir, vid, np.asarray(times, dtype=np.float64))
        else:
            log(f'{vid}: {len(times)} frames decoded now, {rows} in its features (the file changed?); its frame '
                'times are not recorded: re-extract it with --overwrite 1')

    import torch
    t0, frames_done, extracted = time.time(), 0, 0
    bar = tqdm(total=len(todo) + len(touch_up), desc='extract', unit='video', disable=not args.progress,
               dynamic_ncols=True)
    buffer, buffered = [], 0

    def flush():
        nonlocal buffer, buffered, frames_done, extracted
        if not buffer:
            return
        pixels = torch.cat([p for _, p, _ in buffer])
        rows = np.concatenate([embedder.embed_pixels(pixels[i:i + args.batch_size])
                               for i in range(0, len(pixels), args.batch_size)])
        start = 0
        for vid, p, times in buffer:
            _write_shard(times_dir, vid, np.asarray(times, dtype=np.float64))    # before the features: done = both
            _write_shard(shard_dir, vid, rows[start:start + len(p)])
            start += len(p)
            extracted += 1
            bar.update(1)
        frames_done += start
        buffer, buffered = [], 0

    def take(result):
        nonlocal buffered
        vid, path, times, pixels, error = result
        if error:
            failed.append((path, error))
        elif pixels is None:
            record_times(vid, times)
            bar.update(1)
        else:
            buffer.append((vid, pixels, times))
            buffered += len(pixels)
        if buffered >= args.batch_size:
            flush()

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.decode_workers)) as pool:
        pending = collections.deque()
        ahead = 2 * max(1, args.decode_workers)
        for item in [(vid, path, True) for vid, path in todo] + [(vid, path, False) for vid, path in touch_up]:
            pending.append(pool.submit(decode, item))
            if len(pending) >= ahead:
                take(pending.popleft().result())
        while pending:
            take(pending.popleft().result())
        flush()
    bar.close()
    elapsed = time.time() - t0

    # ============ assemble ============
    finished = sorted(vid for vid, _ in good if has_features(vid))
    mapping, frame_times, total = {}, {}, 0
    if finished:
        with BigFileWriter(args.out, embedder.dim) as writer:
            for vid in finished:
                shard = os.path.join(shard_dir, f'{vid}.npy')
                rows = np.load(shard) if os.path.exists(shard) else previous.read(previous_v2f[vid])
                names = [f'{vid}_{i}' for i in range(len(rows))]
                writer.add_rows(names, rows)
                mapping[vid] = names
                total += len(names)
                times_shard = os.path.join(times_dir, f'{vid}.npy')
                times = np.load(times_shard) if os.path.exists(times_shard) else previous_times.get(vid)
                if times is not None and len(times) == len(rows):
                    frame_times[vid] = times
        write_video2frames(os.path.join(args.out, V2F_FILENAME), mapping)
        media.write_frame_times(os.path.join(args.out, media.FRAME_TIMES), frame_times)
        media.write_video_folder(args.out, args.videos)
        if not args.keep_shards:
            shutil.rmtree(shard_dir, ignore_errors=True)
    with open(os.path.join(args.out, FAILED), 'w', encoding='utf-8') as f:
        f.write(''.join(f'{path}\t{reason}\n' for path, reason in failed))
    return {'out': args.out, 'videos': len(mapping), 'frames': total, 'dims': embedder.dim, 'extracted': extracted,
            'skipped_done': len(done), 'completed': len(touch_up), 'timed': len(frame_times), 'failed': failed,
            'seconds': elapsed, 'videos_per_s': extracted / elapsed if elapsed > 0 else 0.0,
            'frames_per_s': frames_done / elapsed if elapsed > 0 else 0.0}


def get_args_parser():
    p = argparse.ArgumentParser('extract_features', add_help=False)
    p.add_argument('--videos', required=True, help='folder of video files (not searched recursively)')
    p.add_argument('--out', required=True, help='feature folder to write, e.g. ROOT/C/FeatureData/<feature>')
    p.add_argument('--fps', type=float, default=1.0, help='frames sampled per second of video (1)')
    p.add_argument('--max_frames', type=int, default=0, help='at most this many frames per video (0: no limit)')
    p.add_argument('--model', default=DEFAULT_CLIP, help=f'CLIP hub id or local folder ({DEFAULT_CLIP})')
    p.add_argument('--batch_size', type=int, default=64, help='frames per CLIP forward pass (64)')
    p.add_argument('--decode_workers', type=int, default=2, help='threads decoding videos ahead of the model (2)')
    p.add_argument('--device', default='auto', help='auto (cuda when available), cpu, cuda, cuda:1, ...')
    p.add_argument('--thumbnails', type=int, default=0, choices=[0, 1],
                   help='1: also write small JPEGs, one per video and one per sampled frame, in OUT/thumbnails '
                        '(for the search page, search.py --serve)')
    p.add_argument('--thumb_size', type=int, default=160, help='thumbnail size, pixels on the longer side (160)')
    p.add_argument('--keep_shards', type=int, default=0, choices=[0, 1],
                   help='1: keep the per-video shards in OUT/.shards after assembling (default: removed)')
    p.add_argument('--overwrite', type=int, default=0, choices=[0, 1],
                   help='1: discard what OUT holds and extract every video again')
    p.add_argument('--progress', type=int, default=1, choices=[0, 1], help='progress bar (1)')
    return p


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], parents=[get_args_parser()])
    args = parser.parse_args(argv)
    if args.fps <= 0:
        parser.error('--fps must be > 0')
    if args.thumb_size < 16:
        parser.error('--thumb_size must be >= 16 pixels')
    if args.device == 'auto':
        import torch
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        summary = extract(args)
    except DataError as e:
        raise SystemExit(f'error: {e}') from None
    for path, reason in summary['failed']:
        print(f'skipped {path}: {reason}', file=sys.stderr)
    print(f'{summary["out"]}: {summary["videos"]} videos, {summary["frames"]} frames x {summary["dims"]} dims '
          f'({summary["extracted"]} extracted now at {summary["videos_per_s"]:.1f} videos/s, '
          f'{summary["skipped_done"]} already done'
          + (f', {len(summary["failed"])} skipped, listed in {os.path.join(summary["out"], FAILED)})'
             if summary['failed'] else ')')
          + (f'; thumbnails in {os.path.join(summary["out"], media.THUMBNAILS)}' if args.thumbnails else ''))
    return summary


if __name__ == '__main__':
    main()
