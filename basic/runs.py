"""Run bookkeeping: flag parsing, CLI errors, run directories, run identity, logging, TensorBoard and the
per-epoch history files."""
import argparse
import errno
import fnmatch
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys

import torch

from basic import checkpoint as ckpt

logger = logging.getLogger('mlcmr')

# Flags accepted for the original scripts that change nothing (the trainer lists them under
# "Compatibility (accepted, no effect)" in --help).
COMPAT_ARGS = frozenset({'collectionStrt', 'text_layer', 'text_pooling', 'video_pooling',
                         'momentum', 'optim', 'measure', 'text_norm', 'visual_norm', 'gru_pool', 'val_metric',
                         'img_encoder_name', 'img_encoder_input_dim', 'img_path'})
# Flags that change where and how a run executes, not what it computes.
RUN_ONLY_ARGS = frozenset({'rootpath', 'device', 'workers', 'overwrite', 'resume', 'log_step', 'log_every',
                           'skip_test', 'compile', 'postfix', 'cv_name', 'strict'})
# Both stay out of the configuration hash; values the trainer derives (val_batch_size, amp_resolved) follow
# their flag.
NON_CONFIG_ARGS = COMPAT_ARGS | RUN_ONLY_ARGS | {'val_batch_size', 'amp_resolved', 'run_name_flags'}
# Flags of image runs: in the hash of image runs only, so a video run keeps the folder it had before images.
IMAGE_ONLY_ARGS = frozenset({'model_type', 'img_encoder', 'task', 'clean_eval'})

# Output errors turned into one line: no space, no permission, read-only file system. Other OSErrors
# (a missing file, a bad descriptor, ...) keep their traceback: they point at a bug or a bad input.
_OUTPUT_ERRNOS = {errno.ENOSPC: 'the disk is full: free space (or choose another --rootpath / --results_dir) '
                                'and run the same command again; a training run resumes from its last checkpoint',
                  errno.EDQUOT: 'the disk quota is exceeded: free space (or choose another --rootpath / '
                                '--results_dir) and run the same command again',
                  errno.EROFS: 'the file system is read-only: choose a writable --rootpath (or --results_dir)',
                  errno.EACCES: 'permission denied: make the folder writable or choose another --rootpath '
                                '(or --results_dir)',
                  errno.EPERM: 'operation not permitted: make the folder writable or choose another --rootpath '
                               '(or --results_dir)'}


def bool_flag(s):
    """argparse type for on/off flags: 1/0, true/false, on/off, yes/no."""
    if str(s).lower() in ('1', 'true', 'on', 'yes'):
        return True
    if str(s).lower() in ('0', 'false', 'off', 'no'):
        return False
    raise argparse.ArgumentTypeError(f'expected 0/1/true/false, got {s!r}')


def output_error_message(error):
    """The one-line message for an OSError of writing outputs, or None when it is not one of those."""
    advice = _OUTPUT_ERRNOS.get(getattr(error, 'errno', None))
    if advice is None:
        return None
    where = error.filename if error.filename is not None else 'an output file'
    return f'{where}: {error.strerror or os.strerror(error.errno)}; {advice}'


def run_cli(main_fn, args):
    """Run a CLI body; bad input (DataError) and an output folder that cannot be written (full disk,
    read-only, no permission) end it with a one-line message instead of a traceback. The message reaches
    the terminal once (as `error: ...`) and the log file, when one is open, once."""
    from basic.errors import DataError
    try:
        return main_fn(args)
    except DataError as e:
        log_to_file_only(f'{e}')
        raise SystemExit(f'error: {e}') from None
    except OSError as e:
        message = output_error_message(e)
        if message is None:
            raise
        raise SystemExit(f'error: {message}') from None     # not logged: the log file may be what failed


def config_hash(args):
    """Short hash of every argument that changes the result (NON_CONFIG_ARGS excluded; IMAGE_ONLY_ARGS too
    unless it is an image run)."""
    skip = NON_CONFIG_ARGS | (frozenset() if getattr(args, 'model_type', 'video') == 'img' else IMAGE_ONLY_ARGS)
    cfg = {k: v for k, v in sorted(vars(args).items()) if k not in skip}
    return hashlib.sha1(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:8]


def run_name(args):
    """Readable run name with the configuration in it: the model, the feature and the flags its class names
    (`args.run_name_flags`, set by the trainer from RUN_NAME_FLAGS); the hash separates every other difference."""
    parts = [args.model, args.visual_feature] + [str(getattr(args, k)) for k in args.run_name_flags]
    return '_'.join(parts + [f'cfg{config_hash(args)}'])


def run_dir(args):
    """<rootpath>/<collection>/<cv_name>/<collection>/<run name>/<postfix> (the reference's layout, plus
    the configuration component the MLCMR reference lacked)."""
    return os.path.join(args.rootpath, args.collection, args.cv_name, args.collection, run_name(args),
                        args.postfix)


# Files a training run writes into its folder: what `--overwrite 1` replaces (basic/replacement.py); anything
# else there (e.g. search.py's search_cache/) is left alone.
RUN_FILES = ('checkpoint_last.pth.tar', 'model_best.pth.tar', 'metrics.jsonl', 'val_metric_hist.txt',
             'val_metric.txt', 'train.log', 'args.json', 'env.json')
TB_EVENTS = 'events.out.tfevents.*'


def is_run_file(name):
    """A file name of a training run: its checkpoints, history, log, TensorBoard events, temporary files."""
    return name in RUN_FILES or fnmatch.fnmatch(name, TB_EVENTS) or ckpt.is_temp_name(name)


