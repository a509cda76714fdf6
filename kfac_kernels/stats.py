"""Statistics for loggers: ``opt.stats()`` (TensorBoard, wandb, ...).

A flat ``{name: scalar}`` dict. By default the values that live on the device stay 0-d device
tensors (no host synchronisation: a logger that calls ``.item()`` later, or only every k steps,
pays for it then); ``stats(sync=True)`` turns everything into Python floats with ONE transfer.

Keys (``<block>`` is the block's module name, as in ``opt.blocks``):

* ``damping``, ``kl_clip`` (when set), ``lr`` (of the first param group);
* ``kl_clip/factor``: the factor the last step's update was scaled by (1 without a clip);
* ``kl_clip/steps``, ``kl_clip/binds``, ``kl_clip/bind_fraction``: the steps the clip was
  evaluated on, how many of them it bound on (scaled the update down; a device count), and their
  ratio (device). Under ``kl_clip_mode="step"`` a clip that binds on (nearly) every step makes
  ``lr`` inert: the step is then ``sqrt(kl_clip / <U, V>) U`` (docs/math.md, "The update");
  differences of two readings give the recent rate;
* ``steps``, ``factor_updates``, ``inverse_updates``, ``skipped_steps``;
* ``time/inverse_update_s``: host seconds of the last inverse update (it reads decomposition
  health on the host, so on a GPU this is the update's wall time);
* ``<block>/grad_norm``: Frobenius norm of the block's current gradient matrix (``[W | b]``);
* ``<block>/update_norm``: of its last preconditioned direction (after the KL clip, before lr and
  momentum); recorded from the step after the first ``stats()`` call on (keeping the last
  directions costs memory of the size of the blocks' gradients, so it is off until asked for);
* ``<block>/A_eig_min``, ``A_eig_max``, ``G_eig_min``, ``G_eig_max``: eigenvalue range of each
  factor at the last decomposition (eigh, ekfac; ``cholesky`` keeps no eigenvalues and reports the
  range of the factor's diagonal instead, ``A_diag_min`` ...); stacked blocks (grouped
  convolutions, normalisation layers) report the range over the stack.
"""
from __future__ import annotations

from typing import Dict, Union

import torch

__all__ = ["collect"]

Scalar = Union[float, int, torch.Tensor]


def _range(t: torch.Tensor):
    t = t.detach()
    return t.amin(), t.amax()


def collect(opt, sync: bool = False) -> Dict[str, Scalar]:
    """The statistics of ``opt`` (a KFAC or KFACPreconditioner); see the module docstring."""
    eng = opt.engine
    out: Dict[str, Scalar] = {"damping": float(eng.damping)}
    if getattr(opt, "kl_clip", None) is not None:
        out["kl_clip"] = float(opt.kl_clip)
    groups = getattr(opt, "param_groups", None)
    if groups:
        out["lr"] = float(groups[0]["lr"])
    nu = getattr(opt, "_last_nu", None)
    out["kl_clip/factor"] = nu.detach() if isinstance(nu, torch.Tensor) else 1.0
    count = getattr(opt, "clip_count", None)
    if count is not None and count.steps:
        out["kl_clip/steps"] = count.steps
        out["kl_clip/binds"] = count.binds
        out["kl_clip/bind_fraction"] = count.binds / float(count.steps)
    out["steps"] = eng.steps
    out["factor_updates"] = eng.factor_updates
    out["inverse_updates"] = eng.inverse_updates
    skipped = getattr(opt, "_skipped", 0)
    out["skipped_steps"] = skipped if isinstance(skipped, torch.Tensor) else int(skipped)
    out["time/inverse_update_s"] = float(getattr(eng, "last_inverse_seconds", 0.0))
    last_u = getattr(opt, "_last_updates", None)
    with torch.no_grad():
        for name, b in eng.blocks.items():
            g = b.grad_matrix() if b.weight.grad is not None else None
            if g is not None:
                out[f"{name}/grad_norm"] = torch.linalg.vector_norm(g.detach())
            if last_u and name in last_u:
                u = torch.linalg.vector_norm(last_u[name])
                out[f"{name}/update_norm"] = u if not isinstance(nu, torch.Tensor) else u * nu
            inv = b.inverse
            for side in ("A", "G"):
                lam = inv.get(f"lam{side}")
                if lam is not None:
                    lo, hi = _range(lam)
                    out[f"{name}/{side}_eig_min"], out[f"{name}/{side}_eig_max"] = lo, hi
                    continue
                F = getattr(b, side)
                if F is not None and inv:
                    d = F.diagonal(dim1=-2, dim2=-1) if F.dim() >= 2 else F
                    lo, hi = _range(d)
                    out[f"{name}/{side}_diag_min"], out[f"{name}/{side}_diag_max"] = lo, hi
    if sync:                    # one transfer per device
        by_dev: Dict[torch.device, list] = {}
        for k, v in out.items():
            if isinstance(v, torch.Tensor):
                by_dev.setdefault(v.device, []).append(k)
        for keys in by_dev.values():
            vals = torch.stack([out[k].reshape(()).to(torch.float64) for k in keys]).tolist()
            out.update(zip(keys, vals))
    return out
