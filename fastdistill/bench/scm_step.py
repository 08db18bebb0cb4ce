"""Benchmark family "scm": one whole sCM student step of ``examples/scm_step.py`` (a DiT with self- and
cross-attention, JVP with ``torch.func.jvp``, ``scm_tangent_loss``, backward, Adam step), per-step time
and extra peak memory, with the attention served two ways:

    fastdistill  ``jvp_sdpa()``: the fused JVP attention kernel in every attention call
    math-sdpa    stock SDPA restricted to its math backend (the only SDPA backend with forward-mode AD:
                 what users run today)

Shape ``scm-wan-1.3b-like`` on a GPU: Wan2.1-1.3B widths (1536 hidden, 12 heads of 128) at ``GPU_DEPTH`` = 8
of its 30 blocks, 21×60×104 latents with 1×2×2 patches = 32,760 video tokens, 512 text tokens, batch 1,
bf16. Eight blocks, because the one-forward step (the JVP with the gradient graph kept) saves ~6 GiB of
activations per block at 32k tokens: 30 blocks would need ~190 GiB (an H200 has 141 GB) — a full-depth run
needs activation checkpointing, which the one-forward JVP pattern does not allow (docs: the rCM schedule).
The time per step scales with the depth (every block is the same work); the note says 8 of 30. On a CPU
the example's toy preset. The example is loaded from ``examples/`` of a source checkout (skipped with
the reason elsewhere). No error column: the example's tests check that both paths train identically.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import sys

import torch

from fastdistill.bench.runner import Case

GPU_DEPTH = 8  # blocks of the wan-1.3b-like preset in the GPU benchmark (see the module docstring)
EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "scm_step.py"


def _example():
    if not EXAMPLE.exists():
        return None, f"{EXAMPLE.name} not found: the scm family runs from a source checkout"
    spec = importlib.util.spec_from_file_location("scm_step", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["scm_step"] = mod  # its dataclasses look the module up there
    spec.loader.exec_module(mod)
    return mod, None


def cases(device: str, quick: bool) -> list[Case]:
    ex, why = _example()
    on_gpu = device.startswith("cuda")
    name = "scm-wan-1.3b-like" if on_gpu and not quick else "scm-toy"
    if ex is None:
        return [Case(shape=name, mode="full", providers={}, skipped={"fastdistill": why, "math-sdpa": why},
                     baseline="math-sdpa")]
    preset = ex.PRESETS["wan-1.3b-like" if name != "scm-toy" else "toy"]
    full_depth = preset.depth
    if name != "scm-toy":
        preset = dataclasses.replace(preset, depth=GPU_DEPTH)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    dev = torch.device(device)
    student, teacher, logvar_net, opt = ex.build(preset, dev, dtype, seed=0)
    gen = torch.Generator(device=dev).manual_seed(0)
    x0, text = ex.data(preset, dev, dtype, gen)
    cfg = ex.SCMConfig(warmup_steps=1)

    def step_of(attn: str):
        def step():
            return ex.scm_step(student, teacher, logvar_net, opt, x0, text, 1, cfg, attn=attn, gen=gen)["loss"]

        return step

    def reset():
        opt.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.empty_cache()

    tokens = preset.frames * (preset.height // preset.patch) * (preset.width // preset.patch)
    note = (f"{tokens} tokens, {preset.depth} of {full_depth} blocks, {str(dtype).removeprefix('torch.')}; "
            "ms per optimiser step")
    if name == "scm-toy":
        note = ("quick" if on_gpu else "cpu") + "-small-shape; " + note
    return [Case(shape=name, mode="full", providers={"fastdistill": step_of("fastdistill"),
                                                      "math-sdpa": step_of("math")},
                 reset=reset, baseline="math-sdpa", order=["fastdistill", "math-sdpa"], note=note)]
