"""Progress of long loops that shows both on a terminal and in a log file.

tqdm hides itself when stderr is not a terminal, so a job under nohup, sbatch or CI would print nothing for
a whole epoch. `Progress` draws a tqdm bar on a terminal; elsewhere it writes a line through the 'mlcmr'
logger (so it lands in train.log too) at the first step, then every `every_steps` steps or `every_seconds`
seconds, whichever comes first, and one at the end:

    epoch 3: step 150/1172 (13%) | loss=0.4123 | 412.3 samples/s | elapsed 0:00:47 | ETA 0:05:20

    with Progress(len(loader), f'epoch {epoch}', unit='samples') as progress:
        for batch in loader:
            ...
            progress.update(samples=batch_size, loss=loss.detach())   # tensors are fine: no host sync here

    for batch in track(loader, len(loader), 'encode captions', count=lambda b: len(b['index'])):
        ...

Scalars passed to `update` are averaged over the steps since the previous line. They may be 0-d tensors:
they are summed as tensors and turned into numbers only when a line is written (or the bar's postfix is
refreshed, at most once a second), so reporting adds no per-step device synchronisation.

Another view of the same loops (e.g. the search page's progress bar) listens without changing them:

    with listen(lambda p: print(p.desc, p.steps, p.total, p.samples)):
        ...   # every Progress started in this thread inside the block calls the function on each update
"""
import contextlib
import logging
import sys
import threading
import time

logger = logging.getLogger('mlcmr')


def _clock_text(seconds):
    seconds = int(round(max(seconds, 0.0)))
    return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


_listening = threading.local()


@contextlib.contextmanager
def listen(callback):
    """Inside the block, every Progress started in this thread calls `callback(progress)` after each update and
    at its close (progress.steps, .total, .samples, .desc, .closed); listeners nest."""
    before = getattr(_listening, 'callbacks', ())
    _listening.callbacks = before + (callback,)
    try:
        yield
    finally:
        _listening.callbacks = before


def _number(v):
    return float(v.item()) if hasattr(v, 'item') else float(v)


def is_terminal(stream):
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):      # no isatty, or a closed stream
        return False


class Progress:
    """A tqdm bar on a terminal, periodic log lines elsewhere; nothing when `enabled` is False (e.g. on
    ranks other than 0).

    total: steps expected (None if unknown); desc: what runs ('epoch 3', 'encode videos'); unit: what
    `samples` counts, for the rate ('samples', 'captions'); stream: where a terminal is looked for
    (default sys.stderr); clock: seconds, monotonic (tests pass a fake one)."""

    def __init__(self, total, desc='', unit='samples', every_steps=50, every_seconds=60.0, enabled=True,
                 stream=None, clock=time.monotonic):
        self.total = None if total is None else int(total)
        self.desc, self.unit = desc, unit
        self.every_steps, self.every_seconds = max(int(every_steps), 1), float(every_seconds)
        self.enabled, self.clock = enabled, clock
        self.steps = self.samples = 0
        self.lines = 0                    # log lines written
        self._sums, self._count = {}, 0   # scalars since the last line / postfix
        self._closed = False
        self._listeners = getattr(_listening, 'callbacks', ())
        self._bar = None
        self.start = self._last_time = self._postfix_time = clock()
        self._last_steps = self._last_samples = 0
        stream = sys.stderr if stream is None else stream
        if enabled and is_terminal(stream):
            from tqdm import tqdm
            self._bar = tqdm(total=self.total, desc=desc, leave=False, dynamic_ncols=True, file=stream,
                             unit='step')

    # ---- the loop's side ----
    def update(self, steps=1, samples=0, **scalars):
        """Count `steps` steps and `samples` samples; `scalars` (floats or 0-d tensors) join the averages."""
        if not self.enabled or self._closed:
            return
        self.steps += steps
        self.samples += samples
        for k, v in scalars.items():
            v = v.detach() if hasattr(v, 'detach') else v
            self._sums[k] = self._sums[k] + v if k in self._sums else v
        self._count += 1
        for callback in self._listeners:
            callback(self)
        now = self.clock()
        if self._bar is not None:
            self._bar.update(steps)
            if self._sums and now - self._postfix_time >= 1.0:
                self._bar.set_postfix(self._means(), refresh=False)
                self._postfix_time = now
                self._sums, self._count = {}, 0
            return
        if (self.lines == 0 or self.steps - self._last_steps >= self.every_steps
                or now - self._last_time >= self.every_seconds):
            self._log(now)

    def close(self):
        """End the bar, or write the last line (unless the last step was just written)."""
        if self._closed:
            return
        self._closed = True
        for callback in self._listeners:
            callback(self)
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.steps > self._last_steps:
            self._log(self.clock(), final=True)

    @property
    def closed(self):
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # ---- lines ----
    def _means(self):
        return {k: f'{_number(v) / max(self._count, 1):.4g}' for k, v in self._sums.items()}

    def line(self, now, final=False):
        """The text of one progress line at time `now` (seconds on `clock`)."""
        elapsed = now - self.start
        parts = [f'{self.desc}: step {self.steps}' + (f'/{self.total}' if self.total else '')
                 + (f' ({100 * self.steps / self.total:.0f}%)' if self.total else '')]
        parts += [f'{k}={v}' for k, v in self._means().items()]
        window = now - self._last_time
        if self.samples:
            if final:      # the loop's whole average
                parts.append(f'{self.samples / max(elapsed, 1e-9):.1f} {self.unit}/s')
            else:          # the rate since the previous line, i.e. now
                parts.append(f'{(self.samples - self._last_samples) / max(window, 1e-9):.1f} {self.unit}/s')
        parts.append(f'elapsed {_clock_text(elapsed)}')
        if final:
            parts.append('done')
        elif self.total and self.steps:
            parts.append(f'ETA {_clock_text(elapsed / self.steps * max(self.total - self.steps, 0))}')
        return ' | '.join(parts)

    def _log(self, now, final=False):
        logger.info('%s', self.line(now, final))
        self.lines += 1
        self._last_time, self._last_steps, self._last_samples = now, self.steps, self.samples
        self._sums, self._count = {}, 0


def track(iterable, total=None, desc='', unit='samples', count=None, **kwargs):
    """Iterate `iterable` with a Progress of one step per item; `count(item)` gives the samples in an item
    (e.g. a batch's size) for the rate. Closes the progress when the loop ends or is left."""
    if total is None and hasattr(iterable, '__len__'):
        total = len(iterable)
    progress = Progress(total, desc, unit=unit, **kwargs)
    try:
        for item in iterable:
            yield item
            progress.update(samples=count(item) if count is not None else 0)
    finally:
        progress.close()
