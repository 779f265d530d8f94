"""Checkpoint files: atomic save, safe load, RNG state, key clean-up (docs/models.md, 'Checkpoint formats').

Our checkpoints are one dict of tensors and plain types, so they load with `torch.load(weights_only=True)`.
The original release formats (`model` = a list of state dicts: 5 for NRCCR, docs/models.md, 'Checkpoint formats', 4 for MLCMR;
`opt` = argparse.Namespace) are unpickled with `argparse.Namespace` (and numpy scalars) as the only extra
allowed classes; any other class is refused.
"""
import argparse
import os
import pickle
import random
import re
import uuid
from collections import OrderedDict

import numpy as np
import torch

from basic.errors import DataError

FORMAT_VERSION = 1

_PREFIXES = ('module.', '_orig_mod.')      # DataParallel/DDP wrapper, torch.compile wrapper
# Original release checkpoints, told apart by the length of their `model` list:
#   NRCCR [video encoder, text encoder, video mapping, text mapping, discriminator]
#   MLCMR [video encoder, text encoder, video mapping, text mapping]
_LEGACY_PARTS = {5: 'nrccr', 4: 'mlcmr'}


# `.<name>.<pid>.<8 hex>.tmp`: the temporary file of an atomic write of <name> (a checkpoint, a history file)
_TEMP_RE = re.compile(r'^\..+\.\d+\.[0-9a-f]{8}\.tmp$')


