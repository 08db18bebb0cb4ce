"""Context-parallel JVP attention over a torch.distributed process group: ``ring`` and ``ulysses``.

Each rank holds a shard of the sequence (dim S of q, k, v and their tangents) and gets the attention
output of its own query rows, with the tangent Ȯ, lse and d lse of the global attention
(docs/context_parallel.md).

ring     K, V (and K̇, V̇) travel around the group with ``batch_isend_irecv``; the next transfer is in
         flight while the current key block is computed. Per key block c the single-device kernel gives
         (O_c, lse_c, Ȯ_c, μ_c) in fp32, merged as in DESIGN.md §1 "Merging shards":
         lse = logsumexp_c lse_c, w_c = exp(lse_c − lse), O = Σ w_c O_c, μ = Σ w_c μ_c,
         Ȯ = Σ w_c (Ȯ_c + μ_c O_c) − μ O (kept as the running sum T = Σ w_c (Ȯ_c + μ_c O_c)).
         Backward: the flash backward of each key block with the *global* O, lse and d lse gives that
         block's share of dq and its dk, dv (P = exp(S − lse)); dq stays, dk/dv travel with their shard
         and arrive at its owner after one last hop.
ulysses  all-to-all sequence -> heads, the single-device op on the full sequence with H/W heads,
         all-to-all back; the backward all-to-alls the gradients through the single-device backward.

Every rank must make the same call (same shapes, same tangents present, same options): the
collectives have to match. Every call first all-gathers a tiny record from each rank (its call signature,
and whether its arguments passed the local checks, with the error message if not) and decides on the
host, so that every rank raises the same error or none does (``_agree``).
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist

from fastdistill.ops._common import (
    autocast_cast,
    check_bool,
    check_choice,
    eager_only,
    first_order,
    reached,
    reject_dtensor,
    select_backend,
)
from fastdistill.ops.jvp_attention import (
    _STOP_GRAD,
    LAYOUTS,
    OP,
    TransformLimitError,
    _anchor,
    _bhsd,
    _bwd,
    _check,
    _fwd,
    _grid_too_big,
    _guard,
    _impl,
    _kb_kw,
    _key_bias,
    _needs_lo,  # as the single-device op: the ring's blocks and merged lse keep a low word where it does
    _NoGrad,
    _out_shape,
    _stat_dtype,
    autograd_levels,
    check_dual_tangent_dtype,
    jvp_attention,
    softmax_scale,
    transform_limit,
)

MODES = ("ring", "ulysses")
SEQ_LAYOUTS = ("contiguous", "zigzag")


# ----------------------------------------------------------------------------- process group
def _group_info(group) -> tuple[object, int, int]:
    """(group, world size, this rank's index in it); no initialised default group and group=None: one rank."""
    if dist.is_available() and group is not None and group is getattr(dist.GroupMember, "NON_GROUP_MEMBER", object()):
        # dist.new_group gives the processes outside the group this sentinel, not a ProcessGroup
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of the given process "
                         "group (dist.new_group returned GroupMember.NON_GROUP_MEMBER here)")
    if group is not None and not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(f"group: expected a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        if group is None:
            return None, 1, 0
        raise ValueError("group: torch.distributed is not initialised (call init_process_group first)")
    W, r = dist.get_world_size(group), dist.get_rank(group)
    if r < 0:
        raise ValueError("group: this process is not a member of the given process group")
    return group, W, r


def _global(group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


_NEED_CP = ("context-parallel attention needs shards of the same length and the same options, tangents and shapes "
            "on every rank")
_MSG_WORDS = 64  # room for 512 bytes of a local error message in the agreement record
_EXC_KINDS = (ValueError, TypeError)  # kind 1, 2; anything else: 3 (a RuntimeError on the other ranks)


def _agree_device(group, q) -> torch.device:
    """Where the agreement record lives: the CPU when the group has a CPU backend (gloo, or a group made
    with ``backend="cpu:gloo,cuda:nccl"``: a host collective, no wait for the GPU), else q's device (NCCL)."""
    try:
        types = [d.type for d in (group if group is not None else dist.group.WORLD)._device_types]
    except Exception:  # a private property: when it is missing, q's device as before
        types = []
    if "cpu" in types:
        return torch.device("cpu")
    if isinstance(q, torch.Tensor) and (not types or q.device.type in types):
        return q.device
    if not types:
        return torch.device("cpu")
    mod = getattr(torch, types[0], None)  # q is no tensor (a local TypeError): the group's own device
    return torch.device(types[0], mod.current_device()) if hasattr(mod, "current_device") else torch.device("cpu")


def _encode(err: BaseException | None, sig: tuple[int, ...] | None, n_sig: int) -> list[int]:
    """[failed, kind, *signature, *message]: the message as little-endian int64 words."""
    if err is None:
        return [0, 0, *sig, *([0] * _MSG_WORDS)]
    kind = next((i + 1 for i, c in enumerate(_EXC_KINDS) if isinstance(err, c)), len(_EXC_KINDS) + 1)
    msg = str(err) if kind <= len(_EXC_KINDS) else f"{type(err).__name__}: {err}"
    raw = msg.encode("utf-8")[: 8 * _MSG_WORDS].ljust(8 * _MSG_WORDS, b"\0")
    return [1, kind, *([0] * n_sig), *struct.unpack(f"<{_MSG_WORDS}q", raw)]


def _decode_msg(words: list[int]) -> str:
    return struct.pack(f"<{_MSG_WORDS}q", *words).rstrip(b"\0").decode("utf-8", "ignore")


def _agree(group, W: int, q, err: BaseException | None, names: tuple[str, ...], sig: tuple[int, ...] | None,
           need: str = _NEED_CP) -> None:
    """Every rank, every call: one all-gather of a small int64 record, then the same decision on every rank.

    - a rank whose arguments failed the local checks (``err``) re-raises its own error; every other rank
      raises the same type (a RuntimeError for other exception types) with the first failing rank's message;
    - otherwise, if the signatures differ, a ValueError on every rank naming what differs.
    Reading the gathered record is a host sync: free for a CPU group, one device-to-host wait per call on an
    NCCL group (the CPU waits for the work already queued on the current stream; see docs/context_parallel.md).
    """
    n = len(names)
    mine = torch.tensor(_encode(err, sig, n), dtype=torch.int64, device=_agree_device(group, q))
    every = [torch.empty_like(mine) for _ in range(W)]
    dist.all_gather(every, mine, group=group)
    rows = torch.stack(every).cpu().tolist()
    failed = [j for j, row in enumerate(rows) if row[0]]
    if err is not None:
        raise err
    if failed:
        j = failed[0]
        kind = rows[j][1]
        cls = _EXC_KINDS[kind - 1] if 1 <= kind <= len(_EXC_KINDS) else RuntimeError
        who = f"rank {j}" if len(failed) == 1 else f"ranks {failed}"
        raise cls(f"{_decode_msg(rows[j][2 + n:])} [raised by the arguments of {who} of the context-parallel "
                  "group; every rank raises it, none is left waiting in a collective]")
    for j, name in enumerate(names):
        vals = [row[2 + j] for row in rows]
        if len(set(vals)) > 1:
            if name == "scale":  # carried as the float64's bits
                vals = [struct.unpack("<d", struct.pack("<q", v))[0] for v in vals]
            elif name in _SIG_DECODE:  # codes -> the argument's values
                vals = [_SIG_DECODE[name][v] if 0 <= v < len(_SIG_DECODE[name]) else v for v in vals]
            raise ValueError(f"{name} differs between the ranks of the group ({vals} on ranks 0..{W - 1}): {need}")


def _exchange(send: list[torch.Tensor], recv: list[torch.Tensor], cfg) -> list:
    """Send ``send`` to the next rank and receive ``recv`` from the previous one (asynchronous)."""
    ops = [dist.P2POp(dist.isend, x, cfg.send_peer, cfg.group) for x in send]
    ops += [dist.P2POp(dist.irecv, y, cfg.recv_peer, cfg.group) for y in recv]
    return dist.batch_isend_irecv(ops)


def _wait(reqs: list | None) -> None:
    for req in reqs or ():
        req.wait()


# ----------------------------------------------------------------------------- zigzag
def _zigzag_world(x: torch.Tensor, dim: int, group, name: str) -> tuple[int, int, int]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim: {dim} is out of range for a {x.dim()}-D tensor")
    _, W, r = _group_info(group)
    return dim % x.dim(), W, r


def zigzag_shard(x: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    """This rank's zigzag shard of the full tensor ``x`` along ``dim``: the sequence is cut into ``2W``
    equal chunks and rank r keeps chunks r and 2W−1−r, concatenated (causal load balancing).
    ``x.shape[dim]`` must be a multiple of 2W. No communication."""
    dim, W, r = _zigzag_world(x, dim, group, "x")
    if x.shape[dim] % (2 * W):
        raise ValueError(f"x: size {x.shape[dim]} of dim {dim} is not a multiple of 2 × world size = {2 * W}")
    c = x.shape[dim] // (2 * W)
    return torch.cat([x.narrow(dim, r * c, c), x.narrow(dim, (2 * W - 1 - r) * c, c)], dim)


_GATHER_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
                  torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_UNSHARD_DIMS = 8  # the shape entries zigzag_unshard's agreement record carries (more dims: their product)
_UNSHARD_NAMES = ("x_shard.dim()", "dim", "x_shard.dtype") + tuple(
    f"x_shard.shape[{i}]" for i in range(_UNSHARD_DIMS))


def zigzag_unshard(x_shard: torch.Tensor, dim: int, group=None, *, check: bool = True) -> torch.Tensor:
    """The full, naturally ordered tensor from every rank's zigzag shard (all-gather).
    ``x_shard.shape[dim]`` must be even, and shape, dtype and ``dim`` the same on every rank.

    ``check=True`` agrees on that over the group first (one small all-gather; on an NCCL-only group also a
    host sync, as in ``context_parallel_jvp_attention``): a bad argument on one rank raises on every rank,
    none is left waiting in the gather. ``check=False`` skips it (no host sync; ranks that disagree can
    then hang or gather garbage).

    Differentiable: the gradient of a shard is the sum over the ranks of their outputs' gradients at
    its chunks (all_reduce, as ``torch.distributed.nn.functional.all_gather`` does), so a loss that is
    the same on every rank must be divided by the group size. Forward-AD gathers the tangent."""
    _, W, _ = _group_info(group)
    try:
        d, W, _ = _zigzag_world(x_shard, dim, group, "x_shard")
        if x_shard.shape[d] % 2:
            raise ValueError(f"x_shard: size {x_shard.shape[d]} of dim {d} must be even (two zigzag chunks)")
        err = None
    except Exception as e:  # any local failure: the other ranks must not wait for this one
        err = e
    if W == 1 or not check:
        if err is not None:
            raise err
        return x_shard.clone() if W == 1 else _ZigzagGather.apply(x_shard, d, group, W)
    sig = None
    if err is None:
        shape = list(x_shard.shape[:_UNSHARD_DIMS]) + [-1] * (_UNSHARD_DIMS - x_shard.dim())
        if x_shard.dim() > _UNSHARD_DIMS:
            shape[-1] = math.prod(x_shard.shape[_UNSHARD_DIMS - 1 :])
        dt = _GATHER_DTYPES.index(x_shard.dtype) if x_shard.dtype in _GATHER_DTYPES else -1
        sig = (x_shard.dim(), d, dt, *shape)
    _agree(group, W, x_shard, err, _UNSHARD_NAMES, sig, need="zigzag_unshard needs the same shard shape, dtype "
           "and dim on every rank")
    return _ZigzagGather.apply(x_shard, d, group, W)


def _zigzag_gather(x: torch.Tensor, dim: int, group, W: int) -> torch.Tensor:
    xs = x.contiguous()
    parts = [torch.empty_like(xs) for _ in range(W)]
    dist.all_gather(parts, xs, group=group)
    halves = [p.chunk(2, dim) for p in parts]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim)


class _ZigzagGather(torch.autograd.Function):
    @staticmethod
    def forward(x, dim, group, W):
        return _zigzag_gather(x, dim, group, W)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.dim, ctx.group, ctx.W = inputs

    @staticmethod
    @first_order("context_parallel_jvp_attention")
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return zigzag_shard(g, ctx.dim, ctx.group), None, None, None

    @staticmethod
    def jvp(ctx, tx, *_):
        return _zigzag_gather(tx, ctx.dim, ctx.group, ctx.W)


def _reorder(x: torch.Tensor, dim: int, W: int, to_natural: bool) -> torch.Tensor:
    """Between the rank-major order of gathered zigzag shards (slot 2j holds chunk j, slot 2j+1 chunk
    2W−1−j) and the natural order of the 2W chunks (slices and one cat: no index tensor, no host copy)."""
    slot_chunk = [c for j in range(W) for c in (j, 2 * W - 1 - j)]
    if to_natural:
        order = sorted(range(2 * W), key=slot_chunk.__getitem__)  # the slot of chunk 0, 1, ...
    else:
        order = slot_chunk
    parts = x.chunk(2 * W, dim)
    return torch.cat([parts[i] for i in order], dim)


# ----------------------------------------------------------------------------- config
class _Cfg(NamedTuple):
    group: object
    W: int
    r: int
    send_peer: int
    recv_peer: int
    mode: str
    causal: bool
    zigzag: bool  # zigzag shards of a causal attention (non-causal attention ignores the order)
    scale: float
    lay: int
    t_dtype: int
    want_t: bool
    backend: str
    local: bool  # nothing to communicate: empty queries or no key anywhere (same on every rank)
    dual: bool  # forward-AD call: ``jvp`` hands back the computed tangents
    B: int = 0  # batch and query heads: the key mask's broadcast shape [B, Hq, keys]
    Hq: int = 0
    masked_bool: bool = False  # the key mask travels as uint8: view it back as bool


# ----------------------------------------------------------------------------- ring
def _plan(cfg: _Cfg, src: int, sq: int) -> tuple[slice, slice, bool] | None:
    """Which local query rows attend to which rows of the key shard of rank ``src``, and whether the
    block is the causal diagonal; None: nothing (a causal block entirely in the future)."""
    full = slice(None)
    if not cfg.causal:
        return full, full, False
    if src == cfg.r:
        return full, full, True  # contiguous: the diagonal; zigzag: chunk pairs (r, r) and (2W−1−r, 2W−1−r)
    if not cfg.zigzag:
        return (full, full, False) if src < cfg.r else None
    c = sq // 2
    if src < cfg.r:  # both local chunks see the key shard's early chunk, neither its late one
        return full, slice(0, c), False
    return slice(c, None), full, False  # only the late local chunk sees the key shard, all of it


def _rows(x: torch.Tensor | None, s: slice) -> torch.Tensor | None:
    return None if x is None else x[:, :, s]


def _ref64(cfg: _Cfg, q: torch.Tensor) -> bool:
    """fp32 blocks that the reference backend computes in fp64 (see _block_fwd)."""
    return cfg.backend == "reference" and q.dtype == torch.float32


def _block_fwd(q, k, v, tq, tk, tv, cfg: _Cfg, causal: bool, acc: torch.dtype, kb: torch.Tensor | None = None):
    """One key block on [B, H, S, D] views (``kb``: the block's key mask, [B, Hq, keys]), outputs in ``acc`` (fp32,
    fp64 for fp64 inputs), and the block's lse as an fp64 pair (hi, lo) in the 5th and 6th items: hi the lse the
    backend rounded, lo its low word where it writes one (``_needs_lo``; docs/jvp_attention.md), else 0. The
    reference backend (no low word without a mask, μ in its compute dtype) computes fp32 blocks in fp64: in fp32
    their rounding, carried through the merge weights and (μ_c − μ)·O_c, gave up to 19x the single-device error at
    logits ×30."""
    q_in = q
    if _ref64(cfg, q):
        q, k, v, tq, tk, tv = (None if x is None else x.double() for x in (q, k, v, tq, tk, tv))
        acc = torch.float64
    B, H, S, _ = q.shape
    o = q.new_empty((B, H, S, v.shape[-1]), dtype=acc)
    lse = q.new_empty((B, H, S), dtype=acc)
    to = torch.empty_like(o) if cfg.want_t else None
    mu = torch.empty_like(lse) if cfg.want_t else None
    lo = torch.empty_like(lse) if _needs_lo(q, kb is not None) else None
    _impl(cfg.backend).attn_fwd(q, k, v, tq, tk, tv, o, to, lse, mu, causal=causal, scale=cfg.scale, lse_lo=lo,
                                **_kb_kw(kb))
    hi = lse.to(torch.float64, copy=True)  # (not lse itself for fp64 inputs: the merge updates both apart)
    lo = torch.zeros_like(hi) if lo is None else torch.where(torch.isfinite(hi), lo.double(), 0.0)
    # (the reference's fp64 blocks of fp32 inputs: the running lse in fp32 as the kernels')
    return o, to, lse.to(_stat_dtype(q_in)), mu, hi, lo


def _merge(state, rows: slice, blk) -> None:
    """Fold a block's (O_c, Ȯ_c, lse_c, μ_c, hi_c, lo_c) into the running (O, T, lse, μ, hi, lo) on query rows
    ``rows``. lse is kept as the pair hi + lo (fp64): the weights depend only on the difference
    d = (hi − hi_c) + (lo − lo_c), so what a rounded lse cannot hold (ln of a block's weight next to a finfo.min
    bias) still sets them: w = 1 / (1 + e^−d), w_c = e^−d / (1 + e^−d) for d ≥ 0 (mirrored for d < 0), and the
    larger side's hi is kept, its lo raised by ln(1 + e^−|d|). The weights and μ are formed in fp64 (in fp32 they
    lose ~ulp(|lse|) at large logits: dlse 10x the single-device error in bf16); O and T are fp64 for fp32 inputs
    and for an fp32 tangent output (T − μ·O loses ~ulp(|μ·O|) in fp32), else fp32."""
    O, T, _L, M, H, Lo = (None if x is None else x[:, :, rows] for x in state)
    o, to, _lse, mu, h, lo = blk
    fa, fb = torch.isfinite(H), torch.isfinite(h)
    none = ~(fa | fb)  # rows that saw no key yet, nor in this block: both −inf, weights 0 (O, o are 0)
    d = torch.where(fa & fb, (H - torch.where(fb, h, 0.0)) + (Lo - lo), torch.where(fa, float("inf"), float("-inf")))
    d = torch.where(none, 0.0, d)
    e = torch.exp(-d.abs())  # in [0, 1]: one side's weight relative to the other's
    mine = d >= 0
    a = torch.where(none, 0.0, torch.where(mine, 1.0, e) / (1.0 + e))
    b = torch.where(none, 0.0, torch.where(mine, e, 1.0) / (1.0 + e))
    H.copy_(torch.where(mine, H, h))
    Lo.copy_(torch.where(none, 0.0, torch.where(mine, Lo, lo) + torch.log1p(e)))
    dt = O.dtype
    a_, b_ = a.to(dt).unsqueeze(-1), b.to(dt).unsqueeze(-1)
    O.mul_(a_).add_(o.to(dt) * b_)
    if T is not None:
        T.mul_(a_).add_((to.to(dt) + mu.to(dt).unsqueeze(-1) * o.to(dt)) * b_)
        M.mul_(a).add_(mu.double() * b)


def _kv_buffers(xs: list[torch.Tensor], W: int):
    """The local shard (sent first) and two receive buffers, alternated (a buffer is reused only
    after its previous transfer was waited for)."""
    first = [x.contiguous() for x in xs]
    spare = [[torch.empty_like(x) for x in first] for _ in range(min(2, W - 1))]
    return first, spare


def _wire(m: torch.Tensor | None) -> torch.Tensor | None:
    """A key mask as it travels: its compact [b, h, keys] form (b in {1, B}, h in {1, Hq}), contiguous, a bool one
    viewed as uint8 (the same bytes; what every backend sends)."""
    if m is None:
        return None
    m = m.contiguous()
    return m.view(torch.uint8) if m.dtype == torch.bool else m


def _unwire(m: torch.Tensor | None, cfg: _Cfg, keys: slice = slice(None)) -> torch.Tensor | None:
    """The key-mask block the kernels take: [B, Hq, keys] (a broadcast view, no copy)."""
    if m is None:
        return None
    m = m.view(torch.bool) if cfg.masked_bool else m
    return m.expand(cfg.B, cfg.Hq, m.shape[-1])[:, :, keys]


def _ring_fwd(q, k, v, tq, tk, tv, mk, cfg: _Cfg):
    lay, W, r = cfg.lay, cfg.W, cfg.r
    acc = _stat_dtype(q)
    qb, tqb = _bhsd(q, lay), _bhsd(tq, lay)
    sq = qb.shape[2]
    travel = [x for x in (k, v, tk, tv, mk) if x is not None]  # the key mask (compact) travels with its keys
    cur, spare = _kv_buffers(travel, W)
    state = None
    for i in range(W):
        src = (r - i) % W
        reqs = None
        if i < W - 1:
            nxt = spare[i % 2]
            reqs = _exchange(cur, nxt, cfg)
        plan = _plan(cfg, src, sq)
        if plan is not None:
            rows, keys, causal = plan
            kb, vb, *rest = (_bhsd(x, lay)[:, :, keys] for x in cur[:len(cur) - (mk is not None)])
            tkb = rest.pop(0) if tk is not None else None
            tvb = rest.pop(0) if tv is not None else None
            mb = _unwire(cur[-1], cfg, keys) if mk is not None else None
            blk = _block_fwd(_rows(qb, rows), kb, vb, _rows(tqb, rows), tkb, tvb, cfg, causal, acc, mb)
            if state is None:  # step 0: the own key shard, every query row
                o, to, lse, mu, hi, lo = blk
                if q.dtype == torch.float32 or cfg.t_dtype == 1:  # fp32 inputs, or an fp32 tangent output from
                    # bf16 / fp16 ones: O and T in fp64 too (see _merge)
                    o, to = (None if x is None else x.double() for x in (o, to))
                mu = None if mu is None else mu.double()
                state = (o, None if to is None else to.add_(mu.to(to.dtype).unsqueeze(-1) * o), lse, mu, hi, lo)
            else:
                _merge(state, rows, blk)
        _wait(reqs)
        if reqs is not None:
            cur = nxt
    O, T, L, M, H, Lo = state
    L.copy_(H + Lo)  # the merged lse rounded, and its low word for the block backward (_needs_lo): what that
    lo = None  # rounding lost, (hi − lse) + lo (0 on rows that see no key)
    if _needs_lo(q, mk is not None):
        lo = torch.where(torch.isfinite(H), (H - L.double()) + Lo, 0.0).to(L.dtype)
    out = q.new_empty(_out_shape(q, v, lay))
    _bhsd(out, lay).copy_(O)
    to = mu = None
    if cfg.want_t:
        to = out.new_empty(out.shape, dtype=torch.float32 if cfg.t_dtype == 1 else q.dtype)
        _bhsd(to, lay).copy_(T.sub_(M.to(T.dtype).unsqueeze(-1) * O))  # (an fp64 product only for an fp64 T)
        mu = M.to(L.dtype)
    return out, to, L, mu, lo


def _ring_bwd(do, q, k, v, o, lse, lo, mk, dlse, cfg: _Cfg):
    lay, W, r = cfg.lay, cfg.W, cfg.r
    acc = _stat_dtype(q)
    qb, ob, dob = _bhsd(q, lay), _bhsd(o, lay), _bhsd(do, lay)
    up = (lambda x: x) if not _ref64(cfg, q) else (lambda x: None if x is None else x.double())
    if _ref64(cfg, q):  # as the forward's blocks (_block_fwd), with the merged lse's low word (kept apart with a
        # key mask, where the reference subtracts it after S − lse; without one it takes lse alone)
        acc, lse, lo = torch.float64, lse.double(), None if lo is None else lo.double()
        if mk is None:
            lse, lo = lse + (0.0 if lo is None else lo), None
    sq = qb.shape[2]
    dq = torch.zeros(qb.shape, dtype=acc, device=q.device)
    cur, spare = _kv_buffers([k, v] if mk is None else [k, v, mk], W)
    B, Hkv, sk, _ = _bhsd(k, lay).shape
    # the dk, dv of the key shard being visited; they travel one step behind it, then home
    dkv = [[torch.empty((B, Hkv, sk, x.shape[-1]), dtype=acc, device=q.device) for x in (k, v)] for _ in range(2)]
    dkv_reqs = None
    impl = _impl(cfg.backend)
    for i in range(W):
        src = (r - i) % W
        reqs = None
        if i < W - 1:
            nxt = spare[i % 2]
            reqs = _exchange(cur, nxt, cfg)
        plan = _plan(cfg, src, sq)
        part = None
        if plan is not None:
            rows, keys, causal = plan
            kb, vb = (up(_bhsd(x, lay)[:, :, keys]) for x in cur[:2])
            mb = _unwire(cur[2], cfg, keys) if mk is not None else None
            qr = up(_rows(qb, rows))
            part = torch.empty(qr.shape, dtype=acc, device=q.device)
            dk_b = torch.empty(kb.shape, dtype=acc, device=q.device)
            dv_b = torch.empty(vb.shape, dtype=acc, device=q.device)
            impl.attn_bwd(up(_rows(dob, rows)), qr, kb, vb, up(_rows(ob, rows)), lse[:, :, rows],
                          None if dlse is None else dlse[:, :, rows], part, dk_b, dv_b,
                          causal=causal, scale=cfg.scale, lse_lo=None if lo is None else lo[:, :, rows],
                          **_kb_kw(mb))
            dq[:, :, rows] += part
        _wait(dkv_reqs)  # what the previous rank accumulated for the shard we hold now
        mine = dkv[i % 2]
        if i == 0:
            for x in mine:
                x.zero_()
        if part is not None:
            mine[0][:, :, keys] += dk_b
            mine[1][:, :, keys] += dv_b
        dkv_reqs = _exchange(mine, dkv[(i + 1) % 2], cfg)
        _wait(reqs)
        if reqs is not None:
            cur = nxt
    _wait(dkv_reqs)
    dk_own, dv_own = dkv[W % 2]
    grads = []
    for x, g in ((q, dq), (k, dk_own), (v, dv_own)):
        out = torch.empty_like(x)
        _bhsd(out, lay).copy_(g)
        grads.append(out)
    return grads


# ----------------------------------------------------------------------------- ulysses
def _a2a_one(x: torch.Tensor, cfg: _Cfg, scatter: int, gather: int) -> torch.Tensor:
    """Split ``x`` along ``scatter`` into W parts, part j to rank j; concatenate what arrives along ``gather``."""
    inp = torch.stack(x.chunk(cfg.W, scatter)).contiguous()
    out = torch.empty_like(inp)
    dist.all_to_all_single(out, inp, group=cfg.group)
    return torch.cat(out.unbind(0), gather)


def _a2a(xs: list[torch.Tensor | None], cfg: _Cfg, scatter: int, gather: int,
         pack: bool = True) -> list[torch.Tensor | None]:
    """``_a2a_one`` on several tensors, packed along the last dim into one all-to-all when they agree
    (``pack=False``: one each, so that no result is a view of another)."""
    present = [x for x in xs if x is not None]
    if not present:
        return list(xs)
    same = all(x.shape[:-1] == present[0].shape[:-1] and x.dtype == present[0].dtype for x in present)
    if pack and same and len(present) > 1:
        outs = list(_a2a_one(torch.cat(present, -1), cfg, scatter, gather).split([x.shape[-1] for x in present], -1))
    else:
        outs = [_a2a_one(x, cfg, scatter, gather) for x in present]
    it = iter(outs)
    return [None if x is None else next(it) for x in xs]


def _seq_to_heads(xs, cfg: _Cfg, sd: int, hd: int):
    ys = _a2a(xs, cfg, hd, sd)
    return [y if y is None or not cfg.zigzag else _reorder(y, sd, cfg.W, True) for y in ys]


def _heads_to_seq(xs, cfg: _Cfg, sd: int, hd: int, pack: bool = True):
    xs = [x if x is None or not cfg.zigzag else _reorder(x, sd, cfg.W, False) for x in xs]
    return _a2a(xs, cfg, sd, hd, pack)


def _dims(lay: int) -> tuple[int, int]:
    return (1, 2) if lay == 0 else (2, 1)  # (sequence dim, head dim) of a 4-D tensor; [B, H, S] stats: (2, 1)


def _ulysses_mask(mk: torch.Tensor | None, cfg: _Cfg) -> torch.Tensor | None:
    """The key mask of the full key sequence for this rank's heads: every rank's compact shard all-gathered along
    the keys (zigzag shards put back in the natural order), the per-head ones narrowed to the head chunk this rank
    computes (the all-to-all hands rank r chunk r of the heads), as a [B, Hq/W, Sk] view."""
    if mk is None:
        return None
    parts = [torch.empty_like(mk) for _ in range(cfg.W)]
    dist.all_gather(parts, mk, group=cfg.group)
    m = torch.cat(parts, 2)
    if cfg.zigzag:
        m = _reorder(m, 2, cfg.W, True)
    if m.shape[1] != 1:
        m = m.chunk(cfg.W, 1)[cfg.r]
    m = m.view(torch.bool) if cfg.masked_bool else m
    return m.expand(cfg.B, cfg.Hq // cfg.W, m.shape[-1])


def _ulysses_fwd(q, k, v, tq, tk, tv, mk, cfg: _Cfg):
    sd, hd = _dims(cfg.lay)
    # primals and tangents in separate all-to-alls: the saved qh, kh, vh must not keep the tangents alive
    (qh,) = _seq_to_heads([q], cfg, sd, hd)
    kh, vh = _seq_to_heads([k, v], cfg, sd, hd)
    (tqh,) = _seq_to_heads([tq], cfg, sd, hd)
    tkh, tvh = _seq_to_heads([tk, tv], cfg, sd, hd)
    mh = _ulysses_mask(mk, cfg)
    oh, toh, lseh, muh, loh = _fwd(qh, kh, vh, tqh, tkh, tvh, cfg.causal, cfg.scale, cfg.lay, cfg.want_t, cfg.t_dtype,
                                   cfg.backend, mh)
    if not cfg.want_t:
        toh = muh = None
    # the outputs must not be views of one another (forward-AD rejects tangents laid out unlike their view)
    o, to = _heads_to_seq([oh, toh], cfg, sd, hd, pack=False)
    lse, mu = _heads_to_seq([lseh, muh], cfg, 2, 1, pack=False)
    return (o, to, lse, mu), (qh, kh, vh, oh, lseh, loh, mh)


def _ulysses_bwd(do, dlse, saved, cfg: _Cfg):
    sd, hd = _dims(cfg.lay)
    qh, kh, vh, oh, lseh, loh, mh = saved
    (doh,) = _seq_to_heads([do], cfg, sd, hd)
    if dlse is None:  # this rank's loss does not use lse: zeros, so that every rank runs the same all-to-all
        B, h, S = lseh.shape
        dlse = lseh.new_zeros((B, h * cfg.W, S // cfg.W))
    (dlseh,) = _seq_to_heads([dlse], cfg, 2, 1)
    dqh, dkh, dvh = _bwd(doh, qh, kh, vh, oh, lseh, loh, dlseh, cfg.causal, cfg.scale, cfg.lay, cfg.backend, mh)
    (dq,) = _heads_to_seq([dqh], cfg, sd, hd)
    dk, dv = _heads_to_seq([dkh, dvh], cfg, sd, hd)
    return dq, dk, dv


# ----------------------------------------------------------------------------- autograd
class _Saved:
    """Carries what the backward needs from ``forward`` to ``setup_context`` (intermediates included)."""

    tensors: tuple = ()

    def __init__(self, levels: int = 0):
        self.levels, self.contexts = levels, 0  # as jvp_attention's _Box: the stop-gradient guard's bookkeeping


class _ContextParallel(torch.autograd.Function):
    """Forward: the whole context-parallel pass (tangents included, computed once); ``jvp`` hands back
    the Ȯ and μ it computed (forward-AD); ``backward``: the primal backward of the chosen mode."""

    @staticmethod
    def forward(q, k, v, tq, tk, tv, mk, cfg: _Cfg, box: _Saved):
        # mk: this rank's key mask in its compact wire form (_wire), no gradient
        if cfg.local:
            o, to, lse, mu, lo = _fwd(q, k, v, tq, tk, tv, cfg.causal, cfg.scale, cfg.lay, cfg.want_t, cfg.t_dtype,
                                      cfg.backend, _unwire(mk, cfg))
            box.tensors = (q, k, v, o, lse, lo, mk)
        elif cfg.mode == "ring":  # lo: the merged lse's low word (_needs_lo), for the block backward
            o, to, lse, mu, lo = _ring_fwd(q, k, v, tq, tk, tv, mk, cfg)
            box.tensors = (q, k, v, o, lse, lo, mk)
        else:
            (o, to, lse, mu), box.tensors = _ulysses_fwd(q, k, v, tq, tk, tv, mk, cfg)
        if not cfg.want_t:
            to, mu = o.new_empty(0), lse.new_empty(0)
        return o, to, lse, mu

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, _tq, _tk, _tv, _mk, cfg, box = inputs
        o, to, lse, mu = output
        ctx.save_for_backward(*box.tensors)  # every context (functorch makes one per grad / jvp level)
        ctx.cfg = cfg
        ctx.o_meta = (o.shape, o.dtype)
        box.contexts += 1
        guard = box.levels and box.contexts <= box.levels and not torch.compiler.is_compiling()
        # kept only where jvp will ask for them (in a guard context they are this node's differentiable outputs:
        # node -> ctx -> tangent -> node, a cycle the garbage collector cannot break)
        ctx.tangents = (to, mu) if cfg.dual and not guard else None
        ctx.anchor = None if box.levels else _anchor(q, k, v, _tq, _tk, _tv)
        if not guard:
            ctx.mark_non_differentiable(to, mu)
        ctx.set_materialize_grads(False)

    @staticmethod
    def jvp(ctx, *_input_tangents):
        to, mu = ctx.tangents
        if ctx.anchor is not None and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            to, mu = _NoGrad.apply(to, ctx.anchor), _NoGrad.apply(mu, ctx.anchor)
        return to, None, mu, None

    @staticmethod
    @first_order("context_parallel_jvp_attention")
    def backward(ctx, do, dto, dlse, dmu):
        if reached(dto, dmu):
            raise RuntimeError(_STOP_GRAD)
        cfg = ctx.cfg
        saved = ctx.saved_tensors
        if do is None:  # only lse reached the loss
            shape, dtype = ctx.o_meta
            do = saved[0].new_zeros(shape, dtype=dtype)
        elif do.stride(-1) != 1:
            do = do.contiguous()
        if cfg.local:
            *qkvol, mk = saved
            dq, dk, dv = _bwd(do, *qkvol, dlse, cfg.causal, cfg.scale, cfg.lay, cfg.backend, _unwire(mk, cfg))
        elif cfg.mode == "ring":
            dq, dk, dv = _ring_bwd(do, *saved, dlse, cfg)
        else:
            dq, dk, dv = _ulysses_bwd(do, dlse, saved, cfg)
        return dq, dk, dv, None, None, None, None, None, None


# ----------------------------------------------------------------------------- public
_SIG_NAMES = ("mode", "causal", "seq_layout", "layout", "q: batch", "q: local sequence length", "q: heads",
              "q: head dim", "k: local sequence length", "k: heads", "v: head dim", "tq (None or not)",
              "tk (None or not)", "tv (None or not)", "dtype", "tangent_dtype", "scale",
              "requires_grad (grad mode on and q, k, v or a tangent requiring grad)", "key_mask (None, or its dtype)",
              "key_mask: batch dim (1: broadcast)", "key_mask: head dim (1: broadcast)")
_MASK_CODES = (None, torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
_SIG_DECODE = {"mode": MODES, "causal": (False, True), "seq_layout": SEQ_LAYOUTS, "layout": tuple(LAYOUTS),
               "dtype": tuple(str(d) for d in _DTYPE_CODES), "tangent_dtype": ("the input dtype", "torch.float32"),
               "requires_grad (grad mode on and q, k, v or a tangent requiring grad)": (False, True),
               "key_mask (None, or its dtype)": tuple(str(d) for d in _MASK_CODES)}


@eager_only("context-parallel attention runs eagerly: point-to-point rings and all-to-alls (a graph break, "
            "never a wrong trace)")
def context_parallel_jvp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor | None = None,
                                   tk: torch.Tensor | None = None, tv: torch.Tensor | None = None, *, group=None,
                                   mode: str = "ring", causal: bool = False, scale: float | None = None,
                                   layout: str = "bshd", seq_layout: str = "contiguous", return_lse: bool = False,
                                   tangent_dtype: torch.dtype | None = None, key_mask: torch.Tensor | None = None,
                                   check: bool = True):
    """``jvp_attention`` with the sequence sharded over the ranks of ``group`` (context parallelism).

    Each rank passes its shard of the sequence: q ``[B, Sq/W, Hq, Dqk]``, k ``[B, Sk/W, Hkv, Dqk]``,
    v ``[B, Sk/W, Hkv, Dv]`` (``layout="bhsd"``: ``[B, H, S/W, D]``) and the tangents of the same shapes,
    and gets ``(o, to[, lse, dlse])`` for its own query rows of the global attention, exactly as
    ``fastdistill.jvp_attention`` on the full sequence would give them (same dtypes, same conventions:
    ``None`` tangents are zero, ``to``/``dlse`` are ``None`` without tangents and stop-gradient,
    rows that see no key give ``o = to = 0``, ``lse = −inf``, ``dlse = 0``). Works under plain
    autograd (dq, dk, dv of this rank's shards, gradients through ``o`` and ``lse``), with explicit
    tangents, and with forward-AD (``torch.func.jvp`` / dual tensors).

    Args:
        group: the context-parallel process group (``None``: the default group; with no initialised
            default group, a single rank). Every rank of it must make the same call, with shards of
            the same length and the same tangents present.
        mode: ``"ring"`` (K, V rotate with point-to-point transfers overlapped with compute; any head
            count) or ``"ulysses"`` (all-to-all sequence <-> heads; ``Hq`` and ``Hkv`` divisible by W).
        causal: global causal self-attention (q and k shards of equal length). Non-causal attention
            allows ``Sq ≠ Sk`` (cross-attention).
        seq_layout: ``"contiguous"`` (rank r holds chunk r) or ``"zigzag"`` (the sequence is cut into 2W
            chunks and rank r holds chunks r and 2W−1−r: balanced causal work; see ``zigzag_shard``).
        scale, layout, return_lse, tangent_dtype: as in ``jvp_attention``.
        key_mask: this rank's shard of a key mask (a key-padding mask, the same for every query row): the mask
            entries of the keys of its k shard, in the same order (``zigzag_shard(mask, dim=-1)`` for zigzag
            shards), in any form ``jvp_attention`` takes (``[Sk/W]``, ``[B, Hq, Sk/W]``, ``[B, Hq, 1, Sk/W]``, B and
            Hq may be 1; bool, True keeps the key, or an additive float bias). Every rank passes one or none, of the
            same dtype and broadcast shape. It travels with its keys (ring) or is all-gathered (ulysses), in its
            compact shape. A row whose keys are all masked, on every rank, gets ``o = to = 0``, ``lse = −inf``.
        check: before communicating, agree over the group that every rank's arguments are valid and the
            same (one small all-gather; on an NCCL-only group also a host sync). ``False`` skips it: an
            argument error then raises on its rank only and ranks that disagree can hang in a
            collective, but the call has no host sync (for training loops already known to be
            consistent). See docs/context_parallel.md.

    Example (``torchrun --nproc-per-node 4``)::

        q, k, v, tq, tk, tv = (zigzag_shard(x, dim=1) for x in (q_full, k_full, v_full, tq_full, tk_full, tv_full))
        o, to = context_parallel_jvp_attention(q, k, v, tq, tk, tv, causal=True, seq_layout="zigzag")
    """
    group, W, r = _group_info(group)
    try:
        check, check_err = check_bool("check", check), None
    except TypeError as e:  # carried through the agreement: a rank that raised alone would leave the others waiting
        check, check_err = True, e
    if W == 1:  # one rank: the single-device op (zigzag with W = 1 is the natural order)
        if check_err is not None:
            raise check_err
        check_choice("mode", mode, MODES)
        check_choice("seq_layout", seq_layout, SEQ_LAYOUTS)
        return jvp_attention(q, k, v, tq, tk, tv, causal=causal, scale=scale, layout=layout, return_lse=return_lse,
                             tangent_dtype=tangent_dtype, key_mask=key_mask)
    q, k, v, tq, tk, tv = autocast_cast(q, k, v, tq, tk, tv)  # as jvp_attention (and stock SDPA) under autocast
    # every local check before the first collective; a failure is carried to the other ranks by _agree
    try:
        if check_err is not None:
            raise check_err
        check_bool("return_lse", return_lse)
        a, err = _local_args(q, k, v, tq, tk, tv, W, mode, causal, scale, layout, seq_layout, tangent_dtype,
                             key_mask), None
    except Exception as e:  # any local failure: the other ranks must not wait for this one
        a, err = None, e
    if check:
        _agree(group, W, q, err, _SIG_NAMES, None if a is None else a.sig)
    elif err is not None:
        raise err
    cfg = _Cfg(group, W, r, _global(group, (r + 1) % W), _global(group, (r - 1) % W), mode, a.causal, a.zigzag,
               a.scale, a.lay, a.t_dtype, a.want_t, a.backend, local=a.empty, dual=a.dual, B=a.sig[4], Hq=a.sig[6],
               masked_bool=a.mask is not None and a.mask.dtype == torch.uint8)
    tq, tk, tv = a.tangents
    o, to, lse, mu = _ContextParallel.apply(q, k, v, tq, tk, tv, a.mask, cfg,
                                            _Saved(autograd_levels() if a.dual else 0))
    if not a.want_t:
        to = mu = None
    elif not a.dual or not autograd_levels():  # (dual tensors: the returned to / dlse, as jvp_attention's)
        to, mu = _guard(to, q, k, v, tq, tk, tv), _guard(mu, q, k, v, tq, tk, tv)
    return (o, to, lse, mu) if check_bool("return_lse", return_lse) else (o, to)


class _Args(NamedTuple):
    tangents: tuple
    dual: bool
    lay: int
    causal: bool
    zigzag: bool
    scale: float
    t_dtype: int
    want_t: bool
    backend: str
    empty: bool  # nothing to communicate: empty queries or no key anywhere (same on every rank)
    sig: tuple[int, ...]
    mask: torch.Tensor | None  # the key mask in its compact wire form (_wire)


def _local_args(q, k, v, tq, tk, tv, W: int, mode, causal, scale, layout, seq_layout, tangent_dtype,
                key_mask=None) -> _Args:
    """This rank's argument checks (no communication) and what the call needs; raises on bad arguments."""
    reject_dtensor("context_parallel_jvp_attention", {"q": q, "k": k, "v": v, "tq": tq, "tk": tk, "tv": tv},
                   hint=" (this rank's sequence shard, which context_parallel_jvp_attention expects)")
    check_choice("mode", mode, MODES)
    causal = check_bool("causal", causal)
    check_choice("seq_layout", seq_layout, SEQ_LAYOUTS)
    check_choice("layout", layout, LAYOUTS)
    lay = LAYOUTS[layout]
    limit = transform_limit()
    if limit is not None:
        raise TransformLimitError(f"context_parallel_jvp_attention: {limit}")
    duals = [fwAD.unpack_dual(x).tangent if isinstance(x, torch.Tensor) else None for x in (q, k, v)]
    dual = any(t is not None for t in duals)
    if dual and any(t is not None for t in (tq, tk, tv)):
        raise ValueError("tq, tk, tv: q/k/v already carry forward-AD tangents (torch.func.jvp or dual tensors); "
                         "pass the tangents one way, not both")
    if dual:
        tq, tk, tv = (t if t is None or t.numel() == 0 or t.stride(-1) == 1 else t.contiguous() for t in duals)
    Dqk, Dv = _check(q, k, v, tq, tk, tv, lay, tangent_dtype)
    if dual:
        check_dual_tangent_dtype(q, tangent_dtype)
    kb = _key_bias(key_mask, q, k, lay)  # [B, Hq, sk], 0 strides where it broadcasts
    mask = None
    if kb is not None:  # the compact form from the mask's shape, not its strides: ranks that pass masks of the same
        # shape send buffers of the same size (a broadcast view on one rank and a copy on another were a "differs"
        # error, and with check=False a size mismatch in the ring / all-gather)
        b, h = (1, 1) if key_mask.dim() == 1 else key_mask.shape[:2]
        mask = _wire(kb[:b, :h])
    sd = 1 if lay == 0 else 2
    hd = 3 - sd
    B, sq, Hq, sk, Hkv = q.shape[0], q.shape[sd], q.shape[hd], k.shape[sd], k.shape[hd]
    causal = bool(causal)
    if causal and sq != sk:
        raise ValueError(f"q, k: causal context-parallel attention is global causal self-attention and needs q and k "
                         f"shards of the same length, got {sq} query and {sk} key rows")
    zigzag = causal and seq_layout == "zigzag"  # non-causal attention does not depend on the order
    if zigzag and sq % 2:
        raise ValueError(f"q, k: zigzag shards hold two equal chunks, so their length must be even, got {sq}")
    if mode == "ulysses":
        for name, h in (("q", Hq), ("k", Hkv)):
            if h % W:
                raise ValueError(f"{name}: mode='ulysses' spreads the heads over the group: {h} heads are not "
                                 f"divisible by the group size {W} (use mode='ring')")
    scale = softmax_scale(scale, Dqk, q.dtype)
    t_dtype = 1 if tangent_dtype == torch.float32 and q.dtype != torch.float32 else 0
    sig = (MODES.index(mode), int(causal), SEQ_LAYOUTS.index(seq_layout), lay, B, sq, Hq, Dqk, sk, Hkv, Dv,
           int(tq is not None), int(tk is not None), int(tv is not None), _DTYPE_CODES[q.dtype], t_dtype,
           struct.unpack("<q", struct.pack("<d", scale))[0],  # the scale's bits: ranks must use the very same
           # a backward on some ranks only would leave the others waiting in the ring / all-to-all backward
           # (o requires grad when only a tangent does: its backward runs the collectives too)
           int(torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, tq, tk, tv))),
           _MASK_CODES.index(None if kb is None else kb.dtype), 0 if mask is None else mask.shape[0],
           0 if mask is None else mask.shape[1])
    backend = select_backend(OP, q, head_dims=(Dqk, Dv), grid_too_big=_grid_too_big(B, Hq))
    limit = transform_limit(backend)
    if limit is not None:
        raise TransformLimitError(f"context_parallel_jvp_attention: {limit}")
    return _Args((tq, tk, tv), dual, lay, causal, zigzag, scale, t_dtype, any(t is not None for t in (tq, tk, tv)),
                 backend, B * Hq * sq == 0 or sk == 0, sig, mask)
