"""basic/precision.py: --amp auto picks bf16 only where the hardware has it, an explicit bf16 without it is
refused in one line, and the autocast context does what its precision says."""
import contextlib

import pytest
import torch

from basic.errors import DataError
from basic import precision

CPU = torch.device('cpu')
CUDA = torch.device('cuda', 0)      # a device object only: nothing runs on it here


def with_cpu_flags(monkeypatch, *flags):
    monkeypatch.setattr(precision, 'cpu_flags', lambda path='/proc/cpuinfo': {'sse2', 'avx2', *flags})


def with_gpu(monkeypatch, native):
    calls = []

    def is_bf16_supported(including_emulation=True):
        calls.append(including_emulation)
        return native or including_emulation      # torch's answer for an old GPU counts emulation as support
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', is_bf16_supported)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda d=None: 'Fake GPU')
    return calls


def test_cpuinfo_flags_are_read_from_the_flags_line(tmp_path):
    info = tmp_path / 'cpuinfo'
    info.write_text('processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile\n'
                    'bugs\t\t: spectre\n\nprocessor\t: 1\nflags\t\t: fpu\n')
    assert precision.cpu_flags(str(info)) == {'fpu', 'sse2', 'avx512f', 'avx512_bf16', 'amx_tile'}
    assert precision.cpu_flags(str(tmp_path / 'missing')) == set()
    assert precision.cpu_bf16_support({'avx512f', 'amx_bf16'}) == ['amx_bf16']
    assert precision.cpu_bf16_support({'avx512f', 'avx2'}) == []


@pytest.mark.parametrize('flag', ['avx512_bf16', 'amx_bf16'])
def test_auto_picks_bf16_on_a_cpu_with_native_bf16(monkeypatch, flag):
    with_cpu_flags(monkeypatch, flag)
    amp, message = precision.resolve_amp('auto', CPU)
    assert amp == 'bf16'
    assert 'bf16' in message and flag in message and '--amp auto' in message


def test_auto_falls_back_to_fp32_on_a_cpu_without_it(monkeypatch):
    with_cpu_flags(monkeypatch, 'avx512f')
    amp, message = precision.resolve_amp('auto', CPU)
    assert amp == 'off'
    assert message.startswith('precision: fp32') and 'avx512_bf16' in message


def test_explicit_bf16_without_support_is_one_line_with_the_fix(monkeypatch):
    with_cpu_flags(monkeypatch)
    with pytest.raises(DataError) as e:
        precision.resolve_amp('bf16', CPU)
    msg = str(e.value)
    assert '\n' not in msg and msg.startswith('--amp bf16') and '--amp off' in msg and '--amp auto' in msg
    with_cpu_flags(monkeypatch, 'avx512_bf16')
    assert precision.resolve_amp('bf16', CPU)[0] == 'bf16'


def test_cuda_counts_native_bf16_only(monkeypatch):
    calls = with_gpu(monkeypatch, native=False)
    assert precision.resolve_amp('auto', CUDA) == ('off', 'precision: fp32 (--amp auto: Fake GPU lacks native bf16)')
    assert calls == [False]                                  # emulation was not counted as support
    with pytest.raises(DataError, match='--amp bf16: cuda:0 has no native bf16'):
        precision.resolve_amp('bf16', CUDA)
    with_gpu(monkeypatch, native=True)
    assert precision.resolve_amp('auto', CUDA)[0] == 'bf16'
    assert precision.resolve_amp('BF16', CUDA)[0] == 'bf16'


def test_off_and_fp16_are_taken_as_given(monkeypatch):
    with_cpu_flags(monkeypatch)                              # no bf16: does not matter for these
    assert precision.resolve_amp('off', CPU)[0] == 'off'
    assert precision.resolve_amp('fp16', CPU)[0] == 'fp16'
    with pytest.raises(DataError, match='--amp fp8: expected one of off, fp16, bf16, auto'):
        precision.resolve_amp('fp8', CPU)


def test_other_device_types_never_get_bf16_from_auto():
    assert precision.resolve_amp('auto', torch.device('meta'))[0] == 'off'


def test_autocast_factory_contexts():
    assert precision.autocast_factory('off', None) is contextlib.nullcontext
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with precision.autocast_factory('off', CPU)():
        assert (a @ b).dtype == torch.float32
    with precision.autocast_factory('bf16', CPU)():
        assert (a @ b).dtype == torch.bfloat16
    with precision.autocast_factory('fp16', CPU)():
        assert (a @ b).dtype == torch.float16