def run_committed(directory):
    """The run in `directory` can resume (checkpoint_last.pth.tar) or has finished (val_metric.txt): the
    commit point of a run that replaces another (docs/training.md, 'Overwriting a run')."""
    return any(os.path.isfile(os.path.join(directory, n)) for n in ('checkpoint_last.pth.tar', 'val_metric.txt'))


def atomic_write_text(path, text):
    """Write `text` to `path` through a temporary file and `os.replace`: a kill leaves the old file or the
    new one (and at worst a temporary file that `checkpoint.remove_stale_temp_files` removes)."""
    tmp = ckpt.temp_path(path)
    try:
        with open(tmp, 'w') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            try:
                os.remove(tmp)
            except OSError:
                pass
        if e.filename is None and e.errno is not None:      # a failed write names no file
            raise OSError(e.errno, e.strerror, path) from e
        raise


def write_history(directory, history):
    """The per-epoch history files, rewritten whole from `history` (the list of epoch records kept in the
    checkpoint): metrics.jsonl (one JSON line per epoch) and val_metric_hist.txt (`epoch_N: score`).
    Rewriting from the checkpoint's list is what keeps them exact across a kill: an epoch whose checkpoint
    was saved is never missing, one whose checkpoint was not is dropped and trained again."""
    atomic_write_text(os.path.join(directory, 'metrics.jsonl'),
                      ''.join(json.dumps(r, sort_keys=True) + '\n' for r in history))
    atomic_write_text(os.path.join(directory, 'val_metric_hist.txt'),
                      ''.join(f'epoch_{r["epoch"]}: {r["score"]}\n' for r in history))


def read_history(directory, before_epoch):
    """Epoch records from metrics.jsonl with epoch < before_epoch, one per epoch (the last line wins): the
    history of a checkpoint written before checkpoints carried it."""
    path = os.path.join(directory, 'metrics.jsonl')
    records = {}
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:          # a torn last line
                    continue
                if isinstance(r, dict) and isinstance(r.get('epoch'), int) and r['epoch'] < before_epoch:
                    records[r['epoch']] = r
    return [records[e] for e in sorted(records)]


def git_state():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=here, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = bool(subprocess.run(['git', 'status', '--porcelain'], cwd=here, capture_output=True,
                                    text=True, timeout=5).stdout.strip())
        return {'git_sha': sha or None, 'git_dirty': dirty}
    except (OSError, subprocess.SubprocessError):
        return {'git_sha': None, 'git_dirty': None}


def write_identity(directory, args, extra=None):
    """args.json (every argument) and env.json (git sha, versions) — written once per run."""
    with open(os.path.join(directory, 'args.json'), 'w') as f:
        json.dump(vars(args), f, indent=2, sort_keys=True, default=str)
    env = dict(git_state(), python=platform.python_version(), torch=torch.__version__,
               cuda=torch.version.cuda, argv=sys.argv, **(extra or {}))
    with open(os.path.join(directory, 'env.json'), 'w') as f:
        json.dump(env, f, indent=2, default=str)


_FILE_ONLY = 'file_only'           # a record attribute: write the record to the log file, not to the console
_FORMAT = logging.Formatter('%(asctime)s %(levelname)s %(message)s', '%H:%M:%S')


class _EarlyRecords(logging.Handler):
    """The records logged before the log file can be opened (the run folder is written only once every
    input was read); `attach_log_file` writes them into it first."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def _tag(handler, kind):
    handler._mlcmr = kind            # 'console', 'file' or 'early': the handlers setup_logging owns
    return handler


def setup_logging(log_file=None, main_process=True):
    """Console + file logging with timestamps; non-main ranks log warnings only. Without `log_file` the
    main process keeps the records until `attach_log_file` names the file."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, '_mlcmr', False):
            root.removeHandler(h)
            h.close()
    console = _tag(logging.StreamHandler(sys.stdout), 'console')
    console.addFilter(lambda record: not getattr(record, _FILE_ONLY, False))
    handlers = [console]
    if log_file and main_process:
        handlers.append(_tag(logging.FileHandler(log_file), 'file'))
    elif main_process:
        handlers.append(_tag(_EarlyRecords(), 'early'))
    for h in handlers:
        h.setFormatter(_FORMAT)
        root.addHandler(h)
    root.setLevel(logging.INFO if main_process else logging.WARNING)
    for noisy in ('transformers', 'httpx', 'urllib3'):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def attach_log_file(log_file):
    """Open the log file of a `setup_logging()` begun without one: the records kept so far go in first."""
    root = logging.getLogger()
    handler = _tag(logging.FileHandler(log_file), 'file')
    handler.setFormatter(_FORMAT)
    for early in [h for h in root.handlers if getattr(h, '_mlcmr', None) == 'early']:
        for record in early.records:
            handler.handle(record)
        root.removeHandler(early)
    root.addHandler(handler)


def log_to_file_only(message):
    """`message` as an error into the log file (or the records kept for it), not to the console; nothing
    when no log file is set up (the caller prints it)."""
    if any(getattr(h, '_mlcmr', None) in ('file', 'early') for h in logging.getLogger().handlers):
        logger.error('%s', message, extra={_FILE_ONLY: True})


class MetricsWriter:
    """TensorBoard scalars (stable tags) and the history files (`write_history`); main rank only.

    `purge_step`: on resume, the global step of the checkpoint; TensorBoard then hides the scalars that the
    interrupted process logged after it, so a resumed run's curves hold each step once."""

    def __init__(self, directory, enabled=True, purge_step=None):
        self.enabled, self.directory = enabled, directory
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(directory, flush_secs=10, purge_step=purge_step or None)

    def scalars(self, values, step, prefix=''):
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f'{prefix}{k}', v, step)

    def history(self, records):
        if self.enabled:
            write_history(self.directory, records)

    def close(self):
        if self.tb is not None:
            self.tb.close()
