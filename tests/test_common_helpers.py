"""The shared helpers of fastdistill/ops/_common.py against their documented contracts, directly: row operands
(views, chunks, overlap), option parsing, the backward-guard predicate, saved constants and autocast casting.
The ops' own tests reach these helpers only through the cases they happen to draw."""

import decimal
import itertools

import numpy as np
import pytest
import torch

from fastdistill.ops import _common as cm


# ----------------------------------------------------------------------------- row operands
def _grouped(G=3, R=4, C=5):
    """A ``[G, R, C]`` operand whose rows no single stride reaches (the shifted ``logits[:, :-1]``), and its rows."""
    x = torch.arange(G * (R + 1) * C, dtype=torch.float32).view(G, R + 1, C)[:, :-1]
    return x, x.reshape(G * R, C)


def test_row_chunk_every_slice_of_a_grouped_operand():
    x, rows = _grouped()
    N = rows.shape[0]
    for a, b in itertools.combinations(range(N + 1), 2):
        got = cm.row_chunk(x, slice(a, b))
        assert torch.equal(got, rows[a:b]), (a, b)
        if (b - 1) // 4 == a // 4:  # within one group: a view of x, no copy
            assert got.untyped_storage().data_ptr() == x.untyped_storage().data_ptr(), (a, b)


def test_row_chunk_two_dim_is_a_view():
    x = torch.randn(7, 3)
    got = cm.row_chunk(x, slice(2, 6))
    assert got.data_ptr() == x[2].data_ptr() and torch.equal(got, x[2:6])


def test_row_view():
    y = torch.randn(2, 6, 5)
    assert cm.row_view(y, 12).data_ptr() == y.data_ptr()
    assert cm.row_view(y[:, :-1], 10) is None  # no single row stride
    assert cm.row_view(y.transpose(1, 2), 10) is None  # unit column stride missing
    one = torch.randn(4, 1, 5).transpose(0, 1)  # a size-1 dim with any stride collapses
    assert torch.equal(cm.row_view(one, 4), one.reshape(4, 5))
    assert torch.equal(cm.row_view(y[:, :, :1], 12), y[:, :, :1].reshape(12, 1))  # C = 1: any column stride


def test_as_rows():
    x, rows = _grouped()
    assert cm.as_rows(x, 12, grouped=True) is x
    flat = cm.as_rows(x, 12, grouped=False)
    assert torch.equal(flat, rows) and flat.is_contiguous()
    y = torch.randn(3, 4, 5)
    assert cm.as_rows(y, 12, grouped=False).data_ptr() == y.data_ptr()


def test_rows_overlap():
    C = 5
    assert not cm.rows_overlap(torch.randn(6, C))
    assert cm.rows_overlap(torch.randn(1, C).expand(6, C))
    assert cm.rows_overlap(torch.randn(4 * C).as_strided((4, C), (C - 1, 1)))  # rows one element apart too close
    assert not cm.rows_overlap(torch.randn(4 * C).as_strided((4, C), (C, 1)))  # rows exactly adjacent
    # padded rows (stride C + 1): a group spans 2 (C + 1) + C elements, and the next group may start right there
    assert not cm.rows_overlap(torch.randn(6 * C + 6).as_strided((2, 3, C), (3 * C + 2, C + 1, 1)))
    assert cm.rows_overlap(torch.randn(6 * C + 6).as_strided((2, 3, C), (3 * C + 1, C + 1, 1)))
    assert not cm.rows_overlap(_grouped(C=C)[0])
    assert not cm.rows_overlap(torch.randn(7, 3, C).transpose(0, 1))  # seq-first logits, transposed
    assert cm.rows_overlap(torch.randn(3, C).unsqueeze(0).expand(2, 3, C))  # the same rows in each group
    assert cm.rows_overlap(torch.randn(2, 3 * C).as_strided((3, 2, C), (C, C, 1)))  # groups overlap rows
    # size-1 dims are ignored whatever their stride; an interleaved disjoint layout is a documented false alarm
    assert not cm.rows_overlap(torch.randn(4, C).as_strided((1, 4, C), (0, C, 1)))
    assert cm.rows_overlap(torch.randn(12 * C).as_strided((2, 3, C), (3 * C, 2 * C, 1)))


