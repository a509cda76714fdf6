"""Step control from the local quadratic model (Martens & Grosse 2015, sections 6.4-6.6).

On the current batch the objective h (the user's loss, plus ``weight_decay/2 ||theta||^2``) is
modelled around the parameters by

    M(delta) = 1/2 delta^T (C + (lambda + eta) I) delta + g^T delta,

with C the exact Gauss-Newton matrix of the loss as written (``J^T H J``, J the Jacobian of the
model output, H the Hessian of the loss with respect to that output), lambda the damping and eta
the weight decay. Three options of :class:`kfac_kernels.KFAC` use it, all off by default:

* ``adaptive_lr``: the update is ``delta = alpha Delta + mu delta_prev`` with Delta the K-FAC
  direction and delta_prev the previous update; alpha (and, with ``adaptive_momentum``, mu)
  minimise M exactly: the 2x2 system ``K [alpha, mu] = -b`` with ``K_ij = v_i^T (C + (lambda +
  eta) I) v_j``, ``b_i = g^T v_i``. Without ``adaptive_momentum`` the given ``momentum`` is used
  as mu and alpha alone is solved for (set ``momentum=0`` for a plain line search); a step the
  model predicts to raise the loss falls back to the best step along Delta alone. Group learning
  rates are not used (one alpha for all parameters).
* ``adaptive_damping``: Levenberg-Marquardt. Every ``damping_adaptation_every`` (T) steps,
  ``rho = (h(theta + delta) - h(theta)) / M(delta)`` on the same batch; rho > 3/4 multiplies
  lambda by ``omega = damping_adaptation_decay ** T``, rho < 1/4 divides it by omega, and so do
  a predicted increase (possible with a fixed lr) and a non-finite loss after the step; a
  predicted change below the loss's rounding noise (converged) leaves it alone. Clamped to
  ``damping_bounds``. The same lambda damps the K-FAC inverse (one damping, as kfac-jax does).
  ``opt.control.history`` records step, rho, predicted and actual change, and the damping.

Curvature-vector products are exact on the batch, by autograd: ``J v`` through the
double-backward identity ``J v = d/du <J^T u, v>`` on the forward graph of the step (kept alive
for it), and ``H (J v)`` by differentiating the loss twice with respect to the output. So the
model needs the batch: ``step(closure)`` with a closure that runs the forward pass and returns
``(loss, out)``; the step itself calls ``zero_grad`` and ``backward``, and re-evaluates the
closure (no gradients, no capture) on damping-adaptation steps.

Cost and synchronisation: with ``adaptive_lr`` every step adds a backward pass with graph
construction, one pass of the double graph per vector (one or two) and two cheap loss-Hessian
products; alpha and mu stay on the device (no host sync). ``adaptive_damping`` adds, every T
steps, one forward pass and one host sync (reading rho). Incompatible with ``kl_clip`` (the
quadratic model sets the step length) and with a GradScaler.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, cast

import torch

__all__ = ["StepControl", "gauss_newton_gram"]

Vec = List[Optional[torch.Tensor]]          # one entry per parameter (None: zero)


def _dot(a: Vec, b: Vec) -> torch.Tensor:
    """Sum over parameters of <a_p, b_p> in float64 (0-d device tensor)."""
    terms = [(x.double() * y.double()).sum() for x, y in zip(a, b)
             if x is not None and y is not None]
    return torch.stack(terms).sum() if terms else torch.zeros((), dtype=torch.float64)


def gauss_newton_gram(loss: torch.Tensor, out: torch.Tensor, params: Sequence[torch.Tensor],
                      vectors: Sequence[Vec]) -> torch.Tensor:
    """``[(J v_i)^T H (J v_j)]_{ij}`` in float64 for parameter-space vectors ``v_i``.

    J is the Jacobian of ``out`` with respect to ``params``, H the Hessian of ``loss`` with
    respect to ``out``; the forward graph from ``params`` to ``loss`` must still be alive.
    """
    with torch.enable_grad():
        u = torch.zeros_like(out, requires_grad=True)
        jt_u = torch.autograd.grad(out, params, grad_outputs=u, create_graph=True,
                                   allow_unused=True)
        live = [i for i, g in enumerate(jt_u) if g is not None and g.requires_grad]
        jv = []
        for vec in vectors:
            pairs = [(jt_u[i], v) for i in live if (v := vec[i]) is not None]
            outs = [o for o, _ in pairs]
            gos = [v.to(o.dtype) for o, v in pairs]
            if outs:
                (j,) = torch.autograd.grad(outs, u, grad_outputs=gos, retain_graph=True,
                                           allow_unused=True)
            else:
                j = None
            jv.append(torch.zeros_like(out) if j is None else j)
        (g_out,) = torch.autograd.grad(loss, out, create_graph=True)
        hjv = []
        for j in jv:
            if g_out.requires_grad:
                (h,) = torch.autograd.grad(g_out, out, grad_outputs=j, retain_graph=True,
                                           allow_unused=True)
            else:
                h = None                    # loss linear in the output: H = 0
            hjv.append(torch.zeros_like(out) if h is None else h)
    k = len(vectors)
    gram = torch.empty(k, k, dtype=torch.float64, device=out.device)
    for a in range(k):
        for b in range(a, k):
            gram[a, b] = gram[b, a] = (jv[a].double() * hjv[b].double()).sum()
    return gram


class StepControl:
    """The adaptive options of :class:`kfac_kernels.KFAC` (see the module docstring)."""

    def __init__(self, *, adaptive_lr: bool, adaptive_momentum: bool, adaptive_damping: bool,
                 every: int, decay: float, bounds: Tuple[float, float]):
        if adaptive_momentum and not adaptive_lr:
            raise ValueError("adaptive_momentum=True needs adaptive_lr=True (they are solved "
                             "together from the quadratic model)")
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"damping_adaptation_every must be an integer >= 1, got {every!r}")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"damping_adaptation_decay must be in (0, 1), got {decay}")
        lo, hi = bounds
        if not 0.0 <= lo <= hi:
            raise ValueError(f"damping_bounds must be (low, high) with 0 <= low <= high, got "
                             f"{bounds!r}")
        self.adaptive_lr = adaptive_lr
        self.adaptive_momentum = adaptive_momentum
        self.adaptive_damping = adaptive_damping
        self.every = every
        self.omega = decay ** every
        self.bounds = (float(lo), float(hi))
        self.history: List[dict] = []        # damping adaptations: step, rho, damping (host)
        self.last: Dict[str, torch.Tensor] = {}   # device tensors of the last step: alpha, mu, M

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, sd: dict) -> None:
        self.history = list(sd.get("history", []))

    # ---------------------------------------------------------------- the step
    def step(self, opt, closure):
        if closure is None:
            raise ValueError("the adaptive options need opt.step(closure) with a closure that "
                             "runs the forward pass on the batch and returns (loss, out)")
        eng = opt.engine
        with torch.enable_grad():
            res = closure()
        if not (isinstance(res, (tuple, list)) and len(res) == 2):
            raise ValueError("with adaptive_lr / adaptive_damping the closure must return "
                             "(loss, out): the loss and the model output it was computed from")
        loss, out = res
        adapt_now = self.adaptive_damping and (eng.steps + 1) % self.every == 0
        need_model = self.adaptive_lr or adapt_now
        opt.zero_grad()
        opt.backward(loss, out, retain_graph=need_model)
        ok = opt.begin_step()
        direction, ok = opt.directions(ok, kl_clip=not self.adaptive_lr)
        group_of = opt.group_of()
        params = [p for g in opt.param_groups for p in g["params"] if id(p) in direction]
        wd = [group_of[id(p)]["weight_decay"] for p in params]
        grads = [p.grad if not w else p.grad.add(p, alpha=w) for p, w in zip(params, wd)]
        lam = float(opt.damping)

        if self.adaptive_lr:
            pred, good = self._adaptive_update(opt, loss, out, params, direction, grads, wd, lam,
                                               ok)
        else:
            pred = None
            if adapt_now:      # the model of the update the fixed lr / momentum will take
                deltas: Vec = []
                for p in params:
                    g = group_of[id(p)]
                    d = direction[id(p)]
                    buf = opt.state[p].get("momentum_buffer") if g["momentum"] else None
                    deltas.append(-g["lr"] * (d if buf is None else buf * g["momentum"] + d))
                with eng.paused():
                    K, b = self._model(loss, out, params, [deltas], grads, wd, lam)
                pred = 0.5 * K[0, 0] + b[0]
            opt.apply_update(direction, ok)
            good = ok
        opt.end_step(ok)
        if adapt_now:
            self._adapt_damping(opt, closure, loss, pred, good)
        return loss.detach()

    def _adaptive_update(self, opt, loss, out, params, direction, grads, wd, lam, ok):
        """adaptive_lr: the update ``alpha Delta + mu delta_prev`` minimising the quadratic model,
        applied on the device; returns (predicted change, accepted flag)."""
        eng = opt.engine
        Delta: Vec = [-direction[id(p)] for p in params]
        prev: Vec = [opt.state[p].get("kfac_delta") for p in params]
        has_prev = all(v is not None for v in prev)
        mom = opt.param_groups[0]["momentum"]
        vecs = [Delta] + ([prev] if has_prev and (self.adaptive_momentum or mom) else [])
        with eng.paused():
            K, b = self._model(loss, out, params, vecs, grads, wd, lam)
        alpha, mu = self._solve(K, b, mom if not self.adaptive_momentum else None)
        coef = torch.stack([alpha, mu])[:len(vecs)]
        pred = 0.5 * coef @ K @ coef + coef @ b
        if len(vecs) > 1:
            # never a step the model predicts to raise the loss (a fixed momentum can):
            # then the best step along Delta alone
            a1 = -b[0] / K[0, 0]
            worse = ~(pred <= 0)
            alpha = torch.where(worse, a1, alpha)
            mu = torch.where(worse, torch.zeros_like(mu), mu)
            pred = torch.where(worse, 0.5 * a1 * b[0], pred)
        if ok is not None:
            good = ok.to(coef.device) & torch.isfinite(pred)
        else:
            good = torch.isfinite(pred)
        alpha = torch.where(good, alpha, torch.zeros_like(alpha))
        mu = torch.where(good, mu, torch.zeros_like(mu))
        for i, p in enumerate(params):
            keep = good.to(p.device)
            # Delta has an entry per parameter; prev too where it is used (has_prev)
            delta = cast(torch.Tensor, Delta[i]) * alpha.to(p.dtype)
            if len(vecs) > 1:
                delta = delta + cast(torch.Tensor, prev[i]) * mu.to(p.dtype)
            delta = torch.where(keep, delta, torch.zeros((), dtype=p.dtype, device=p.device))
            p.add_(delta)
            st = opt.state[p]
            if "kfac_delta" in st:        # a rejected step keeps the previous update
                st["kfac_delta"].copy_(torch.where(keep, delta, st["kfac_delta"]))
            else:
                st["kfac_delta"] = delta.clone()
        self.last = {"alpha": alpha, "mu": mu, "predicted": pred, "ok": good}
        return pred, good

    # ---------------------------------------------------------------- pieces
    def _model(self, loss, out, params, vecs, grads, wd, lam):
        """The quadratic model restricted to span(vecs): (K, b), float64 on the device."""
        K = gauss_newton_gram(loss, out, params, vecs)
        n = len(vecs)
        for a in range(n):
            for c in range(a, n):
                reg = _dot([None if v is None else v * (lam + w) for v, w in zip(vecs[a], wd)],
                           vecs[c])
                K[a, c] = K[a, c] + reg
                if c != a:
                    K[c, a] = K[a, c]
        b = torch.stack([_dot(grads, v) for v in vecs])
        return K, b

    @staticmethod
    def _solve(K, b, fixed_mu: Optional[float]):
        """argmin over (alpha, mu) of 1/2 x^T K x + b^T x, on the device. With a fixed mu (or a
        single vector) alpha alone is solved for; a singular 2x2 system falls back to mu = 0."""
        zero = torch.zeros((), dtype=K.dtype, device=K.device)
        k00 = K[0, 0]
        if K.shape[0] == 1:
            return -b[0] / k00, zero
        if fixed_mu is not None:
            mu = torch.full((), float(fixed_mu), dtype=K.dtype, device=K.device)
            return -(b[0] + mu * K[0, 1]) / k00, mu
        det = K[0, 0] * K[1, 1] - K[0, 1] ** 2
        well = det > 1e-12 * (K[0, 0] * K[1, 1]).abs()
        safe = torch.where(well, det, torch.ones_like(det))
        alpha2 = (-K[1, 1] * b[0] + K[0, 1] * b[1]) / safe
        mu2 = (K[0, 1] * b[0] - K[0, 0] * b[1]) / safe
        return (torch.where(well, alpha2, -b[0] / k00), torch.where(well, mu2, zero))

    def _adapt_damping(self, opt, closure, loss, pred, good) -> None:
        """Levenberg-Marquardt on the damping (host sync: this runs every T steps only)."""
        eng = opt.engine
        with torch.no_grad(), eng.paused():
            new = closure()
        new_loss = new[0] if isinstance(new, (tuple, list)) else new
        h0 = float(loss.detach().double())
        actual = float(new_loss.detach().double()) - h0
        predicted = float(pred) if pred is not None else float("nan")
        accepted = bool(good) if isinstance(good, torch.Tensor) else True
        # below the rounding noise of the loss, rho says nothing: leave the damping alone
        noise = 100 * torch.finfo(loss.dtype).eps * max(abs(h0), 1e-30)
        lam = float(opt.damping)
        rho = actual / predicted if abs(predicted) > noise else float("nan")
        if not math.isfinite(actual) or not math.isfinite(predicted):
            lam /= self.omega                  # the step made the loss (or model) non-finite
        elif predicted > noise:
            lam /= self.omega                  # even the model says the step raises the loss
        elif predicted < -noise and accepted:
            if rho > 0.75:
                lam *= self.omega
            elif rho < 0.25:
                lam /= self.omega
        # |predicted| below the loss's rounding noise (converged): no information, no change
        lam = min(max(lam, self.bounds[0]), self.bounds[1])
        opt.damping = lam
        self.history.append({"step": eng.steps, "rho": rho, "predicted": predicted,
                             "actual": actual, "damping": lam})
