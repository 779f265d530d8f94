"""Mixed precision: which precision a run uses (`--amp off|fp16|bf16|auto`) and the autocast context.

    amp, message = resolve_amp(args.amp, device)      # once, after the device is known; log `message`
    autocast = autocast_factory(amp, device)          # `with autocast(): ...` in every loop, train and eval

bf16 pays off only where the hardware multiplies in bf16: CUDA GPUs that report native bf16 (Ampere and
later), and CPUs with AVX512-BF16 or AMX. Elsewhere torch emulates it, which is slower than fp32, so `auto`
picks fp32 there and an explicit `bf16` is refused with a one-line error. fp16 is left as the user asks
(on CPU it runs, emulated, as it always did).

Per component, bf16 must not be slower than fp32 (docs/training.md, 'Mixed precision'): a recurrent layer
runs step by step with small matrix products, which are slower in bf16 than in fp32 on a CPU without AMX
tiles; there MLCMR's GRU runs in fp32 inside autocast (`cpu_fast_bf16_rnn`).
"""
import contextlib
import logging

import torch

from basic.errors import DataError

AMP_CHOICES = ('off', 'fp16', 'bf16', 'auto')
CPU_BF16_FLAGS = ('avx512_bf16', 'amx_bf16')      # /proc/cpuinfo flags of native bf16 matrix products
CPU_FAST_BF16_RNN_FLAG = 'amx_bf16'               # bf16 GRU steps faster than fp32 ones (AMX tiles)


def autocast_factory(amp, device):
    """One AMP code path: a no-op context for fp32, autocast(fp16|bf16) otherwise."""
    if amp == 'off':
        return contextlib.nullcontext
    dtype = torch.float16 if amp == 'fp16' else torch.bfloat16
    return lambda: torch.autocast(device.type, dtype=dtype)


def cpu_flags(path='/proc/cpuinfo'):
    """The CPU feature flags the kernel reports (the `flags` line of the first processor); an empty set
    where there is no such file (macOS, Windows), so bf16 is then never assumed."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith('flags'):
                    return set(line.split(':', 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_bf16_support(flags=None):
    """The native-bf16 flags this CPU has (e.g. ['avx512_bf16']); [] when none."""
    flags = cpu_flags() if flags is None else flags
    return [f for f in CPU_BF16_FLAGS if f in flags]


def cpu_fast_bf16_rnn(flags=None):
    """Whether a bf16 GRU runs faster than an fp32 one on this CPU: with AMX tiles (measured on MLCMR's GRU:
    2x faster forward, 1.4x forward and backward), not with AVX512-BF16 alone (slower than fp32; docs/training.md,
    'Mixed precision')."""
    return CPU_FAST_BF16_RNN_FLAG in (cpu_flags() if flags is None else flags)


def bf16_support(device):
    """(supported, why): whether `device` multiplies bf16 natively, and the evidence in words."""
    if device.type == 'cuda':
        # including_emulation=False: older GPUs "support" bf16 only by emulating it, slower than fp32
        ok = torch.cuda.is_bf16_supported(including_emulation=False)
        name = torch.cuda.get_device_name(device)
        return ok, f'{name} {"has" if ok else "lacks"} native bf16'
    if device.type == 'cpu':
        found = cpu_bf16_support()
        if found:
            return True, f'CPU has {"/".join(found)}'
        return False, f'CPU lacks {" and ".join(CPU_BF16_FLAGS)}'
    return False, f'no bf16 check for device type {device.type}'


def amp_log_level(spec, amp):
    """Logging level of resolve_amp's line: a warning when `auto` fell back to fp32, else info."""
    return logging.WARNING if spec == 'auto' and amp == 'off' else logging.INFO


def resolve_amp(spec, device):
    """(amp, message) for `--amp spec` on `device`: amp is 'off', 'fp16' or 'bf16'; message is one line for
    the log saying which precision runs and why.

    'auto' picks bf16 where the device has it natively, fp32 elsewhere. 'bf16' on a device without it raises
    DataError (one line: the flag and the fix). 'off' and 'fp16' are taken as given."""
    spec = str(spec).strip().lower()
    if spec not in AMP_CHOICES:
        raise DataError(f'--amp {spec}: expected one of {", ".join(AMP_CHOICES)}')
    if spec == 'off':
        return 'off', 'precision: fp32 (--amp off)'
    if spec == 'fp16':
        return 'fp16', 'precision: fp16 autocast with loss scaling (--amp fp16)'
    ok, why = bf16_support(device)
    if spec == 'bf16':
        if not ok:
            raise DataError(f'--amp bf16: {device} has no native bf16 ({why}); it would run slower than fp32. '
                            'Use --amp off (fp32) or --amp auto')
        return 'bf16', f'precision: bf16 autocast (--amp bf16; {why})'
    if ok:
        return 'bf16', f'precision: bf16 autocast (--amp auto: {why})'
    return 'off', f'precision: fp32 (--amp auto: {why})'
