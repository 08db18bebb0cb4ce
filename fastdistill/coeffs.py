"""Per-sample coefficients for the score ops: parameterisation → x0 and CFG weights.

Every network parameterisation gives an x0 prediction that is affine in the raw output,
``x0 = A·x_t + C·pred`` with per-sample scalars (docs/score_ops.md):

| param      | noising                     | A          | C            |
|------------|-----------------------------|------------|--------------|
| "eps"      | x_t = α x0 + σ ε            | 1/α        | −σ/α         |
| "v"        | VP v = α ε − σ x0           | α          | −σ           |
| "flow"     | x_t = (1−σ) x0 + σ ε, v=ε−x0 | 1          | −σ           |
| "trigflow" | x_t = cos t·x0 + sin t·ε    | cos t      | −σ_d sin t   |
| "x0"       | (EDM denoiser output)       | 0          | 1            |

CFG: ``"std"`` is ``u + s(c − u)`` → weights (s, 1 − s) on (cond, uncond); ``"offset"`` is
``c + s(c − u)`` → (1 + s, −s).
"""

from __future__ import annotations

import torch


def x0_coeffs(param: str, *, alpha=None, sigma=None, t=None, sigma_d: float = 1.0):
    """(A, C) with ``x0 = A·x_t + C·pred``; arguments are floats or ``[B]`` tensors."""
    if param == "eps":
        _need(param, alpha=alpha, sigma=sigma)
        return 1.0 / alpha, -sigma / alpha
    if param == "v":
        _need(param, alpha=alpha, sigma=sigma)
        return alpha, -sigma
    if param == "flow":
        _need(param, sigma=sigma)
        return (torch.ones_like(sigma) if isinstance(sigma, torch.Tensor) else 1.0), -sigma
    if param == "trigflow":
        _need(param, t=t)
        if isinstance(t, torch.Tensor):
            return torch.cos(t), -sigma_d * torch.sin(t)
        import math

        return math.cos(t), -sigma_d * math.sin(t)
    if param == "x0":
        return 0.0, 1.0
    raise ValueError(f"param: expected one of ('eps', 'v', 'flow', 'trigflow', 'x0'), got {param!r}")


def cfg_weights(scale, mode: str = "std"):
    """Weights (w_cond, w_uncond) of a CFG combination ``w_cond·c + w_uncond·u``."""
    if mode == "std":
        return scale, 1 - scale
    if mode == "offset":
        return 1 + scale, -scale
    raise ValueError(f"mode: expected 'std' or 'offset', got {mode!r}")


def _need(param: str, **kw) -> None:
    missing = [k for k, v in kw.items() if v is None]
    if missing:
        raise ValueError(f"x0_coeffs(param={param!r}): missing argument(s) {', '.join(missing)}")
