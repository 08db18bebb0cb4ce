"""Drop-in JVP attention for unmodified models: serve ``torch.nn.functional.scaled_dot_product_attention``
with fastdistill while a ``jvp_sdpa()`` block (this thread) or ``patch_sdpa()`` (every thread) is active.

Inside, a call whose query, key or value carries a forward-AD tangent (``torch.func.jvp``,
``torch.autograd.forward_ad`` dual tensors) runs ``fastdistill.jvp_attention``: one fused pass for the
output and its tangent, a flash-style backward for the primal. Calls without a tangent go to stock
SDPA (``plain="sdpa"``, the default) or to fastdistill's plain attention (``plain="fastdistill"``).

A key mask is served: an ``attn_mask`` that broadcasts to ``[B, H, 1, S]`` (the same for every query row: size 1
or stride 0 along the query dimension after broadcasting to ``[..., H, L, S]``; ``[B, 1, 1, S]``, ``[B, H, 1, S]``,
``[S]``, ``[1, S]``...), bool or float, without a tangent and not requiring grad: the padding masks of text
conditioning (Sana, LTX-Video, Qwen-Image, HunyuanVideo, Lumina 2 cross / joint attention) and of padded batches.
It reaches the kernels as a view with the caller's strides (a broadcast mask is never copied). A row whose every key
is masked gives 0 (o, tangent, gradient), as stock math SDPA does in torch 2.13 for bool and −inf masks; stock's
fused GPU kernels may give NaN there.

Arguments fastdistill cannot serve exactly fall back to stock SDPA with a one-time warning naming the
reason — never a silently different result:
- an ``attn_mask`` that varies along the query dimension (a causal-and-padding mask, a block mask), that carries
  a forward-AD tangent or requires grad (fastdistill gives the mask neither), a nested or DTensor mask; one stock
  SDPA refuses (a dtype other than bool, float32 or the query's; a shape that does not broadcast; together with
  ``is_causal=True``, which math SDPA rejects) goes to stock SDPA as is, which decides;
- ``dropout_p > 0``;
- ``is_causal=True`` with ``L != S``: SDPA aligns its causal mask top-left, fastdistill bottom-right;
- batch dims that broadcast between query and key/value (a single query head over several key/value
  heads too; one key/value head over several query heads is multi-query attention, served), nested
  tensors, mixed or unsupported dtypes;
- zero heads or an empty head dim;
- a ``scale`` subnormal in the compute dtype (float32; float64 for float64 inputs), which ``jvp_attention``
  refuses (it would keep a few bits or none; stock math SDPA multiplies q and k by √scale each);
- no fastdistill backend can run the inputs (e.g. head dim > 256 on the GPU kernels);
- torch.func transforms beyond one forward-mode level (``jvp`` of ``jvp``, ``jacfwd``, ``vmap`` with
  ``jvp``), or ``torch.func.grad`` around the kernel backends;
- keyword arguments this version does not know;
- under ``jvp_sdpa()``, calls without a tangent that save tensors inside a non-reentrant
  ``torch.utils.checkpoint`` region: the recomputation in backward runs outside the block (after it,
  or on autograd's device threads), where SDPA is stock, and must save what the forward saved.
  ``patch_sdpa(plain="fastdistill")`` serves them (it must stay active until backward).
A fallback call that carries a tangent runs stock SDPA's math backend (the only SDPA backend with
forward-mode AD), so it computes the same function as before the patch.

Under ``torch.autocast`` a served call runs in the autocast dtype, as stock SDPA does (it is on
autocast's lower-precision list; a float ``attn_mask`` is cast with q, k, v). The tangent output is
stop-gradient (``jvp_attention``'s contract): a loss that reaches it raises, as does a double backward
through a served call. If other code wraps SDPA over the patch, calls that come back through its wrapper
while fastdistill delegates reach the builtin SDPA (no recursion).

Under ``torch.compile`` the patched call traces into the graph (``fullgraph=True`` works: plain calls with
either ``plain`` choice, and fallbacks, also inside ``torch.func.jvp``; a call with a tangent that dynamo
traces is math attention in the graph, ``jvp_attention``'s forward-AD contract under compile); dynamo guards on
the activation state, so a graph compiled inside a block is not reused outside it. Traced fallbacks do
not warn (an eager call does, once per reason). Enter the block outside the compiled function: dynamo does not trace the
context manager itself (``fullgraph=True`` raises "Unsupported context manager"; without it, a graph
break). ``sdpa_stats()`` counts eager calls only.

Options of a type stock SDPA's argument parser judges (``is_causal`` / ``enable_gqa`` other than a bool, ``dropout_p``
or ``scale`` other than an int or a float, e.g. a string, None, a 0-d tensor scale) go to stock SDPA as they are: it
raises its TypeError naming the argument. A 0-d tensor ``scale`` (which stock SDPA accepts) in a call fastdistill
would serve (one with a tangent, or any under ``plain="fastdistill"``) falls back with the reason: fastdistill
takes the scale as a number (``float(scale)``; on a GPU reading it would synchronise).

Query/key/value with different head counts need ``enable_gqa=True``, exactly as in stock SDPA; without it
stock SDPA decides (it raises), except a single key/value head, which stock SDPA broadcasts to every query
head: served as multi-query attention (the same result). A GQA ratio that is not an integer goes to stock
SDPA too (which raises its own error).

Concurrent forward-mode AD (``torch.func.jvp`` in several threads at once) is not supported by PyTorch
(stock SDPA usually raises "invalid forward AD level" there); under the patch it can instead give a zero
tangent. Run JVPs from one thread per process. The patch replaces the attribute of
``torch.nn.functional``: code that bound the function itself at import time
(``from torch.nn.functional import scaled_dot_product_attention``) is not affected.
"""

