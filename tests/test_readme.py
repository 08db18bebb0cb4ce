"""The README's and docs' code snippets run as written (toy sizes, CPU) and compute what the text next to them says.

Each test takes the snippet from the document itself, so an edit that breaks a snippet fails here. The DMD2 step is
checked against DMD2's generator gradient written out here; the other snippets against the equivalence their text
states (``fused_linear_kd_loss`` is ``kd_loss`` on the logits, the allocation-free label shift is the sliced call,
the JVP calls are ``torch.func.jvp`` of stock math SDPA in float64, a one-rank context-parallel call is the
single-device op)."""

import os
import re
import types

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastdistill

ROOT = os.path.join(os.path.dirname(__file__), "..")
README = os.path.join(ROOT, "README.md")


def snippet(doc: str, needle: str) -> str:
    """The ```python block of ``doc`` (a path under the checkout) that contains ``needle``."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, doc)).read(), re.S) if needle in b]
    assert len(blocks) == 1, f"{doc}: {len(blocks)} python blocks contain {needle!r}"
    return blocks[0]


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


class _LM:
    """A toy causal LM with transformers' attribute names: ``.model(ids).last_hidden_state``, ``.lm_head``."""

    def __init__(self, vocab: int, hidden: int, g: torch.Generator):
        self.emb = torch.randn(vocab, hidden, generator=g, dtype=torch.float64).requires_grad_()
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False, dtype=torch.float64)
        torch.nn.init.normal_(self.lm_head.weight, generator=g)

    def model(self, ids):
        return types.SimpleNamespace(last_hidden_state=torch.tanh(self.emb[ids]))


def test_readme_fused_linear_kd_example_is_kd_loss_on_the_shifted_logits():
    """README "KD through the lm_head": the snippet equals ``kd_loss`` on the logits it never materialises, shifted
    as the comment says (row i predicts token i + 1), in value and in the gradient of the student's weights."""
    g = torch.Generator().manual_seed(1)
    V = 19
    student, teacher = _LM(V, 8, g), _LM(V, 12, g)  # H_t ≠ H_s, as the comment allows
    input_ids = torch.randint(0, V, (2, 7), generator=g)
    labels = input_ids.clone()
    labels[0, 4] = labels[1, 2] = -100
    env = {"torch": torch, "fastdistill": fastdistill, "student": student, "teacher": teacher,
           "input_ids": input_ids, "labels": labels}
    exec(snippet("README.md", "fused_linear_kd_loss(h_s[:, :-1]"), env)
    loss = env["loss"]
    loss.backward()
    got = (student.lm_head.weight.grad.clone(), student.emb.grad.clone())
    student.lm_head.weight.grad = student.emb.grad = None
    s = student.lm_head(student.model(input_ids).last_hidden_state)
    with torch.no_grad():
        t = teacher.lm_head(teacher.model(input_ids).last_hidden_state)
    ref = fastdistill.kd_loss(s[:, :-1], t[:, :-1], divergence="jsd", beta=0.5, temperature=2.0, labels=labels[:, 1:])
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-10, atol=1e-13), (loss, ref)
    for a, b in zip(got, (student.lm_head.weight.grad, student.emb.grad)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-13)


def test_kd_ops_allocation_free_label_shift_equals_the_slices():
    """docs/kd_ops.md "Input views": the whole logits with ``F.pad(labels[:, 1:], (0, 1), value=-100)`` and
    ``inplace_grad=True`` give the loss and the gradient of the sliced call (the last position ignored)."""
    g = torch.Generator().manual_seed(2)
    B, T, V = 2, 6, 11
    z_s, teacher_logits = torch.randn(B, T, V, generator=g), torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, 3] = -100
    code = re.search(r"`(kd_loss\(logits, teacher_logits, labels=F\.pad.*?)`", open(os.path.join(ROOT, "docs",
                                                                                                   "kd_ops.md")).read())
    assert code is not None
    for backend in ("reference", "triton") if fastdistill._backend.interpreting() else ("reference",):
        with fastdistill.use_backend(backend):
            leaf = z_s.clone().requires_grad_()
            env = {"kd_loss": fastdistill.kd_loss, "F": F, "logits": leaf * 1.0, "teacher_logits": teacher_logits,
                   "labels": labels}
            loss = eval(code.group(1), env)
            loss.backward()
            leaf2 = z_s.clone().requires_grad_()
            ref = fastdistill.kd_loss(leaf2[:, :-1], teacher_logits[:, :-1], labels=labels[:, 1:])
            ref.backward()
        assert torch.allclose(loss, ref, rtol=1e-6), (backend, loss, ref)
        assert torch.allclose(leaf.grad, leaf2.grad, rtol=1e-5, atol=1e-8), backend


def _math_jvp(f, primals, tangents):
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(f, primals, tangents)