def temp_path(path):
    """A unique temporary name next to `path` for an atomic write (see `remove_stale_temp_files`)."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f'.{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp')


def is_temp_name(name):
    """`name` is the temporary file of an atomic write (see `temp_path`)."""
    return bool(_TEMP_RE.match(name))


def remove_stale_temp_files(directory):
    """Remove the temporary files that atomic writes into `directory` left behind when their process was
    killed (`kill -9` during a save). Only names of that exact pattern, only in `directory` itself; call it
    when no other process writes there (the trainer's main rank at start-up). Returns the removed paths."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if is_temp_name(name) and os.path.isfile(path):
            os.remove(path)
            removed.append(path)
    return removed


class _WriteRecorder:
    """A file wrapper that remembers the OSError of a failed write: torch.save reports a full disk as a
    RuntimeError ('unexpected pos', 'file write failed'), losing the errno; this keeps it."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self):
        return self.f.flush()


def _with_path(error, path):
    """`error` (an OSError) naming `path` when it names no file itself."""
    if error.filename is None and error.errno is not None:
        return OSError(error.errno, error.strerror or os.strerror(error.errno), path)
    return error


def save_checkpoint(state: dict, path):
    """Write `state` to `path` atomically: a temporary file in the same directory, flushed and fsynced, then
    `os.replace`, so a crash leaves either the old file or the new one, never a torn file. Adds
    `format_version` when the dict has none.

    Raises TypeError (and leaves `path` alone) when `state` holds objects that `weights_only` loading would
    refuse (a numpy scalar, a Namespace, ...): better at the first save than at resume time. A write that
    fails for lack of space or permission raises that OSError (errno kept, naming `path`), also when it
    happened inside torch.save."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # a unique name created with open(): permissions follow the umask (mkstemp would force 0600)
    tmp = temp_path(path)
    try:
        with open(tmp, 'xb') as f:
            recorder = _WriteRecorder(f)
            try:
                torch.save({'format_version': FORMAT_VERSION, **state}, recorder)
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:
                named = _with_path(e, path)
                if named is e:
                    raise
                raise named from e
            except RuntimeError as e:
                if recorder.error is None:
                    raise
                raise _with_path(recorder.error, path) from e
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(tmp)
        if unsafe:
            raise TypeError(f'checkpoint state for {path} holds {", ".join(unsafe)}, which weights_only loading '
                            'refuses; store plain types instead (float(x), x.tolist(), vars(namespace))')
        os.replace(tmp, path)
    except BaseException:
        try:
            if os.path.exists(tmp):
                os.remove(tmp)
        except OSError:         # e.g. a read-only folder: the original error is the one to report
            pass
        raise
    if hasattr(os, 'O_DIRECTORY'):     # make the rename itself durable (POSIX)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint(path, map_location='cpu') -> dict:
    """The checkpoint dict at `path`, loaded with `weights_only=True`.

    A file in an original release format comes back with `legacy: True`, `legacy_model` ('nrccr' or
    'mlcmr') and `opt` as a plain dict.
    Raises DataError (one line naming the file and the fix) for a missing, truncated or corrupt file, a file
    that is not a checkpoint, one written by a newer format, or one that would need other classes unpickled.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f'{path}: checkpoint not found; check the path (or the run was killed before its first '
                        'save: train it again)')
    try:
        saved = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        saved = _load_with_allow_list(path, map_location, e)
    except Exception as e:         # torch raises RuntimeError, EOFError, KeyError, ... for damaged files
        raise _unreadable(path, e) from e
    if not isinstance(saved, dict):
        raise DataError(f'{path}: holds a {type(saved).__name__}, not a checkpoint dict; choose another file')
    if _is_legacy(saved):
        opt = saved.get('opt')
        return dict(saved, opt=vars(opt) if isinstance(opt, argparse.Namespace) else dict(opt), legacy=True,
                    legacy_model=_LEGACY_PARTS[len(saved['model'])])
    version = saved.get('format_version')
    if not isinstance(version, int):
        raise DataError(f'{path}: not a checkpoint of this code (no format_version) nor an original NRCCR or '
                        'MLCMR release checkpoint; choose another file')
    if version > FORMAT_VERSION:
        raise DataError(f'{path}: checkpoint format {version} is newer than this code understands '
                        f'({FORMAT_VERSION}); update the code')
    return saved


def _legacy_allow_list():
    """Classes the original release pickles hold: the options Namespace, and numpy scalars (e.g. a
    `best_rsum` of type numpy.float64), which are rebuilt from a dtype and raw bytes without running code."""
    import numpy as np
    scalar = np._core.multiarray.scalar if hasattr(np, '_core') else np.core.multiarray.scalar
    return [argparse.Namespace, np.dtype, (scalar, 'numpy.core.multiarray.scalar'),
            (scalar, 'numpy._core.multiarray.scalar'), type(np.dtype(np.float64)), type(np.dtype(np.float32))]


def _allowed_names():
    names = set()
    for item in _legacy_allow_list():
        obj, name = item if isinstance(item, tuple) else (item, f'{item.__module__}.{item.__qualname__}')
        names.add(name)
    return names


def _load_with_allow_list(path, map_location, error):
    """Second attempt for a file that needs classes beyond tensors and plain types: only the original
    release format, whose one such class is argparse.Namespace, is accepted."""
    try:
        needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:              # not even a readable archive: the unpickling failed on damaged bytes
        needed = set()
    if not needed:
        raise _unreadable(path, error, 'invalid pickle data') from error
    refused = sorted(needed - _allowed_names())
    if refused:
        raise DataError(f'{path}: refusing to unpickle {", ".join(refused)} (only tensors, plain types and, in '
                        'original NRCCR / MLCMR release checkpoints, argparse.Namespace are loaded); choose another '
                        'file or re-download it from a trusted source')
    try:
        with torch.serialization.safe_globals(_legacy_allow_list()):
            saved = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise _unreadable(path, e) from e
    if not _is_legacy(saved):
        raise DataError(f'{path}: contains an argparse.Namespace but is not in an original release layout (a dict '
                        "with 'opt' and 'model' = a list of 5 (NRCCR) or 4 (MLCMR) state dicts); choose another file")
    return saved


def _is_legacy(saved):
    """An original release layout: no format_version, `model` = a list of 5 (NRCCR) or 4 (MLCMR) state
    dicts, `opt` = the options."""
    if not isinstance(saved, dict) or 'format_version' in saved:
        return False
    parts = saved.get('model')
    return (isinstance(parts, (list, tuple)) and len(parts) in _LEGACY_PARTS and all(isinstance(p, dict) for p in parts)
            and isinstance(saved.get('opt'), (argparse.Namespace, dict)))


def _unreadable(path, error, reason=None):
    if reason is None:
        lines = str(error).strip().splitlines()
        reason = f'{type(error).__name__}: {lines[0].split(". ")[0][:100]}' if lines else type(error).__name__
    return DataError(f'{path}: cannot read the checkpoint ({reason}); the file is truncated, corrupt or not a '
                     'PyTorch checkpoint: re-download it or choose another file')


def capture_rng_state() -> dict:
    """RNG states of python `random`, numpy's global generator, torch CPU and every CUDA device (when
    available), as tensors and plain types only, so they load with `weights_only=True`."""
    version, mt, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        'python': {'version': version, 'mt': torch.tensor(mt, dtype=torch.int64), 'gauss_next': gauss_next},
        'numpy': {'name': str(name), 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                  'has_gauss': int(has_gauss), 'cached_gaussian': float(cached_gaussian)},
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict):
    """Inverse of `capture_rng_state`. CUDA states are restored for the devices present (a resume on fewer
    GPUs restores the first ones)."""
    py = state['python']
    random.setstate((py['version'], tuple(py['mt'].tolist()), py['gauss_next']))
    n = state['numpy']
    np.random.set_state((n['name'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    torch.set_rng_state(state['torch'].cpu())
    if 'cuda' in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state['cuda'][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device)


def strip_module_prefix(state_dict) -> dict:
    """`state_dict` with leading `module.` (DataParallel/DDP) and `_orig_mod.` (torch.compile) prefixes removed,
    in any nesting order; the `_metadata` that load_state_dict reads is kept, its keys stripped likewise."""
    def strip(key):
        while key.startswith(_PREFIXES):
            key = key[len(next(p for p in _PREFIXES if key.startswith(p))):]
        return key

    out = OrderedDict((strip(k), v) for k, v in state_dict.items())
    metadata = getattr(state_dict, '_metadata', None)
    if metadata is not None:
        # keys are module paths without the trailing dot: 'module' -> '' (root), 'module.enc' -> 'enc'
        out._metadata = OrderedDict((strip(k + '.')[:-1], v) for k, v in metadata.items())
    return out