from __future__ import annotations

import collections
import contextlib
import numbers
import threading
import warnings
from collections.abc import Iterator

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from fastdistill._backend import BackendUnavailableError
from fastdistill.ops._common import autocast_cast, check_choice, is_dtensor
from fastdistill.ops.jvp_attention import TransformLimitError, jvp_attention, subnormal_scale, transform_limit

PLAIN = ("sdpa", "fastdistill")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_lock = threading.RLock()
_tls = threading.local()
_state = {"installed": 0, "orig": None, "global": []}  # install refcount, replaced function, patch_sdpa() stack
_warned: set[str] = set()
_stats: collections.Counter = collections.Counter()


# ----------------------------------------------------------------------------- activation
def _stack() -> list:
    s = getattr(_tls, "stack", None)
    if s is None:
        s = _tls.stack = []
    return s


def _active_plain() -> str | None:
    """The ``plain`` option of the innermost active activation in this thread, or None if inactive."""
    s = _stack()
    if s:
        return s[-1]
    g = _state["global"]
    return g[-1] if g else None


def _install() -> None:
    with _lock:
        if _state["installed"] == 0:
            _state["orig"] = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = _sdpa
        _state["installed"] += 1


def _uninstall() -> None:
    with _lock:
        _state["installed"] -= 1
        if _state["installed"]:
            return
        if F.scaled_dot_product_attention is _sdpa:
            F.scaled_dot_product_attention = _state["orig"]
        else:  # someone wrapped us since: leave theirs; ours (inactive now) only delegates to the original
            warnings.warn("fastdistill: torch.nn.functional.scaled_dot_product_attention was replaced by other code "
                          "after fastdistill patched it; leaving that replacement in place", stacklevel=3)


def original_sdpa():
    """The SDPA function fastdistill replaced (stock ``scaled_dot_product_attention`` when not installed)."""
    if torch.compiler.is_compiling():  # dynamo cannot trace the lock (and the state only changes in eager code)
        return _state["orig"] if _state["installed"] else F.scaled_dot_product_attention
    with _lock:
        return _state["orig"] if _state["installed"] else F.scaled_dot_product_attention


@contextlib.contextmanager
def jvp_sdpa(*, plain: str = "sdpa") -> Iterator[None]:
    """Within the block, in this thread, ``F.scaled_dot_product_attention`` calls carrying a forward-AD tangent
    run fastdistill's fused JVP attention (module docstring). Nests; other threads are unaffected.

    Args:
        plain: calls without a tangent go to ``"sdpa"`` (stock, default) or ``"fastdistill"`` (plain attention
            through fastdistill's kernels).

    Example::

        with fastdistill.integrations.jvp_sdpa():
            F_x, dF_dt = torch.func.jvp(lambda x, t: model(x, t), (x_t, t), (dx_dt, dt_dt))
        loss = fastdistill.scm_tangent_loss(F_x, ...)   # F_x keeps its graph: backward as usual
    """
    check_choice("plain", plain, PLAIN)
    _install()
    _stack().append(plain)
    try:
        yield
    finally:
        _stack().pop()
        _uninstall()


