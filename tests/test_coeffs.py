"""fastdistill.coeffs against the definitions of each parameterisation: build x0 and the noise, form x_t and the
network's regression target as the parameterisation defines them, and check that ``A·x_t + C·target`` gives back
x0 (floats and [B] tensors); the CFG weights against the two combinations they stand for."""

from __future__ import annotations

import math

import pytest
import torch

from fastdistill.coeffs import cfg_weights, x0_coeffs

F64 = torch.float64
B = 5


def _draw(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 3, 4, generator=g, dtype=F64)
    eps = torch.randn(B, 3, 4, generator=g, dtype=F64)
    u = torch.rand(B, generator=g, dtype=F64) * 0.9 + 0.05  # in (0.05, 0.95)
    return x0, eps, u


def _col(v):
    return v.view(-1, 1, 1) if isinstance(v, torch.Tensor) else v


def _cases(x0, eps, u, as_tensor):
    """(param, kwargs, x_t, target) per parameterisation, from its definition; u is [B] or one float."""
    sd = 0.5
    t = u * (math.pi / 2)
    a_vp = torch.sqrt(1 - u**2) if as_tensor else math.sqrt(1 - u**2)  # VP: α² + σ² = 1
    a_ve = 1.3 - u  # eps: any α, σ
    cos, sin = (torch.cos(t), torch.sin(t)) if as_tensor else (math.cos(t), math.sin(t))
    z = sd * eps  # TrigFlow noise ~ N(0, σ_d²)
    return [
        ("eps", dict(alpha=a_ve, sigma=u), _col(a_ve) * x0 + _col(u) * eps, eps),
        ("v", dict(alpha=a_vp, sigma=u), _col(a_vp) * x0 + _col(u) * eps, _col(a_vp) * eps - _col(u) * x0),
        ("flow", dict(sigma=u), (1 - _col(u)) * x0 + _col(u) * eps, eps - x0),
        ("trigflow", dict(t=t, sigma_d=sd), _col(cos) * x0 + _col(sin) * z, (_col(cos) * z - _col(sin) * x0) / sd),
        ("x0", {}, x0 + eps, x0),
    ]


@pytest.mark.parametrize("as_tensor", [True, False], ids=["tensor", "float"])
@pytest.mark.parametrize("param", ["eps", "v", "flow", "trigflow", "x0"])
def test_x0_from_each_parameterisation(param, as_tensor):
    x0, eps, u = _draw()
    if not as_tensor:
        u = float(u[1])
    (kw, x_t, target), = [c[1:] for c in _cases(x0, eps, u, as_tensor) if c[0] == param]
    A, C = x0_coeffs(param, **kw)
    if as_tensor and param != "x0":
        assert isinstance(A, torch.Tensor) and A.shape == (B,) and isinstance(C, torch.Tensor) and C.shape == (B,)
    torch.testing.assert_close(_col(A) * x_t + _col(C) * target, x0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("param,given", [("eps", dict(alpha=0.5)), ("eps", dict(sigma=0.5)), ("v", dict(alpha=0.5)),
                                         ("flow", dict(alpha=0.5)), ("trigflow", dict(sigma=0.5))])
def test_missing_arguments_named(param, given):
    with pytest.raises(ValueError, match=rf"x0_coeffs\(param='{param}'\): missing argument"):
        x0_coeffs(param, **given)


def test_unknown_param_and_mode():
    with pytest.raises(ValueError, match="^param: expected one of"):
        x0_coeffs("epsilon", alpha=1.0, sigma=0.0)
    with pytest.raises(ValueError, match="^mode: expected 'std' or 'offset'"):
        cfg_weights(2.0, "cfg")


@pytest.mark.parametrize("mode", ["std", "offset"])
@pytest.mark.parametrize("as_tensor", [True, False], ids=["tensor", "float"])
def test_cfg_weights(mode, as_tensor):
    _, c, _ = _draw(1)
    _, u, s = _draw(2)
    s = s * 6 if as_tensor else 4.5
    wc, wu = cfg_weights(s, mode)
    want = u + _col(s) * (c - u) if mode == "std" else c + _col(s) * (c - u)
    torch.testing.assert_close(_col(wc) * c + _col(wu) * u, want, rtol=1e-12, atol=1e-12)
