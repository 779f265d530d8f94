"""basic/progress.py: off a terminal, progress becomes log lines (first step, every N steps or T seconds, the
end) with the loop's numbers; on a terminal it is a tqdm bar and no log lines. Time is a fake clock."""
import io
import logging

import pytest
import torch

from basic import progress as P


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class Terminal(io.StringIO):
    def isatty(self):
        return True


def messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name == 'mlcmr']


def test_non_terminal_logs_every_n_steps_with_the_fields(caplog):
    caplog.set_level(logging.INFO, logger='mlcmr')
    clock = Clock()
    with P.Progress(10, 'epoch 3', every_steps=4, every_seconds=1e9, stream=io.StringIO(), clock=clock) as p:
        for step in range(10):
            clock.t += 2.0                                   # every step takes 2 s and 8 samples
            p.update(samples=8, loss=torch.tensor(float(step)))
    lines = messages(caplog)
    # step 1 (first line early), 5 and 9 (4 steps after the previous line), then the end
    assert [line.split(' | ')[0] for line in lines] == ['epoch 3: step 1/10 (10%)', 'epoch 3: step 5/10 (50%)',
                                                        'epoch 3: step 9/10 (90%)', 'epoch 3: step 10/10 (100%)']
    assert lines[0] == 'epoch 3: step 1/10 (10%) | loss=0 | 4.0 samples/s | elapsed 0:00:02 | ETA 0:00:18'
    # the loss is averaged over the steps since the previous line: steps 1..4 -> (1+2+3+4)/4
    assert lines[1] == 'epoch 3: step 5/10 (50%) | loss=2.5 | 4.0 samples/s | elapsed 0:00:10 | ETA 0:00:10'
    assert lines[3] == 'epoch 3: step 10/10 (100%) | loss=9 | 4.0 samples/s | elapsed 0:00:20 | done'


def test_non_terminal_logs_every_t_seconds(caplog):
    caplog.set_level(logging.INFO, logger='mlcmr')
    clock = Clock()
    p = P.Progress(None, 'encode captions', unit='captions', every_steps=1000, every_seconds=60,
                   stream=io.StringIO(), clock=clock)
    for seconds in (1, 30, 30, 10, 25):                       # lines at t=1 (first) and t=61 (60 s later)
        clock.t += seconds
        p.update(samples=100)
    assert len(messages(caplog)) == 2
    assert messages(caplog)[1] == 'encode captions: step 3 | 3.3 captions/s | elapsed 0:01:01'
    p.close()
    assert messages(caplog)[-1] == 'encode captions: step 5 | 5.2 captions/s | elapsed 0:01:36 | done'
    p.close()                                               # idempotent
    assert len(messages(caplog)) == 3


def test_terminal_uses_tqdm_and_logs_nothing(caplog):
    caplog.set_level(logging.INFO, logger='mlcmr')
    from tqdm import tqdm
    stream = Terminal()
    with P.Progress(5, 'epoch 0', stream=stream) as p:
        assert isinstance(p._bar, tqdm)
        for _ in range(5):
            p.update(samples=4, loss=1.5)
        assert p._bar.n == 5 and p._bar.total == 5
    assert messages(caplog) == []
    assert 'epoch 0' in stream.getvalue() and '/5 [' in stream.getvalue()          # the bar was drawn there


def test_disabled_progress_is_silent(caplog):
    caplog.set_level(logging.INFO, logger='mlcmr')
    stream = Terminal()
    with P.Progress(3, 'epoch 0', enabled=False, stream=stream) as p:
        p.update(samples=1, loss=1.0)
        assert p._bar is None
    assert messages(caplog) == [] and stream.getvalue() == ''


def test_track_counts_items_and_closes_on_break(caplog):
    caplog.set_level(logging.INFO, logger='mlcmr')
    clock = Clock()
    batches = [list(range(n)) for n in (4, 4, 3)]
    seen = []
    for b in P.track(batches, desc='encode videos', unit='videos', count=len, stream=io.StringIO(),
                     clock=clock, every_steps=100):
        clock.t += 1
        seen.append(b)
    assert seen == batches
    lines = messages(caplog)
    assert lines[0].startswith('encode videos: step 1/3 (33%) | 4.0 videos/s')
    assert lines[-1] == 'encode videos: step 3/3 (100%) | 3.7 videos/s | elapsed 0:00:03 | done'
    caplog.clear()
    for i, _ in enumerate(P.track(iter(batches), total=3, desc='early', stream=io.StringIO(), clock=clock)):
        clock.t += 1
        if i == 1:
            break
    assert [m.split(' | ')[0] for m in messages(caplog)] == ['early: step 1/3 (33%)']   # step 2 never counted


@pytest.mark.parametrize('stream,expected', [(io.StringIO(), False), (Terminal(), True), (object(), False)])
def test_is_terminal(stream, expected):
    assert P.is_terminal(stream) is expected