def patch_sdpa(*, plain: str = "sdpa") -> None:
    """Serve SDPA with fastdistill in every thread until the matching ``unpatch_sdpa()`` (calls nest; the
    innermost ``plain`` wins). Prefer ``jvp_sdpa()``, which scopes the change to a block and a thread."""
    check_choice("plain", plain, PLAIN)
    with _lock:
        _install()
        _state["global"].append(plain)


def unpatch_sdpa() -> None:
    """Undo the most recent ``patch_sdpa()``; the original SDPA is back once every patch is undone."""
    with _lock:
        if not _state["global"]:
            raise RuntimeError("unpatch_sdpa: SDPA is not patched (every patch_sdpa() was already undone)")
        _state["global"].pop()
        _uninstall()


def sdpa_stats(reset: bool = False) -> dict[str, int]:
    """Counts of how patched SDPA calls were served: ``"jvp"`` (fused JVP), ``"plain"`` (fastdistill, no
    tangent), ``"stock"`` (stock SDPA by ``plain="sdpa"``), ``"fallback: <reason>"``."""
    with _lock:
        out = dict(_stats)
        if reset:
            _stats.clear()
        return out


# ----------------------------------------------------------------------------- the replacement
def _count(key: str) -> None:
    if torch.compiler.is_compiling():  # counted per eager call only (a compiled graph runs without Python)
        return
    with _lock:
        _stats[key] += 1


def _has_tangent(x: torch.Tensor) -> bool:
    return fwAD.unpack_dual(x).tangent is not None


_NO_MASK_ADVICE = ("a batch without padding needs no mask: give the model none (attention_mask=None in transformers, "
                   "which also drops an all-ones one; encoder_attention_mask=None in diffusers)")


def _why_not(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, extra) -> str | None:
    if extra:
        return f"keyword argument(s) {sorted(extra)} unknown to fastdistill"
    if dropout_p > 0:
        return "dropout_p > 0 (fastdistill has no attention dropout)"
    if any(x.is_nested for x in (q, k, v)):
        return "nested tensors"
    if any(is_dtensor(x) for x in (q, k, v)):
        return "DTensor inputs (stock SDPA has their sharding rules)"
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype} (needs one of float16, bfloat16, float32, float64 for all)"
    if q.dim() < 3 or k.dim() != q.dim() or v.dim() != q.dim():
        return f"ranks {q.dim()}/{k.dim()}/{v.dim()} (needs the same rank >= 3 for query, key, value)"
    lead = 2 if q.dim() == 3 else 3  # [N, L, E] or [..., H, L, E]: the batch dims must match exactly
    if q.shape[:-lead] != k.shape[:-lead] or k.shape[:-1] != v.shape[:-1]:
        return "batch dims broadcast between query and key/value"
    if (q.dim() >= 4 and 0 in (q.shape[-3], k.shape[-3])) or q.shape[-1] == 0 or v.shape[-1] == 0:
        return "zero heads or an empty head dim"
    if q.dim() >= 4 and q.shape[-3] == 1 and k.shape[-3] > 1 and not enable_gqa:
        return "a single query head broadcast over several key/value heads (stock SDPA's batch broadcasting)"
    if is_causal and q.shape[-2] != k.shape[-2]:
        return ("is_causal=True with L != S (stock SDPA aligns the causal mask top-left, fastdistill bottom-right)")
    return None if attn_mask is None else _mask_why_not(attn_mask)


def _mask_why_not(m) -> str | None:
    """Why an attn_mask (of a call whose query, key, value fastdistill serves) cannot be served as a key mask, before
    its shape is looked at (``_key_mask``)."""
    if not isinstance(m, torch.Tensor):
        return None  # (stock SDPA's error)
    if m.is_nested or is_dtensor(m):
        return "attn_mask is a nested tensor or a DTensor (stock SDPA has their rules)"
    if m.dtype != torch.bool and m.requires_grad:
        return "attn_mask requires grad (fastdistill gives the mask no gradient; stock SDPA does)"
    if m.dtype != torch.bool and _has_tangent(m):
        return "attn_mask carries a forward-AD tangent (fastdistill's mask has none; stock math SDPA differentiates it)"
    return None


def _mask_stock_decides(m, q, k, is_causal) -> bool:
    """An attn_mask stock SDPA refuses (or broadcasts the output by): its own error or result, not fastdistill's."""
    if not isinstance(m, torch.Tensor) or is_causal:  # (math SDPA refuses attn_mask with is_causal=True)
        return True
    if m.dtype != torch.bool and m.dtype not in (torch.float32, q.dtype):
        return True
    if m.device != q.device:
        return True
    target = (*q.shape[:-1], k.shape[-2])
    try:
        return tuple(torch.broadcast_shapes(m.shape, target)) != target
    except RuntimeError:
        return True


