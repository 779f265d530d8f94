"""Benchmark of one training epoch plus validation as a user runs it: trainer.py in a process of its own on a
synthetic collection, NRCCR and MLCMR side by side with the papers' settings, per precision.

    python util/bench/epoch.py                          # CPU: both models, --amp off and auto
    python util/bench/epoch.py --amps auto --workers 2 --out bench_epoch.json
    python util/bench/epoch.py --quick                  # tiny collection and BERT, seconds (the smoke test)

The collection is util/make_toy_data.py's (videos, English and Chinese captions and their machine
translations, VisualSearch layout) with VATEX-sized 1024-d frame features and a random BERT of bert-base width
(768) with 2 layers, whose top layer is fine-tuned (the papers fine-tune the top 7 / 6 of 12). The models keep
the papers' sizes and settings (do_all_vatex.sh: NRCCR batch 128, validation batch 128, strong
discriminator; do_all_mlcmr.sh: MLCMR batch 64, validation with the training batch, parallel / human_label),
and every other flag its default: --compile auto among them, so a row is what a user gets on this machine. Each run is
`trainer.py ... --num_epochs 1 --skip_test 1` in a new process: its wall time counts start-up, loading, the
epoch, validation and the checkpoints; the epoch's own samples/s and seconds (with validation) come from
the run's metrics.jsonl, the peak resident memory of the trainer process (VmHWM).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ''):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from nets import common                                                  # noqa: E402
from util.make_toy_data import FEATURE_NAME, make_toy_collection        # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COLLECTION = 'benchepoch'
FULL = dict(n_train=400, n_val=60, captions_per_video=5, dim=1024, bert_hidden=768, bert_layers=2, sizes={})
QUICK = dict(n_train=24, n_val=6, captions_per_video=2, dim=32, bert_hidden=32, bert_layers=2,
             sizes={'nrccr': ['--text_hidden_size', '32', '--video_hidden_size', '32', '--text_num_attention', '4',
                              '--visual_num_attention', '4', '--text_mapping_layers', '0-48',
                              '--visual_mapping_layers', '0-48', '--batch_size', '16', '--eval_batch_size', '16'],
                    'mlcmr': ['--visual_rnn_size', '16', '--visual_kernel_num', '8', '--text_mapping_layers', '0-48',
                              '--visual_mapping_layers', '0-48', '--batch_size', '16']})

# The papers' settings (docs/training.md, 'Hyperparameters'), as do_all_vatex.sh and do_all_mlcmr.sh pass them;
# the fine-tuned layer is the top one of the 2-layer BERT.
PAPER_FLAGS = {
    'nrccr': ['--model', 'nrccr', '--data_type', 'google_enc2zh', '--learning_rate', '1e-4',
              '--text_hidden_size', '768', '--video_hidden_size', '1024', '--text_num_attention', '8',
              '--visual_num_attention', '8', '--video_layer', '1', '--frozen', 'frozen', '--layer_list', 'layer.1',
              '--glr', '1e-3', '--scale', '0.001', '--disc_type', 'strong', '--tri_alpha', '0.6', '--dtl_beta', '0.4',
              '--l1_gama', '0.1', '--back_w', '0.5', '--max_violation'],
    'mlcmr': ['--model', 'mlcmr', '--train_mode', 'parallel', '--label_situation', 'human_label',
              '--target_language', 'zh', '--layer_list', 'layer.1', '--max_violation'],
}

# Runs trainer.main in this child process and prints its peak resident memory (KiB) on the last line: VmHWM of
# /proc/self/status on Linux (getrusage's ru_maxrss survives exec, so a child would report this benchmark's
# own peak), else ru_maxrss.
_RUNNER = ('import json, resource, runpy, sys; sys.argv = ["trainer.py"] + sys.argv[1:]; '
           'runpy.run_path("trainer.py", run_name="__main__"); '
           'hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")] '
           'if sys.platform.startswith("linux") else []; '
           'print("EPOCH_BENCH " + json.dumps({"maxrss_kib": hwm[0] if hwm else '
           'resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))')


def make_collection(root, sizes):
    """The synthetic collection and its BERT under `root`; returns make_toy_collection's paths."""
    common.quiet_transformers()
    return make_toy_collection(root, COLLECTION, n_train=sizes['n_train'], n_val=sizes['n_val'],
                               n_test=sizes['n_val'], captions_per_video=sizes['captions_per_video'],
                               dim=sizes['dim'], bert_hidden=sizes['bert_hidden'], bert_layers=sizes['bert_layers'])