def test_row_strides_and_groups():
    x, _ = _grouped(G=3, R=4, C=5)
    assert cm.row_strides(x, 4) == (25, 5) and cm.row_groups(x) == 4 and cm.n_rows(x) == 12
    y = torch.randn(6, 5)
    assert cm.row_strides(y, 6) == (30, 5) and cm.row_groups(y) == 6 and cm.n_rows(y) == 6
    assert cm.row_groups(torch.randn(0, 5)) == 1 and cm.row_groups(torch.randn(2, 0, 5)) == 1


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("v,want", [(True, True), (False, False), (0, False), (1, True), (np.bool_(True), True),
                                    (torch.tensor(True), True), (torch.tensor([False]), False)])
def test_check_bool_accepts(v, want):
    assert cm.check_bool("flag", v) is want


@pytest.mark.parametrize("v", ["no", "", 2, -1, 1.0, None, torch.tensor(1), torch.tensor([True, False])])
def test_check_bool_refuses(v):
    with pytest.raises(TypeError, match="flag: expected a bool"):
        cm.check_bool("flag", v)


@pytest.mark.parametrize("v,want", [(3, 3), (0, 0), (-2, -2), (np.int64(5), 5), (torch.tensor(4), 4),
                                    (torch.tensor([7], dtype=torch.int32), 7)])
def test_int_option_accepts(v, want):
    got = cm.int_option("n", v)
    assert got == want and type(got) is int


@pytest.mark.parametrize("v", [True, False, 1.5, 2.0, "3", None, np.float64(2.0), torch.tensor(2.0),
                               torch.tensor(True), torch.tensor([1, 2]), torch.tensor(2, device="meta")])
def test_int_option_refuses(v):
    with pytest.raises(TypeError, match="n: expected an int"):
        cm.int_option("n", v)


def test_count_option():
    assert cm.count_option("k", np.int64(3), "a positive int") == 3
    assert cm.count_option("k", torch.tensor(1), "a positive int") == 1
    assert cm.count_option("start", 0, "an int >= 0", minimum=0) == 0
    for v in (0, -1, True, 2.0, "3", None, torch.tensor(2.0)):
        with pytest.raises(ValueError, match=r"^k: expected a positive int, got "):
            cm.count_option("k", v, "a positive int")


@pytest.mark.parametrize("v,want", [(2, 2.0), (0.5, 0.5), (np.float32(0.25), 0.25), (np.array(1.5), 1.5),
                                    (decimal.Decimal("0.75"), 0.75), (torch.tensor(3.0), 3.0),
                                    (torch.tensor([2], dtype=torch.int64), 2.0), (-1e300, -1e300)])
def test_real_option_accepts(v, want):
    got = cm.real_option("temperature", v)
    assert got == want and type(got) is float


@pytest.mark.parametrize("v,exc", [(float("inf"), ValueError), (float("-inf"), ValueError), (float("nan"), ValueError),
                                   (torch.tensor(float("nan")), ValueError), (True, TypeError), ("1.0", TypeError),
                                   (b"1", TypeError), (None, TypeError), ([1.0], TypeError),
                                   (torch.ones(2), TypeError), (torch.ones(1, device="meta"), TypeError)])
def test_real_option_refuses(v, exc):
    with pytest.raises(exc, match="temperature: "):
        cm.real_option("temperature", v)


def test_real_option_grad_tensor():
    t = torch.tensor(2.0, requires_grad=True)
    with pytest.raises(ValueError, match=r"temperature: requires grad.*temperature.detach\(\)"):
        cm.real_option("temperature", t)
    with torch.no_grad():  # no gradient is being recorded: the value is all that is asked for
        assert cm.real_option("temperature", t) == 2.0


def test_is_finite():
    assert cm.is_finite(0.0) and cm.is_finite(-3) and cm.is_finite(1e308)
    assert not any(cm.is_finite(v) for v in (float("inf"), float("-inf"), float("nan")))


def test_resolve_accum():
    f32, f64, bf16 = torch.float32, torch.float64, torch.bfloat16
    assert cm.resolve_accum(None, torch.ones(1, dtype=bf16), None, 3) == f32
    assert cm.resolve_accum(None, torch.ones(1, dtype=bf16), torch.ones(1, dtype=f64)) == f64
    assert cm.resolve_accum(f32, torch.ones(1, dtype=f64)) == f32  # explicit: unchanged
    assert cm.resolve_accum(None) == f32