def _key_mask(m, q, k) -> tuple[torch.Tensor | None, str | None]:
    """(the attn_mask as jvp_attention's ``key_mask`` [B, H, S] for the [B, H, L, E] view of ``q`` (``_heads4``), None)
    or (None, why not): it must not vary along the query dimension (size 1, or stride 0 once broadcast)."""
    full = m.expand(*q.shape[:-1], k.shape[-2])  # (a view; broadcastable: _mask_stock_decides)
    if full.shape[-2] != 1 and full.stride(-2) != 0:
        return None, ("attn_mask varies along the query dimension (fastdistill serves key masks, broadcastable to "
                      "[B, H, 1, S]: padding masks, and is_causal; " + _NO_MASK_ADVICE + ")")
    km = full.select(-2, 0)  # [..., H, S] or [N, S]
    if km.dim() == 2:
        km = km.unsqueeze(1)
    elif km.dim() > 3:
        km = km.reshape(-1, *km.shape[-2:])  # (a copy only where the batch dims cannot merge: [B, H, S] elements)
    return km, None


def _stock_decides(q, k, enable_gqa) -> bool:
    """Head counts that stock SDPA handles itself (its result or its error), not fastdistill: different head
    counts without enable_gqa (it broadcasts a single query head; else it raises), and a GQA ratio that is not
    an integer (it raises)."""
    if q.dim() < 4 or q.shape[-3] == k.shape[-3]:
        return False
    if not enable_gqa:
        return k.shape[-3] != 1  # one key/value head broadcast to every query head: MQA, served as such
    return q.shape[-3] % k.shape[-3] != 0


def _options_stock_decides(dropout_p, is_causal, scale, enable_gqa) -> bool:
    """Options of a type that fastdistill does not serve: stock SDPA's argument parser decides (it raises its
    TypeError naming the argument for a string, None, an int flag...; before, ``bool("no")`` ran a causal attention
    and ``float("0.5")`` a scale). Flags must be bools, ``dropout_p`` and ``scale`` real numbers (numpy's too;
    ``scale`` also None); anything else is stock SDPA's too (a 0-d tensor scale is a fallback, before this)."""
    flag = (bool, torch.SymBool)
    real = (numbers.Real, torch.SymInt, torch.SymFloat)
    return (not isinstance(is_causal, flag) or not isinstance(enable_gqa, flag)
            or not isinstance(dropout_p, real) or isinstance(dropout_p, bool)
            or not (scale is None or (isinstance(scale, real) and not isinstance(scale, bool))))


def _heads4(x: torch.Tensor) -> torch.Tensor:
    """[..., H, L, E] or [N, L, E] -> [B, H, L, E] (a view where strides allow)."""
    if x.dim() == 3:
        return x.unsqueeze(1)
    if x.dim() == 4:
        return x
    return x.reshape(-1, *x.shape[-3:])


def _stock(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, extra, tangent: bool):
    fn = original_sdpa()
    kw = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **extra)
    if enable_gqa:
        kw["enable_gqa"] = enable_gqa
    compiling = torch.compiler.is_compiling()
    if compiling and fn is _sdpa:  # (a wrapper over ours would call back: trace the builtin instead)
        fn = torch._C._nn.scaled_dot_product_attention
    # Other code may have wrapped SDPA after fastdistill (its wrapper calling ours): a call that comes back
    # to _sdpa while we delegate goes to the builtin instead of recursing. (Under torch.compile the flag is not
    # set: dynamo traces no thread-local writes; a wrapper traced there calls back into a graph, not Python.)
    outer = getattr(_tls, "in_stock", False)
    if not compiling:
        _tls.in_stock = True
    try:
        if not tangent:
            return fn(q, k, v, **kw)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):  # the only SDPA backend with forward-mode AD
            return fn(q, k, v, **kw)
    finally:
        if not compiling:
            _tls.in_stock = outer


def _builtin_sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, extra):
    kw = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **extra)
    if enable_gqa:
        kw["enable_gqa"] = enable_gqa
    return torch._C._nn.scaled_dot_product_attention(q, k, v, **kw)  # what F.scaled_dot_product_attention is


_CHECKPOINT_REASON = ("activation checkpointing under jvp_sdpa(): its recomputation in backward runs where the block "
                      "is not active (after it, or on autograd's device threads) and would run stock SDPA, so this "
                      "call does too; patch_sdpa(plain='fastdistill') serves checkpointed calls")


