"""X-VLM's optimizer and learning-rate schedule: AdamW over the model's parameter groups, linear warmup then decay."""
from __future__ import annotations

import torch
from torch import nn

from model.params import param_groups
from train.config import OptimSection, ScheduleSection


class WarmupLinearDecay:
    """lr factor at step s: s / warmup while warming up, then linear down to `min_ratio` at `total` steps.

    A class, not a lambda, so LambdaLR's state_dict records its numbers (and a resumed run can check them).
    The factor multiplies every group's initial lr, which keeps the lr x 2 of new parameters.
    """

    def __init__(self, warmup: int, total: int, min_ratio: float = 0.0) -> None:
        self.warmup = warmup
        self.total = total
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * (1.0 - progress)


def build_optimizer(model: nn.Module, optim: OptimSection, new_parameters: set[str] | None = None,
                    fused: bool = False) -> torch.optim.AdamW:
    """AdamW (betas 0.9/0.98, eps 1e-8, wd 0.01 by default) over the groups of `model.params.param_groups`.
    `new_parameters` (fine-tuning: the names the initial checkpoint did not hold) replaces the model's own rule of
    which parameters are new. `fused` (CUDA): one kernel updates every parameter instead of a few per parameter
    tensor."""
    groups = param_groups(model, optim.lr, optim.weight_decay, new_parameters)
    for group in groups:  # the config may change X-VLM's x 2 for new parameters
        if group["lr_scale"] != 1.0:
            group["lr_scale"] = optim.new_param_lr_mult
            group["lr"] = optim.lr * optim.new_param_lr_mult
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                             weight_decay=optim.weight_decay, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: ScheduleSection) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_steps` from 0, then linear decay to `min_lr_ratio` x lr at `steps`.

    `scheduler.step()` is called after each optimizer step, so step s (1-based) trains at factor(s - 1).
    """
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupLinearDecay(schedule.warmup_steps, schedule.steps, schedule.min_lr_ratio))
