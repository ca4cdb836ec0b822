"""Optimizers: NVIDIA apex's fused kernels when importable, torch's fused/foreach AdamW
otherwise, and an in-repo LARS for large-batch SGD.

`build_optimizer` never swaps one algorithm for another: "lamb" without apex is an error, not
AdamW in disguise. Which implementation ran is reported by `optimizer_description`.
"""

from __future__ import annotations

import torch
from torch import nn

from .._compat import apex_available

OPTIMIZERS = ("adam", "adamw", "lamb", "lars")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017).

    For each parameter p with gradient g (weight decay wd folded in, g <- g + wd p), the step
    is scaled by the trust ratio eta * ||p|| / ||g|| (1 when either norm is 0). Parameter groups
    with ``lars_exclude=True`` (biases, norm layers) skip both the weight decay and the
    scaling, as in SimCLR.
    """

    def __init__(
        self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 1e-3
    ):
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0 or eta <= 0:
            raise ValueError(
                f"LARS needs lr > 0, 0 <= momentum < 1, weight_decay >= 0, "
                f"eta > 0; got {lr}, {momentum}, {weight_decay}, {eta}"
            )
        super().__init__(
            params,
            dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False),
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not group["lars_exclude"]:
                    if group["weight_decay"]:
                        g = g.add(p, alpha=group["weight_decay"])
                    p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    trust = torch.where(
                        (p_norm > 0) & (g_norm > 0),
                        group["eta"] * p_norm / g_norm,
                        torch.ones_like(p_norm),
                    )
                    g = g * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = g.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def _split_decay(model: nn.Module) -> tuple[list, list]:
    """(weights, biases-and-norm-parameters): the second group gets no weight decay."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return decay, no_decay


def build_optimizer(
    name: str,
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    device: torch.device | str = "cpu",
) -> torch.optim.Optimizer:
    """`name` from OPTIMIZERS. Weight decay skips biases and norm parameters.

    adam/adamw: apex FusedAdam on CUDA when apex is importable, else torch's Adam/AdamW with
    fused=True on CUDA and foreach=True on the CPU. lamb: apex FusedLAMB (requires apex and
    CUDA). lars: the in-repo LARS (momentum 0.9).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if lr <= 0 or weight_decay < 0:
        raise ValueError(
            f"need lr > 0 and weight_decay >= 0, got lr={lr}, weight_decay={weight_decay}"
        )
    cuda = torch.device(device).type == "cuda"
    decay, no_decay = _split_decay(model)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    use_apex = cuda and apex_available()
    if name == "lamb":
        if not use_apex:
            raise RuntimeError(
                "optimizer 'lamb' needs NVIDIA apex (apex.optimizers.FusedLAMB) "
                "and a CUDA device; use 'adamw' or 'lars' here"
            )
        from apex.optimizers import FusedLAMB

        return FusedLAMB(groups, lr=lr)
    if name == "lars":
        groups[1]["lars_exclude"] = True
        return LARS(groups, lr=lr)
    if use_apex:
        from apex.optimizers import FusedAdam

        return FusedAdam(groups, lr=lr, adam_w_mode=(name == "adamw"))
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(groups, lr=lr, **({"fused": True} if cuda else {"foreach": True}))


def optimizer_description(optimizer: torch.optim.Optimizer) -> str:
    """e.g. 'torch.optim.adamw.AdamW(foreach)' or 'apex.optimizers.fused_lamb.FusedLAMB'."""
    cls = type(optimizer)
    flags = [k for k in ("fused", "foreach") if optimizer.defaults.get(k)]
    return f"{cls.__module__}.{cls.__name__}" + (f"({','.join(flags)})" if flags else "")
