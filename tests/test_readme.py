"""The README's DMD2 example runs as written and computes DMD2's generator gradient."""

import os
import re

import torch

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_dmd2_example():
    text = open(README).read()
    code = re.search(r"### DMD2 generator step\n\n```python\n(.*?)```", text, re.S).group(1)
    torch.manual_seed(0)
    B = 2
    x = torch.randn(B, 4, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    nets = {name: torch.randn(1, 4, 1, 1, 1, dtype=torch.float64) for name in ("cond", "uncond", "fake")}
    teacher = lambda xt, s, c: xt * nets[c] + s.view(-1, 1, 1, 1, 1)
    fake_score = lambda xt, s, c: xt * nets["fake"] - s.view(-1, 1, 1, 1, 1)
    env = {"x": x, "B": B, "teacher": teacher, "fake_score": fake_score, "text": "cond", "null_text": "uncond"}
    exec(code, env)
    # DMD2 in x0 space (flow: x0 = x_t − σ v), standard CFG s = 5, grad = (X_f − X_r)/mean|x − X_r| / N
    xt, sigma = env["xt"], env["sigma"].view(-1, 1, 1, 1, 1)
    u, c = teacher(xt, env["sigma"], "uncond"), teacher(xt, env["sigma"], "cond")
    v_r = u + 5.0 * (c - u)
    X_r, X_f = xt - sigma * v_r, xt - sigma * fake_score(xt, env["sigma"], "cond")
    w = (x.detach() - X_r).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    expected = (X_f - X_r) / w / x.numel()
    assert torch.allclose(x.grad, expected.to(x.grad.dtype), rtol=1e-5, atol=1e-9)