def test_value_vector():
    v = cm.value_vector([0.1, 2, -3.5], "cpu", torch.float32)
    assert v.dtype == torch.float32 and torch.equal(v, torch.tensor([0.1, 2.0, -3.5]))
    assert torch.equal(cm.value_vector([0.1], "cpu", torch.float64), torch.tensor([0.1], dtype=torch.float64))


def test_check_choice():
    cm.check_choice("reduction", "sum", ("sum", "mean"))
    with pytest.raises(ValueError, match=r"reduction: expected one of \('sum', 'mean'\), got 'avg'"):
        cm.check_choice("reduction", "avg", ("sum", "mean"))


# ----------------------------------------------------------------------------- backward guards
def test_reached():
    z, nz = torch.zeros(3), torch.tensor([0.0, -1e-30, 0.0])
    assert not cm.reached() and not cm.reached(None) and not cm.reached(None, None)
    assert not cm.reached(z) and not cm.reached(z, None, torch.zeros(2, 2))
    assert cm.reached(nz) and cm.reached(None, z, nz) and cm.reached(nz, z)
    assert cm.reached(torch.tensor([float("nan")]))  # a NaN is not "no gradient"


def test_graph_anchor():
    x = torch.randn(3, 4, requires_grad=True)
    a = cm.graph_anchor(x)
    assert a.shape == (1,) and a.requires_grad and a.item() == 0.0
    a.sum().backward()
    assert x.grad is not None and (x.grad == 0).all()
    assert cm.graph_anchor(None) is None
    assert cm.graph_anchor(torch.randn(3)) is None
    assert cm.graph_anchor(torch.randn(0, requires_grad=True)) is None
    with torch.no_grad():
        assert cm.graph_anchor(x) is None


class _Scale(torch.autograd.Function):
    """x * c, the constant c saved with save_constants."""

    @staticmethod
    def forward(ctx, x, c):
        cm.save_constants(ctx, x, c)
        return x * c

    @staticmethod
    def backward(ctx, g):
        _, c = cm.saved_constants(ctx)
        return g * c, None


@pytest.mark.parametrize("inference", [False, True])
def test_saved_constants(inference):
    x = torch.randn(4, requires_grad=True)
    if inference:
        with torch.inference_mode():
            c = torch.randn(4)
    else:
        c = torch.randn(4)
    y = _Scale.apply(x, c)
    y.sum().backward(retain_graph=True)
    assert torch.equal(x.grad, c)
    if inference:  # held on the context, released by the first backward
        with pytest.raises(RuntimeError, match="second backward through this graph"):
            y.sum().backward()
    else:  # saved by autograd: a second backward works
        y.sum().backward()
        assert torch.equal(x.grad, 2 * c)


def test_first_order_double_backward_raises():
    @staticmethod
    @cm.first_order("toy")
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g

    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    Sq = type("Sq", (torch.autograd.Function,), dict(forward=staticmethod(forward), backward=backward))
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(Sq.apply(x).sum(), x, create_graph=True)
    assert torch.equal(g, 2 * x) and g.requires_grad
    with pytest.raises(RuntimeError, match="toy: double backward is not supported"):
        g.sum().backward()
    # a second backward that reaches the gradient with zeros only (a penalty weighted 0): no term is lost, no error
    (g0,) = torch.autograd.grad(Sq.apply(x).sum(), x, create_graph=True)
    (g0 * 0.0).sum().backward()
    assert x.grad is None or torch.equal(x.grad, torch.zeros_like(x))
    (g2,) = torch.autograd.grad(Sq.apply(x).sum(), x)  # a plain backward: no graph
    assert torch.equal(g2, 2 * x) and not g2.requires_grad


# ----------------------------------------------------------------------------- autocast
def test_autocast_cast():
    f32, f64, i64 = torch.ones(2), torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.int64)
    assert all(a is b for a, b in zip(cm.autocast_cast(f32, f64, i64, None), (f32, f64, i64, None)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b, c, d, e = cm.autocast_cast(f32, f64, i64, None, f32.half())
    assert (a.dtype, b, c, d, e.dtype) == (torch.bfloat16, f64, i64, None, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert cm.autocast_cast(f32)[0] is f32


def test_autocast_off():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with cm.autocast_off("cpu"):
            assert not torch.is_autocast_enabled("cpu")
        assert torch.is_autocast_enabled("cpu")
    with cm.autocast_off("meta"):  # no autocast for meta: a no-op context
        pass
