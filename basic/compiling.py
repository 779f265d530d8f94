"""torch.compile of the training forward: whether a run compiles (`--compile auto|1|0`) and how.

    on, message, level = resolve_compile(args.compile, device, total_steps)   # once; log `message` at `level`
    ddp_model = compile_forward(ddp_model) if on else ddp_model

What was measured on a CPU (util/benchmark.py --only compile; docs/training.md, 'Compilation'): compiling
the whole model took minutes of a 2-core CPU and the compiled training step was slower than the eager one,
so `auto` stays eager on a CPU. On a CUDA device with triton, inductor fuses the element-wise work around the
matrix products (dropout masks, casts, layer norms), which eager runs as separate kernels; `auto` compiles
there when the run is long enough to pay for compiling (AUTO_MIN_STEPS). Where no compiler is found
(inductor needs a C++ compiler on a CPU, triton on a GPU) the run stays eager and says so, even with 1.

Shapes: padded caption and video lengths change from batch to batch, so the model is compiled with dynamic
shapes (one graph for every length; a batch of one caption or video may still compile once more, since
sizes 0 and 1 are specialised, and MLCMR's video encoder compiles the part after its GRU, where dynamo breaks
the graph, a second time in the first step, when the frame-dropped view brings a new length). Training batches cannot be padded to a few fixed lengths instead: with
parity pooling the mean runs over the padded positions, so extra padding would change the embeddings.
"""
import importlib.util
import logging
import os
import shutil

import torch

from basic.errors import DataError

CXX_CANDIDATES = ('g++', 'c++', 'clang++')
# `auto` compiles on a GPU only for runs of at least this many training steps: compiling costs a minute or
# two, and a compiled step saves some milliseconds, so short runs (tests, toy runs) stay eager.
AUTO_MIN_STEPS = 2000


def parse_compile(spec):
    """'auto', '1' or '0' from --compile (also on/off, true/false, yes/no); DataError otherwise."""
    s = str(spec).strip().lower()
    aliases = {'1': '1', 'true': '1', 'on': '1', 'yes': '1', '0': '0', 'false': '0', 'off': '0', 'no': '0',
               'auto': 'auto'}
    if s not in aliases:
        raise DataError(f'--compile {spec}: expected auto, 1 or 0')
    return aliases[s]


def compiler_available(device):
    """(found, what): whether torch.compile's default backend can build kernels for `device`: a C++ compiler
    on a CPU ($CXX, g++, c++ or clang++ on the PATH), triton on a CUDA device."""
    if device.type == 'cuda':
        found = importlib.util.find_spec('triton') is not None
        return found, 'triton found' if found else 'triton not installed'
    if device.type == 'cpu':
        names = ([os.environ['CXX']] if os.environ.get('CXX') else []) + list(CXX_CANDIDATES)
        for name in names:
            path = shutil.which(name)
            if path:
                return True, f'C++ compiler {path}'
        return False, f'no C++ compiler ({", ".join(names)}) on the PATH'
    return False, f'no compiler check for device type {device.type}'


def resolve_compile(spec, device, total_steps):
    """(on, message, logging level) for `--compile spec` on `device` for a run of `total_steps` training
    steps. 0: eager. 1: compile where a compiler is found, else eager with a warning. auto: compile on a
    CUDA device with triton for runs of at least AUTO_MIN_STEPS steps; eager on a CPU, where compiling was
    measured not to pay (module docstring)."""
    spec = parse_compile(spec)
    if spec == '0':
        return False, 'compile: eager (--compile 0)', logging.INFO
    found, what = compiler_available(device)
    if spec == '1':
        if found:
            return True, f'compile: torch.compile, dynamic shapes (--compile 1; {what})', logging.INFO
        return False, f'compile: eager (--compile 1, but {what})', logging.WARNING
    if device.type != 'cuda':
        return False, (f'compile: eager (--compile auto: on {device.type} compiling took minutes and the '
                       'compiled step was slower; --compile 1 to compile anyway)'), logging.INFO
    if not found:
        return False, f'compile: eager (--compile auto: {what})', logging.INFO
    if total_steps < AUTO_MIN_STEPS:
        return False, (f'compile: eager (--compile auto: {total_steps} training steps, fewer than the '
                       f'{AUTO_MIN_STEPS} that pay for compiling)'), logging.INFO
    return True, f'compile: torch.compile, dynamic shapes (--compile auto: {what}, {total_steps} steps)', logging.INFO


def compile_forward(module, backend='inductor'):
    """`module` (or a function) compiled by `backend` (torch.compile's default, inductor) with dynamic shapes,
    since padded lengths vary from batch to batch; the state dict of a compiled module carries an `_orig_mod.`
    prefix, which basic/checkpoint.py strips.

    Duck shaping is turned off: by default two lengths that happen to be equal in the first batch (the source
    caption and its back-translation both padded to 31) are assumed equal for good, and the next batch where
    they differ compiles the whole model again; torch names this switch in its recompilation log."""
    import torch.fx.experimental._config as fx_config
    fx_config.use_duck_shape = False
    return torch.compile(module, dynamic=True, backend=backend)
