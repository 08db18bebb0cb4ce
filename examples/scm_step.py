"""A continuous-time consistency distillation (sCM, TrigFlow) student step on a small DiT.

The model is ordinary PyTorch: patch embedding, adaLN-Zero blocks with self-attention and
cross-attention to a frozen text context, all through ``F.scaled_dot_product_attention``.
fastdistill enters in two places only:

1. ``with fastdistill.integrations.jvp_sdpa():`` around ``torch.func.jvp`` of the student, so every
   attention call runs the fused JVP kernel (one pass for output and tangent) instead of math
   SDPA. The text context carries no tangent, so the cross-attention gets ``tk = tv = None`` and
   skips those matmuls. The JVP's primal output keeps its graph: one forward serves both the
   tangent and the gradient (the MeanFlow / DMF pattern), no second student forward.
2. ``fastdistill.scm_tangent_loss`` for the sCM tail: the tangent g, its normalisation
   ĝ = g / (‖g‖ + c), the adaptive weighting by a learned log-variance, and the gradient −2ĝ
   written directly.

TrigFlow (Lu & Song, 2024): x_t = cos(t)·x0 + sin(t)·z with z ~ N(0, σ_d²), the network F takes
(x_t/σ_d, t) and the consistency function is f(x_t, t) = cos(t)·x_t − sin(t)·σ_d·F. With the
teacher's velocity dx_t/dt = σ_d·F_teacher(x_t/σ_d, t) and dF/dt the total derivative of the student
along the trajectory (a JVP with tangents ((dx_t/dt)/σ_d, 1)):

    g = cos(t)·df/dt = −cos²(t)·(σ_d·F − dx_t/dt) − r·cos(t)·sin(t)·(x_t + σ_d·dF/dt)

where r ramps from 0 to 1 over the warm-up. The loss per sample is
e^{−logvar(t)}·mean_j ‖F − sg(F) − sg(ĝ)‖² + logvar(t).

Run (CPU, seconds):      python examples/scm_step.py --steps 5
GPU, realistic size:     python examples/scm_step.py --preset wan-1.3b-like --steps 4 --bench \
                             --attn both --csv scm_step.csv --depth 8
(at 32k tokens the one-forward step keeps ~6 GiB of activations per block: all 30 blocks on one GPU need
``--checkpoint``, which runs rCM's two-forward schedule, or context parallelism over several GPUs)
``--attn math`` runs the same step with stock math SDPA (what users do today); ``--attn both`` runs
both and reports per-step time and peak memory side by side.

Context parallel over N GPUs (the video tokens split over the ranks; self-attention runs fastdistill's
ring or Ulysses JVP attention, cross-attention stays local; gradients summed over the group):
    torchrun --nproc-per-node N examples/scm_step.py --preset wan-1.3b-like --cp ring --bench
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import fastdistill
from fastdistill.integrations import jvp_sdpa, sdpa_stats


@dataclass
class Preset:
    hidden: int
    heads: int
    depth: int
    mlp: int
    channels: int
    frames: int
    height: int
    width: int
    patch: int
    text_len: int
    text_dim: int
    batch: int


PRESETS = {
    # seconds on a CPU
    "toy": Preset(hidden=64, heads=4, depth=2, mlp=128, channels=4, frames=2, height=8, width=8, patch=2,
                  text_len=6, text_dim=32, batch=2),
    # Wan2.1-1.3B's transformer widths (1536 hidden, 12 heads of 128, 30 blocks, FFN 8960, 16 latent channels,
    # 512 text tokens of 4096) at 21 x 60 x 104 latents with 1x2x2 patches: 32,760 video tokens
    "wan-1.3b-like": Preset(hidden=1536, heads=12, depth=30, mlp=8960, channels=16, frames=21, height=60, width=104,
                            patch=2, text_len=512, text_dim=4096, batch=1),
}


# ----------------------------------------------------------------------------- the model (plain PyTorch)
def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of the TrigFlow time t ∈ [0, π/2] (scaled to ~[0, 1000] like a DiT's)."""
    half = dim // 2
    dt = torch.float64 if t.dtype == torch.float64 else torch.float32
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=dt) / half)
    args = (1000.0 * 2 / math.pi) * t.to(dt)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