def test_readme_jvp_attention_examples_match_math_attention():
    """README "JVP attention": the three calls run as written; o and the tangent are ``torch.func.jvp`` of stock math
    SDPA (float64), and the causal call's backward is math SDPA's gradient."""
    g = torch.Generator().manual_seed(3)
    q, k, v, tq, tk, tv = (torch.randn(2, 5, 2, 8, generator=g, dtype=torch.float64) for _ in range(6))
    grad = torch.randn(2, 5, 2, 8, generator=g, dtype=torch.float64)
    q.requires_grad_()
    env = {"torch": torch, "fastdistill": fastdistill, "q": q, "k": k, "v": v, "tq": tq, "tk": tk, "tv": tv,
           "g": grad}
    exec(snippet("README.md", "fastdistill.jvp_attention(q, k, v, tq, tk, tv)"), env)
    sdpa = lambda q, k, v, causal=False: F.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in (q, k, v)), is_causal=causal).transpose(1, 2)
    o_ref, t_ref = _math_jvp(sdpa, (q.detach(), k, v), (tq, tk, tv))
    assert torch.allclose(env["to"], t_ref, atol=1e-12) and torch.allclose(env["do_dt"], t_ref, atol=1e-12)
    q2 = q.detach().clone().requires_grad_()
    o_c = sdpa(q2, k, v, causal=True)
    o_c.backward(grad)
    assert torch.allclose(env["o"], o_c, atol=1e-12)
    assert torch.allclose(q.grad, q2.grad, atol=1e-12)


class _Block(torch.nn.Module):
    """A transformer-ish block over [B, S, D] tokens, time-conditioned, attention through ``attn(q, k, v)`` on
    [B, S, H, D] tensors."""

    def __init__(self, attn, D=8, H=2):
        super().__init__()
        self.attn, self.H = attn, H
        self.qkv = torch.nn.Linear(D, 3 * D, dtype=torch.float64)
        self.t = torch.nn.Linear(1, D, dtype=torch.float64)

    def forward(self, x, t):
        B, S, D = x.shape
        h = x + self.t(t.view(-1, 1, 1))
        q, k, v = self.qkv(h).view(B, S, 3, self.H, D // self.H).unbind(2)
        return x + self.attn(q, k, v).reshape(B, S, D)


def test_readme_scm_step_and_jvp_sdpa_examples():
    """README: the sCM / MeanFlow step (attention layers calling ``jvp_attention``) and the ``jvp_sdpa()`` block over
    an unmodified SDPA model give the tangent and the parameter gradients of stock math SDPA (float64)."""
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    fd_attn = lambda q, k, v: fastdistill.jvp_attention(q, k, v)[0]
    sdpa_attn = lambda q, k, v: F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    model_fd = _Block(fd_attn)
    model_sdpa = _Block(sdpa_attn)
    model_sdpa.load_state_dict(model_fd.state_dict())
    x_t, dx_dt = (torch.randn(2, 6, 8, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.rand(2, generator=g, dtype=torch.float64)
    F_teacher = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)

    env = {"torch": torch, "model": model_fd, "x_t": x_t, "t": t, "dx_dt": dx_dt, "F_teacher": F_teacher}
    exec(snippet("README.md", "loss = ((F_x - (F_teacher - dF_dt).detach()) ** 2).mean()"), env)
    env2 = {"torch": torch, "model": lambda x, t, text: model_sdpa(x, t), "x_t": x_t, "t": t, "dx_dt": dx_dt,
            "text": None}
    exec(snippet("README.md", "with jvp_sdpa():"), env2)

    model_ref = _Block(sdpa_attn)
    model_ref.load_state_dict(model_fd.state_dict())
    F_x, dF_dt = _math_jvp(lambda x, t: model_ref(x, t), (x_t, t), (dx_dt, torch.ones_like(t)))
    with sdpa_kernel(SDPBackend.MATH):
        ((F_x - (F_teacher - dF_dt).detach()) ** 2).mean().backward()
    assert torch.allclose(env["dF_dt"], dF_dt, atol=1e-12) and torch.allclose(env2["dF_dt"], dF_dt, atol=1e-12)
    assert torch.allclose(env["loss"], ((F_x - (F_teacher - dF_dt)) ** 2).mean(), atol=1e-12)
    for (name, p), p_ref in zip(model_fd.named_parameters(), model_ref.parameters()):
        assert torch.allclose(p.grad, p_ref.grad, atol=1e-12), name


def test_context_parallel_example_on_one_rank():
    """docs/context_parallel.md "Calling it" on a single process (no process group: one rank) runs as written and
    is the single-device op, the zigzag helpers included."""
    g = torch.Generator().manual_seed(5)
    full = {n: torch.randn(1, 8, 2, 4, generator=g, dtype=torch.float64)
            for n in ("q_full", "k_full", "v_full", "tq_full", "tk_full", "tv_full")}
    env = {"torch": torch, "cp_group": None, **full, **{n.removesuffix("_full"): x for n, x in full.items()},
           "keep_full": torch.tensor([True, False, True, True, False, True, True, False]).view(1, 1, 8)}
    exec(snippet("docs/context_parallel.md", "zigzag_unshard(o, dim=1, group=cp_group)"), env)
    o, to = fastdistill.jvp_attention(*full.values(), causal=True)
    assert torch.allclose(env["o_full"], o, atol=1e-14)
    o, to = fastdistill.jvp_attention(*full.values())
    assert torch.allclose(env["o"], o, atol=1e-14) and torch.allclose(env["do_dt"], to, atol=1e-13)
