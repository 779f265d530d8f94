"""Run bookkeeping: run directories, run identity, logging, TensorBoard, per-epoch JSON lines."""
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys

import torch

logger = logging.getLogger('mlcmr')

# Arguments that do not change what a run computes: they stay out of the configuration hash.
NON_CONFIG_ARGS = {'rootpath', 'device', 'workers', 'overwrite', 'resume', 'log_step', 'skip_test',
                   'eval_workers', 'compile', 'postfix', 'cv_name', 'bert_name', 'strict'}


def run_cli(main_fn, args):
    """Run a CLI body; bad input (DataError) ends it with its one-line message instead of a traceback."""
    from basic.errors import DataError
    try:
        return main_fn(args)
    except DataError as e:
        logger.error('%s', e)
        raise SystemExit(f'error: {e}') from None


def config_hash(args):
    """Short hash of every argument that changes the result (NON_CONFIG_ARGS excluded)."""
    cfg = {k: v for k, v in sorted(vars(args).items()) if k not in NON_CONFIG_ARGS}
    return hashlib.sha1(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:8]


def run_name(args):
    """Readable run name with the configuration in it; the hash separates every other difference."""
    parts = [args.model, args.visual_feature]
    if args.model == 'nrccr':
        parts += [args.data_type, args.disc_type]
    else:
        parts += [args.train_mode, args.label_situation, args.target_language]
    return '_'.join(parts + [f'cfg{config_hash(args)}'])


def run_dir(args):
    """<rootpath>/<collection>/<cv_name>/<collection>/<run name>/<postfix> (the reference's layout, plus
    the configuration component the MLCMR reference lacked)."""
    return os.path.join(args.rootpath, args.collection, args.cv_name, args.collection, run_name(args),
                        args.postfix)


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


def setup_logging(log_file=None, main_process=True):
    """Console + file logging with timestamps; non-main ranks log warnings only."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, '_mlcmr', False):
            root.removeHandler(h)
            h.close()
    fmt = logging.Formatter('%(asctime)s %(levelname)s %(message)s', '%H:%M:%S')
    handlers = [logging.StreamHandler(sys.stdout)]
    if log_file and main_process:
        handlers.append(logging.FileHandler(log_file))
    for h in handlers:
        h.setFormatter(fmt)
        h._mlcmr = True
        root.addHandler(h)
    root.setLevel(logging.INFO if main_process else logging.WARNING)
    for noisy in ('transformers', 'httpx', 'urllib3'):
        logging.getLogger(noisy).setLevel(logging.ERROR)


class MetricsWriter:
    """TensorBoard scalars (stable tags) plus one JSON line per epoch in metrics.jsonl; main rank only."""

    def __init__(self, directory, enabled=True):
        self.enabled = enabled
        self.tb = None
        self.jsonl = os.path.join(directory, 'metrics.jsonl')
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(directory, flush_secs=10)

    def scalars(self, values, step, prefix=''):
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f'{prefix}{k}', v, step)

    def epoch_line(self, record):
        if self.enabled:
            with open(self.jsonl, 'a') as f:
                f.write(json.dumps(record, sort_keys=True) + '\n')

    def close(self):
        if self.tb is not None:
            self.tb.close()