def _global_serves_plain() -> bool:
    """Whether patch_sdpa() (every thread) serves calls without a tangent with fastdistill."""
    g = _state["global"]
    return bool(g) and g[-1] == "fastdistill"


def _checkpointed(*xs) -> bool:
    """Whether this call saves tensors for backward inside a non-reentrant torch.utils.checkpoint region (its
    saved-tensor hooks are the innermost ones; the recomputation's hooks too)."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return False  # compiled: checkpoint is a traced region, recomputed inside the graph
    if not any(isinstance(x, torch.Tensor) and x.requires_grad for x in xs):
        return False
    try:
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(True)
    except (AttributeError, RuntimeError, TypeError):  # a torch without the query: treat as not checkpointed
        return False
    return bool(hooks) and getattr(hooks[0], "__module__", None) == "torch.utils.checkpoint"


def _fallback(reason: str, *args, tangent: bool):
    if not torch.compiler.is_compiling():  # (traced code: no warning, no count; the eager call warns)
        with _lock:
            first = reason not in _warned
            _warned.add(reason)
        if first:
            warnings.warn(f"fastdistill.jvp_sdpa: this scaled_dot_product_attention call runs stock SDPA: {reason}. "
                          "(warned once per reason)", stacklevel=3)
        _count(f"fallback: {reason}")
    return _stock(*args, tangent=tangent)


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, **extra):
    plain = _active_plain()
    args = (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, extra)
    if getattr(_tls, "in_stock", False):  # a wrapper installed over ours called back while we delegate to it
        return _builtin_sdpa(*args)
    if plain is None:  # installed but not active in this thread
        return _stock(*args, tangent=False)
    limit = transform_limit()
    if limit is not None:  # nested forward-mode / vmap with jvp: stock math SDPA has the rules
        return _fallback(limit, *args, tangent=True)
    tangent = any(isinstance(x, torch.Tensor) and _has_tangent(x) for x in (query, key, value))
    if not tangent and plain == "sdpa":  # (before the option checks: a plain call is stock SDPA's, whatever they are)
        _count("stock")
        return _stock(*args, tangent=False)
    if isinstance(scale, torch.Tensor) and scale.dim() == 0:  # stock SDPA takes it: its result, with the reason
        return _fallback("scale is a tensor (fastdistill's scale is a number; pass float(scale))", *args,
                         tangent=tangent)
    if _options_stock_decides(dropout_p, is_causal, scale, enable_gqa):
        return _stock(*args, tangent=tangent)
    # (a plain call here runs under jvp_sdpa(plain="fastdistill") or patch_sdpa(plain="fastdistill"); the latter
    # serves the recomputation in backward too)
    if not tangent and not _global_serves_plain() and _checkpointed(query, key, value):
        return _fallback(_CHECKPOINT_REASON, *args, tangent=False)
    query, key, value = autocast_cast(query, key, value)  # as stock SDPA (autocast's lower-precision list)
    if isinstance(attn_mask, torch.Tensor) and attn_mask.is_floating_point():
        (attn_mask,) = autocast_cast(attn_mask)  # autocast casts a float mask with them (an fp16 one of fp32 inputs)
    reason = _why_not(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, extra)
    if reason is None and scale is not None:
        # (stock math SDPA scales q and k by √scale each: a subnormal scale keeps its bits there)
        why = subnormal_scale(scale, query.dtype)
        reason = None if why is None else f"scale {why}"
    if reason is not None:
        return _fallback(reason, *args, tangent=tangent)
    if _stock_decides(query, key, enable_gqa) or (
            attn_mask is not None and _mask_stock_decides(attn_mask, query, key, is_causal)):
        return _stock(*args, tangent=tangent)
    mask = None
    if attn_mask is not None:
        mask, reason = _key_mask(attn_mask, query, key)
        if reason is not None:
            return _fallback(reason, *args, tangent=tangent)  # (jvp_attention casts a float mask under autocast)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (_heads4(query), _heads4(key), _heads4(value)))
    try:
        o = jvp_attention(q, k, v, causal=bool(is_causal), scale=scale, layout="bhsd", key_mask=mask)[0]
    except BackendUnavailableError as exc:
        return _fallback(f"no fastdistill backend can run these inputs ({exc})", *args, tangent=tangent)
    except TransformLimitError as exc:  # e.g. torch.func.grad around the kernel backends
        return _fallback(str(exc).removeprefix("jvp_attention: "), *args, tangent=tangent)
    _count("jvp" if tangent else "plain")
    return o.reshape(*query.shape[:-1], value.shape[-1])