@dataclass
class ContextParallel:
    """The sequence (video tokens) is split over ``group``; self-attention runs ring or Ulysses attention."""

    group: object
    mode: str  # "ring" | "ulysses"
    rank: int
    world: int


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, ctx_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(ctx_dim or dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.cp: ContextParallel | None = None

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = x.shape
        if ctx is None and self.cp is not None:  # self-attention over the token shards of every rank
            from fastdistill.distributed import context_parallel_jvp_attention

            q = self.q(x).view(B, N, self.heads, -1)
            k, v = self.kv(x).view(B, N, 2, self.heads, -1).unbind(2)
            o = context_parallel_jvp_attention(q, k, v, group=self.cp.group, mode=self.cp.mode)[0]
            return self.out(o.reshape(B, N, D))
        ctx = x if ctx is None else ctx  # cross-attention: the text context is whole on every rank
        q = self.q(x).view(B, N, self.heads, -1).transpose(1, 2)
        k, v = self.kv(ctx).view(B, ctx.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)  # what diffusers / Wan call: nothing fastdistill-specific
        return self.out(o.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    """adaLN-Zero DiT block: self-attention, cross-attention to the text, MLP."""

    def __init__(self, dim: int, heads: int, mlp: int, text_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.cross = Attention(dim, heads, ctx_dim=dim)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, dim))
        self.ada = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x, c, text):
        s1, b1, g1, s2, b2, g2 = self.ada(F.silu(c))[:, None].chunk(6, dim=-1)
        x = x + g1 * self.attn(self.norm1(x) * (1 + s1) + b1)
        x = x + self.cross(self.norm2(x), text)
        return x + g2 * self.mlp(self.norm3(x) * (1 + s2) + b2)