def trainer_argv(model, root, paths, amp, workers, device, sizes, postfix):
    return (PAPER_FLAGS[model] + sizes['sizes'].get(model, [])
            + ['--rootpath', root, '--collection', COLLECTION, '--visual_feature', FEATURE_NAME,
               '--bert_name', paths['bert_dir'], '--num_epochs', '1', '--skip_test', '1', '--workers', str(workers),
               '--device', device, '--amp', amp, '--postfix', postfix, '--overwrite', '1'])


def run_epoch(model, root, paths, amp, workers, device, sizes, env=None):
    """One trainer process; a row with its wall seconds, peak memory and the epoch's record."""
    argv = trainer_argv(model, root, paths, amp, workers, device, sizes, f'bench_{amp}')
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, '-c', _RUNNER] + argv, cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['no output']
        raise RuntimeError(f'trainer {model} --amp {amp} failed (exit {proc.returncode}): {tail[0]}')
    extra = json.loads(proc.stdout.strip().splitlines()[-1].split('EPOCH_BENCH ', 1)[1])
    record = _epoch_record(root, model)
    log = _train_log(root, model)
    return dict(model=model, amp=amp, amp_resolved=_logged(log, 'precision: '), compile=_logged(log, 'compile: '),
                device=device, workers=workers, wall_s=wall, epoch_s=record['seconds'],
                samples_per_s=record['samples_per_s'], peak_rss_gib=extra['maxrss_kib'] / 2 ** 20,
                train_captions=sizes['n_train'] * sizes['captions_per_video'])


def _run_dirs(root, model):
    cv = 'MM_2022' if model == 'nrccr' else 'mlcmr'
    base = os.path.join(root, COLLECTION, cv, COLLECTION)
    return [os.path.join(d, f) for d, _, files in os.walk(base) for f in files]


def _epoch_record(root, model):
    path = max((p for p in _run_dirs(root, model) if p.endswith('metrics.jsonl')), key=os.path.getmtime)
    with open(path) as f:
        return json.loads(f.read().strip().splitlines()[-1])


def _train_log(root, model):
    path = max((p for p in _run_dirs(root, model) if p.endswith('train.log')), key=os.path.getmtime)
    with open(path) as f:
        return f.read()


def _logged(log, prefix):
    """The rest of the last log line that has `prefix` (e.g. 'precision: ' -> 'bf16 autocast (...)')."""
    lines = [line.split(prefix, 1)[1] for line in log.splitlines() if prefix in line]
    return lines[-1] if lines else None


def _first_word(text):
    return (text or '?').split()[0].rstrip(',')


def bench_epoch(quick=False, amps=('off', 'auto'), workers=2, device='cpu', log=print):
    """Rows of one epoch + validation per (precision, model), NRCCR and MLCMR side by side."""
    sizes = QUICK if quick else FULL
    rows = []
    with tempfile.TemporaryDirectory(prefix='mlcmr_bench_epoch_') as root:
        t0 = time.perf_counter()
        paths = make_collection(root, sizes)
        log(f'epoch: synthetic collection of {sizes["n_train"]} training videos x {sizes["captions_per_video"]} '
            f'captions, {sizes["dim"]}-d frames, BERT {sizes["bert_hidden"]} wide x {sizes["bert_layers"]} layers '
            f'({time.perf_counter() - t0:.0f} s to write)')
        for amp in amps:
            for model in ('nrccr', 'mlcmr'):
                row = run_epoch(model, root, paths, amp, workers, device, sizes)
                rows.append(row)
                log(f'epoch {model:5} --amp {amp:4} ({_first_word(row["amp_resolved"])}, '
                    f'{_first_word(row["compile"])}): {row["wall_s"]:.1f} s process, '
                    f'{row["epoch_s"]:.1f} s epoch + validation, '
                    f'{row["samples_per_s"]:.1f} samples/s, peak {row["peak_rss_gib"]:.2f} GiB')
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true', help='tiny collection and BERT (the smoke test)')
    p.add_argument('--amps', default='off,auto', help='--amp values to run (default off,auto)')
    p.add_argument('--workers', type=int, default=2, help="the trainer's --workers (default 2)")
    p.add_argument('--device', default='cpu', help='the trainer\'s --device (default cpu)')
    p.add_argument('--out', default='bench_epoch.json')
    args = p.parse_args(argv)
    rows = bench_epoch(args.quick, [a.strip() for a in args.amps.split(',') if a.strip()], args.workers, args.device)
    with open(args.out, 'w') as f:
        json.dump(rows, f, indent=1)
    print(f'wrote {args.out}')
    return rows


if __name__ == '__main__':
    main()
