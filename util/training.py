"""One optimisation step, shared by the trainer and the benchmark (docs/training.md, 'One training step').

    logs = train_step(model, ddp_model, batch, optimizers, scaler, autocast, grad_clip)

Order, for both models:
  1. forward            outputs = ddp_model(batch)          (under `autocast()`)
  2. model's own step   model.discriminator_step(outputs, optimizers): NRCCR updates its language
                        discriminator on detached BERT states (fp32); MLCMR does nothing
  3. loss               model.training_loss(outputs)      (NRCCR's generator term sees the updated discriminator)
  4. a non-finite loss stops here (FloatingPointError), before any weight of the main optimiser changes
  5. backward           optimizers['main'].zero_grad(set_to_none=True); scaler.scale(loss).backward()
  6. clip, step         scaler.unscale_; clip_grad_norm_(model.main_parameters(), grad_clip); scaler.step;
                        scaler.update()
"""
import math

import torch


def train_step(model, ddp_model, batch, optimizers, scaler, autocast, grad_clip, main_params=None):
    """One training step on a batch already on the model's device; returns the logs (dict of floats).

    model: the unwrapped model (losses, optimiser groups); ddp_model: what runs the forward (the model
    itself, its DistributedDataParallel wrapper or a compiled version); optimizers: from
    `model.configure_optimizers`; scaler: a torch.amp.GradScaler (disabled for fp32/bf16); autocast: a
    zero-argument context factory (util/precision.py); main_params: `model.main_parameters()`, passed in to
    avoid rebuilding the list every step."""
    main = optimizers['main']
    with autocast():
        outputs = ddp_model(batch)
        logs = dict(model.discriminator_step(outputs, optimizers))
        loss, loss_logs = model.training_loss(outputs)
    logs.update(loss_logs)
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f'non-finite loss {value} (lr {main.param_groups[0]["lr"]:.3g}); logs: {logs}')
    main.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(main)
    torch.nn.utils.clip_grad_norm_(model.main_parameters() if main_params is None else main_params, grad_clip)
    scaler.step(main)
    scaler.update()
    return logs