class DiT(nn.Module):
    """F(x, t, text) on video latents [B, C, T, H, W] with 1 x p x p patches."""

    def __init__(self, p: Preset):
        super().__init__()
        self.p = p
        self.embed = nn.Conv3d(p.channels, p.hidden, kernel_size=(1, p.patch, p.patch), stride=(1, p.patch, p.patch))
        self.t_mlp = nn.Sequential(nn.Linear(256, p.hidden), nn.SiLU(), nn.Linear(p.hidden, p.hidden))
        self.text_proj = nn.Sequential(nn.Linear(p.text_dim, p.hidden), nn.GELU(approximate="tanh"),
                                       nn.Linear(p.hidden, p.hidden))
        self.blocks = nn.ModuleList(Block(p.hidden, p.heads, p.mlp, p.text_dim) for _ in range(p.depth))
        self.norm = nn.LayerNorm(p.hidden, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Linear(p.hidden, 2 * p.hidden)
        self.head = nn.Linear(p.hidden, p.channels * p.patch * p.patch)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    cp: ContextParallel | None = None
    checkpoint: bool = False  # activation checkpointing per block (grad forwards only; scm_step's two-forward)

    def set_context_parallel(self, cp: ContextParallel | None) -> None:
        self.cp = cp
        for blk in self.blocks:
            blk.attn.cp = cp

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        p = self.p
        B, C, T, H, W = x.shape
        h = self.embed(x).flatten(2).transpose(1, 2)  # [B, T·H/p·W/p, hidden]
        if self.cp is not None:  # this rank's contiguous share of the tokens
            if h.shape[1] % self.cp.world:
                raise ValueError(f"context parallel: {h.shape[1]} tokens do not split over {self.cp.world} ranks")
            h = h.chunk(self.cp.world, dim=1)[self.cp.rank]
        c = self.t_mlp(timestep_embedding(t, 256).to(h.dtype))
        ctx = self.text_proj(text)
        for blk in self.blocks:
            if self.checkpoint and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(blk, h, c, ctx, use_reentrant=False)
            else:
                h = blk(h, c, ctx)
        shift, scale = self.ada(F.silu(c))[:, None].chunk(2, dim=-1)
        h = self.head(self.norm(h) * (1 + scale) + shift)  # [B, N, C·p·p]
        if self.cp is not None:
            h = _GatherTokens.apply(h, self.cp)
        h = h.view(B, T, H // p.patch, W // p.patch, C, p.patch, p.patch)
        return h.permute(0, 4, 1, 2, 5, 3, 6).reshape(B, C, T, H, W)


class _GatherTokens(torch.autograd.Function):
    """All-gather the token shards (dim 1), with forward-AD (the tangent is gathered the same way).

    Every rank then computes the same loss on the whole output, so the gradient of a rank's shard is
    its slice of that loss's gradient: the backward needs no communication."""

    @staticmethod
    def forward(x, cp):
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(cp.world)]
        dist.all_gather(parts, x.contiguous(), group=cp.group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.cp = inputs[1]

    @staticmethod
    def backward(ctx, g):
        return g.chunk(ctx.cp.world, dim=1)[ctx.cp.rank], None

    @staticmethod
    def jvp(ctx, tx, _):
        return _GatherTokens.forward(tx, ctx.cp)


class LogVar(nn.Module):
    """The adaptive weighting network logvar(t) (sCM's w(t), with logvar = −w)."""

    def __init__(self, dim: int = 128):
        super().__init__()
        self.lin = nn.Linear(dim, 1)
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.lin(timestep_embedding(t, self.dim).to(self.lin.weight.dtype)).sum(-1)  # [B] (not a view: FSDP2)


# ----------------------------------------------------------------------------- the sCM step
@dataclass
class SCMConfig:
    sigma_d: float = 0.5
    p_mean: float = -1.0
    p_std: float = 1.4
    warmup_steps: int = 1000
    tangent_c: float = 0.1


def sample_t(B: int, cfg: SCMConfig, device, gen=None, dtype=torch.float32) -> torch.Tensor:
    """TrigFlow time from a log-normal proposal of σ/σ_d: t = arctan(e^{P_mean + P_std·n} / σ_d)."""
    n = torch.randn(B, device=device, generator=gen, dtype=dtype)
    return torch.atan(torch.exp(cfg.p_mean + cfg.p_std * n) / cfg.sigma_d)


def grad_scaled(x: torch.Tensor, s: float) -> torch.Tensor:
    """``x`` itself (bit for bit: sg(x) + 0), with its gradient multiplied by ``s``."""
    return x.detach() + (x - x.detach()) * s


def scm_step(student, teacher, logvar_net, opt, x0, text, step: int, cfg: SCMConfig, attn: str = "fastdistill",
             gen=None, fsdp: bool = False, schedule: str = "one-forward") -> dict:
    """One student update. ``attn``: "fastdistill" (fused JVP attention) or "math" (stock math SDPA).

    ``schedule``: "one-forward" — ``torch.func.jvp`` with grad enabled, its primal output keeps the graph (one
    student forward; the graph holds the tangent computation's activations too, about twice a plain
    forward's). "two-forward" (rCM's schedule) — the JVP under ``no_grad`` (it saves nothing), then a plain
    student forward for the gradient: one more forward, activations of a plain forward only, and compatible
    with activation checkpointing (``student.checkpoint = True``), which the one-forward JVP is not. Both give
    the same update.

    With context parallelism (``student.cp`` set; every rank passes the same x0, text and generator
    state), each rank runs its token shard and computes the whole loss (the tangent normalisation spans all
    tokens of a sample; logvar(t) is whole on every rank): a rank's student gradients are its tokens' share,
    and the update needs their SUM over the group. By default they are all-reduced (SUM) here. ``fsdp``: the
    student and logvar_net are FSDP2-sharded over the group (``shard_fsdp2``), whose gradient reduction
    AVERAGES over its ranks, so the loss is scaled by the group size W before backward. logvar_net's
    gradients are whole on every rank (the loss is): the average of W equal copies leaves them W times too
    large, so the gradient reaching logvar(t) is divided by W on its way back (its value is unchanged)."""
    B = x0.shape[0]
    sd = cfg.sigma_d
    t = sample_t(B, cfg, x0.device, gen, torch.float64 if x0.dtype == torch.float64 else torch.float32)
    z = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=gen) * sd
    bc = lambda s: s.view(B, *([1] * (x0.dim() - 1))).to(x0.dtype)
    cos_t, sin_t = torch.cos(t), torch.sin(t)
    x_t = bc(cos_t) * x0 + bc(sin_t) * z
    with torch.no_grad():  # the teacher's velocity along the PF-ODE
        dxt_dt = sd * teacher(x_t / sd, t, text)

    def f(x_in, t_in):
        return student(x_in, t_in, text)

    ctx = jvp_sdpa() if attn == "fastdistill" else _math_sdpa()
    if schedule == "one-forward":
        with ctx:  # one forward: F keeps its graph, dF/dt is its stop-gradient tangent
            Fx, dF_dt = torch.func.jvp(f, (x_t / sd, t), (dxt_dt / sd, torch.ones_like(t)))
    elif schedule == "two-forward":
        with ctx, torch.no_grad():  # the tangent only
            _, dF_dt = torch.func.jvp(f, (x_t / sd, t), (dxt_dt / sd, torch.ones_like(t)))
        Fx = f(x_t / sd, t)  # the gradient forward: stock SDPA (plain attention needs no fastdistill)
    else:
        raise ValueError(f"schedule: expected 'one-forward' or 'two-forward', got {schedule!r}")
    r = min(1.0, step / max(cfg.warmup_steps, 1))
    # g = −cos²·(σ_d F − dx_t/dt) − r·cos·sin·(x_t + σ_d dF/dt), as f_coeff·sg(F) + Σ coeffs·terms
    coeffs = torch.stack([cos_t**2, -r * cos_t * sin_t, -r * sd * cos_t * sin_t], dim=1)
    f_coeff = -sd * cos_t**2
    logvar = logvar_net(t)
    if fsdp and student.cp is not None:  # see the docstring: loss × W, logvar's gradient ÷ W
        logvar = grad_scaled(logvar, 1.0 / student.cp.world)
    loss = fastdistill.scm_tangent_loss(Fx, [dxt_dt, x_t, dF_dt.detach()], coeffs, f_coeff=f_coeff,
                                        c=cfg.tangent_c, logvar=logvar, sample_reduction="mean")
    opt.zero_grad(set_to_none=True)
    (loss * student.cp.world if fsdp and student.cp is not None else loss).backward()
    if student.cp is not None and not fsdp:
        import torch.distributed as dist

        for prm in student.parameters():
            if prm.grad is not None:
                dist.all_reduce(prm.grad, group=student.cp.group)
    opt.step()
    return {"loss": float(loss.detach()), "r": r}


@contextlib.contextmanager
def _math_sdpa():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # the only stock SDPA backend with forward-mode AD
        yield


# ----------------------------------------------------------------------------- driver
def build(preset: Preset, device, dtype, seed: int = 0, optimizer=torch.optim.Adam):
    """Teacher, student (a copy of the teacher), logvar_net and ``optimizer`` (lr 1e-4) over the trainable ones."""
    torch.manual_seed(seed)
    with torch.device(device):  # initialised in place (wan-1.3b-like: 1.4B parameters, no CPU copy to move)
        teacher = DiT(preset).to(dtype=dtype).eval().requires_grad_(False)
    for blk in teacher.blocks:  # a non-trivial "pretrained" teacher: randomise the zero-initialised gates
        nn.init.normal_(blk.ada.weight, std=0.02)
    nn.init.normal_(teacher.ada.weight, std=0.02)
    student = copy.deepcopy(teacher).train().requires_grad_(True)  # sCM initialises the student from the teacher
    with torch.device(device):
        logvar_net = LogVar().to(dtype=dtype)
    opt = optimizer(list(student.parameters()) + list(logvar_net.parameters()), lr=1e-4)
    return student, teacher, logvar_net, opt


def shard_fsdp2(student, logvar_net, cp: ContextParallel, device, lr: float = 1e-4, optimizer=torch.optim.Adam):
    """FSDP2 over the context-parallel ranks: each student block, the student root and logvar_net; returns the
    optimizer over the sharded parameters (``fully_shard`` replaces them). Pass ``fsdp=True`` to ``scm_step``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    mesh = DeviceMesh.from_group(cp.group or dist.group.WORLD, device.type)
    for blk in student.blocks:
        fully_shard(blk, mesh=mesh)
    fully_shard(student, mesh=mesh)
    fully_shard(logvar_net, mesh=mesh)
    return optimizer(list(student.parameters()) + list(logvar_net.parameters()), lr=lr)


def data(preset: Preset, device, dtype, gen=None):
    p = preset
    x0 = torch.randn(p.batch, p.channels, p.frames, p.height, p.width, device=device, dtype=dtype, generator=gen)
    text = torch.randn(p.batch, p.text_len, p.text_dim, device=device, dtype=dtype, generator=gen)
    return 0.5 * x0, text


def init_context_parallel(args) -> ContextParallel | None:
    """Under torchrun with ``--cp ring|ulysses``: the default process group is the context-parallel group
    (NCCL on GPUs, gloo on the CPU), one GPU per rank."""
    if not args.cp:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise SystemExit(f"--cp {args.cp}: run under torchrun, e.g. torchrun --nproc-per-node 2 "
                             f"examples/scm_step.py --cp {args.cp} (RANK / WORLD_SIZE are not set)")
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    if args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(args.device)
    return ContextParallel(group=None, mode=args.cp, rank=dist.get_rank(), world=dist.get_world_size())


def run(args) -> list[dict]:
    cp = init_context_parallel(args)
    if cp is not None and cp.rank != 0:
        args.quiet = True
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[args.dtype]
    preset = PRESETS[args.preset]
    if args.depth is not None:
        preset = dataclasses.replace(preset, depth=args.depth)
    tokens = preset.frames * (preset.height // preset.patch) * (preset.width // preset.patch)
    rows = []
    for attn in (["math", "fastdistill"] if args.attn == "both" else [args.attn]):
        student, teacher, logvar_net, opt = build(preset, device, dtype, seed=args.seed)
        student.set_context_parallel(cp)
        teacher.set_context_parallel(cp)
        student.checkpoint = args.checkpoint
        if args.fsdp:
            opt = shard_fsdp2(student, logvar_net, cp, device)
        gen = torch.Generator(device=device).manual_seed(args.seed)  # the same on every rank
        cfg = SCMConfig(warmup_steps=args.warmup)
        times, losses = [], []
        sdpa_stats(reset=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        status = "ok"
        for step in range(args.steps):
            x0, text = data(preset, device, dtype, gen)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            try:
                out = scm_step(student, teacher, logvar_net, opt, x0, text, step, cfg, attn=attn, gen=gen,
                               fsdp=args.fsdp, schedule=args.schedule)
            except torch.OutOfMemoryError:
                status = "out of memory"
                break
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
            losses.append(out["loss"])
            if not args.quiet:
                print(f"[{attn}] step {step}: loss {out['loss']:.5f} (r = {out['r']:.3f}) "
                      f"{1e3 * times[-1]:.1f} ms", flush=True)
        served = sdpa_stats()
        timed = times[1:] if len(times) > 1 else times  # the first step includes compilation
        dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        row = {
            "preset": args.preset, "depth": preset.depth, "attn": attn, "device": dev_name, "dtype": args.dtype,
            "tokens": tokens, "batch": preset.batch, "steps": len(times),
            "ms_per_step": round(1e3 * sum(timed) / len(timed), 2) if timed else float("nan"),
            "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda"
            else float("nan"),
            "final_loss": losses[-1] if losses else float("nan"), "status": status,
            "attn_calls": ";".join(f"{k}={v}" for k, v in sorted(served.items())),
            "context_parallel": f"{cp.mode} x {cp.world}" if cp is not None else "none",
            "schedule": args.schedule + (" + checkpoint" if args.checkpoint else ""),
        }
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=list(PRESETS), default="toy")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--depth", type=int, default=None, help="override the preset's number of blocks")
    ap.add_argument("--warmup", type=int, default=10, help="tangent warm-up steps (r: 0 -> 1)")
    ap.add_argument("--attn", choices=["fastdistill", "math", "both"], default="fastdistill")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp64"], default=None,
                    help="default: bf16 on CUDA, fp32 on the CPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bench", action="store_true", help="print a per-step time / peak memory table")
    ap.add_argument("--csv", default=None, help="append the table rows to this CSV")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--cp", choices=["ring", "ulysses"], default=None,
                    help="context parallel over the torchrun ranks (self-attention sharded by tokens)")
    ap.add_argument("--schedule", choices=["one-forward", "two-forward"], default=None,
                    help="one-forward: the JVP keeps the gradient graph (default); two-forward: JVP under no_grad, "
                         "then a gradient forward (rCM; the default with --checkpoint)")
    ap.add_argument("--checkpoint", action="store_true",
                    help="activation checkpointing per block (needs --schedule two-forward): the full "
                         "wan-1.3b-like preset on one GPU")
    ap.add_argument("--fsdp", action="store_true",
                    help="with --cp: FSDP2-shard the student over the context-parallel ranks (scm_step's fsdp)")
    args = ap.parse_args(argv)
    if args.schedule is None:
        args.schedule = "two-forward" if args.checkpoint else "one-forward"
    if args.checkpoint and args.schedule != "two-forward":
        print("error: --checkpoint needs --schedule two-forward (PyTorch's checkpoint cannot recompute a forward "
              "made under torch.func.jvp)", file=sys.stderr)
        return 2
    if args.fsdp and not args.cp:
        print("error: --fsdp shards over the context-parallel ranks: use it with --cp", file=sys.stderr)
        return 2
    if (args.fsdp or args.checkpoint) and tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (
            2, 13):
        print(f"error: --fsdp / --checkpoint need torch >= 2.13: torch.func.jvp through FSDP2 modules and through "
              f"non-reentrant checkpointing raises in PyTorch {torch.__version__} (docs/jvp_attention.md)",
              file=sys.stderr)
        return 2
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    if args.cp and args.attn != "fastdistill":
        print("error: --cp runs fastdistill's context-parallel attention: use --attn fastdistill", file=sys.stderr)
        return 2
    if args.preset != "toy" and not args.device.startswith("cuda"):
        print(f"error: --preset {args.preset} needs a GPU (it is ~32k tokens, 1.3B-like widths)", file=sys.stderr)
        return 2
    rows = run(args)
    if args.cp:
        import torch.distributed as dist

        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:  # rank 0 reports
            return 0
    if args.bench or args.csv:
        keys = ["preset", "attn", "device", "dtype", "tokens", "ms_per_step", "peak_mem_gb", "status", "attn_calls",
                "context_parallel"]
        print(" | ".join(keys))
        for r in rows:
            print(" | ".join(str(r[k]) for k in keys))
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)
    bad = [r for r in rows if not math.isfinite(r["final_loss"])]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
