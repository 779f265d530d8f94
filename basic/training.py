"""One optimisation step, shared by the trainer and the benchmark (docs/training.md, 'One training step').

    logs = train_step(model, ddp_model, batch, optimizers, scaler, autocast, grad_clip)

Order, for both models:
  1. forward            outputs = ddp_model(batch)          (under `autocast()`)
  2. model's own step   model.discriminator_step(outputs, optimizers): NRCCR updates its language
                        discriminator on detached BERT states (fp32); MLCMR does nothing
  3. loss               model.training_loss(outputs)      (NRCCR's generator term sees the updated discriminator)
  4. a non-finite loss stops here (FloatingPointError), before any weight of the main optimiser changes.
                        Reading the loss makes the host wait for the device; on a CPU that costs nothing,
                        on a GPU it stalls the queue every step, so there (check_finite=None) the step
                        does not check: the caller keeps a `NonFiniteWatch` and reads it every few steps
  5. backward           optimizers['main'].zero_grad(set_to_none=True); scaler.scale(loss).backward()
  6. clip, step         scaler.unscale_; clip_grad_norm_(model.main_parameters(), grad_clip); scaler.step;
                        scaler.update()

The logs are detached 0-d tensors on the model's device (the models never call `.item()`), so a step
queues its work and returns without waiting; the caller converts them to numbers when it writes them.
"""
import math

import torch


def train_step(model, ddp_model, batch, optimizers, scaler, autocast, grad_clip, main_params=None,
               check_finite=None):
    """One training step on a batch already on the model's device; returns the logs (dict of detached 0-d
    tensors).

    model: the unwrapped model (losses, optimiser groups); ddp_model: what runs the forward (the model
    itself, its DistributedDataParallel wrapper or a compiled version); optimizers: from
    `model.configure_optimizers`; scaler: a torch.amp.GradScaler (disabled for fp32/bf16); autocast: a
    zero-argument context factory (basic/precision.py); main_params: `model.main_parameters()`, passed in to
    avoid rebuilding the list every step; check_finite: raise FloatingPointError on a non-finite loss before
    the backward pass (True), never (False), or where it costs no device synchronisation, i.e. on a CPU
    (None, the default)."""
    main = optimizers['main']
    with autocast():
        outputs = ddp_model(batch)
        logs = dict(model.discriminator_step(outputs, optimizers))
        loss, loss_logs = model.training_loss(outputs)
    logs.update(loss_logs)
    if check_finite or (check_finite is None and loss.device.type == 'cpu'):
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f'non-finite loss {value} (lr {main.param_groups[0]["lr"]:.3g}); '
                                     f'logs: {log_values(logs)}')
    main.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(main)
    torch.nn.utils.clip_grad_norm_(model.main_parameters() if main_params is None else main_params, grad_clip)
    scaler.step(main)
    scaler.update()
    return logs


def log_values(logs):
    """{name: float} of logs holding 0-d tensors (one device synchronisation for all of them) or numbers."""
    tensors = [k for k, v in logs.items() if torch.is_tensor(v)]
    values = dict(zip(tensors, torch.stack([logs[k].detach().reshape(()).double() for k in tensors]).tolist()
                      if tensors else []))
    return {k: values[k] if k in values else float(v) for k, v in logs.items()}


class NonFiniteWatch:
    """Remembers, on the device, the first step whose loss was not finite, so a GPU loop can look every
    few steps instead of every step (`check` is the only synchronisation).

        watch = NonFiniteWatch(device)
        for step, batch in ...:
            logs = train_step(..., check_finite=False)
            watch.update(step, logs['loss'])
            if (step + 1) % log_every == 0:
                watch.check('epoch 3')        # FloatingPointError naming the first bad step

    The weights the bad step and the steps after it updated are not finite either; the run stops at the
    check, which the trainer also makes at the end of every epoch, before validation and the checkpoint,
    so no checkpoint holds them."""

    def __init__(self, device):
        self.first = torch.full((), -1, dtype=torch.long, device=device)
        self.checked_up_to = self.last_step = -1

    def update(self, step, loss):
        bad = ~torch.isfinite(loss.detach()) & (self.first < 0)
        self.first = torch.where(bad, step, self.first)
        self.last_step = step

    def check(self, where=''):
        first = int(self.first)
        if first >= 0:
            raise FloatingPointError(f'{where}{" " if where else ""}step {first}: non-finite loss (found when '
                                     f'checking steps {self.checked_up_to + 1}-{self.last_step})')
        self.checked_up_to = self.last_step
