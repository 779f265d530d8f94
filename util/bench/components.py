"""Per-component speed of the training step in each precision: does bf16 make every part faster?

    rows = component_rows(setup_of, batch, device, amps)     # from util/benchmark.py --profile

One training forward records the inputs of each named component (the BERT, the video encoder and its GRU,
the attention block, the mappings; the NRCCR discriminator always runs in fp32); then each component alone runs forward and backward
on those inputs under each precision's autocast, as it runs inside the step (MLCMR's video encoder with its
GRU rule, basic/precision.py; its bare GRU as a row of its own, which shows what the rule avoids). A row per
(component, precision) with the median seconds; the caller prints the bf16 / fp32 ratio per component.
"""
import time

import numpy as np
import torch

COMPONENTS = {
    'nrccr': ('text_encoder.bert', 'text_encoder.encoder_layer', 'video_encoder', 'video_mapping', 'text_mapping'),
    'mlcmr': ('bert', 'video_encoder', 'video_encoder.rnn', 'video_mapping', 'text_mapping'),
}


def capture_inputs(model, batch, names):
    """{name: (args, kwargs)} of the first call of each named submodule during model(batch) (no grad)."""
    seen, handles = {}, []
    modules = dict(model.named_modules())
    for name in names:
        def hook(module, args, kwargs, name=name):
            if name not in seen:
                seen[name] = (_detach(args), _detach(kwargs))
        handles.append(modules[name].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def _detach(x):
    if torch.is_tensor(x):
        return x.detach().clone().requires_grad_(x.is_floating_point())
    if isinstance(x, (list, tuple)):
        return type(x)(_detach(v) for v in x)
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    return x


def _tensors(x):
    """Float tensors of an output (tensor, tuple, dict or a transformers output)."""
    if torch.is_tensor(x):
        return [x] if x.is_floating_point() else []
    if isinstance(x, dict) or hasattr(x, 'to_tuple'):
        x = list(x.values()) if isinstance(x, dict) else list(x.to_tuple())
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return []


def time_component(module, inputs, autocast, device, runs=3):
    """Median seconds of forward + backward of `module` on `inputs` under `autocast` (after one warm-up)."""
    args, kwargs = inputs

    def once():
        with autocast():
            out = module(*args, **kwargs)
        loss = sum(t.float().sum() for t in _tensors(out))
        if loss.requires_grad:
            loss.backward()
        for p in module.parameters():
            p.grad = None
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
    once()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def component_rows(model_name, model, batch, device, autocasts):
    """Rows {model, component, amp, seconds} for each component of `model_name` and each (amp, autocast)."""
    model.train()
    names = COMPONENTS[model_name]
    inputs = capture_inputs(model, batch, names)
    modules = dict(model.named_modules())
    return [dict(model=model_name, component=name, amp=amp, device=str(device),
                 seconds=time_component(modules[name], inputs[name], autocast, device))
            for name in names for amp, autocast in autocasts]
