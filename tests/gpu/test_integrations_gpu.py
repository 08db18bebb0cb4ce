"""GPU tier for the drop-in and the sCM example: ``jvp_sdpa()`` on unmodified transformers / diffusers
models in bf16 and fp32 through the Triton kernels, and examples/scm_step.py on the GPU.

Tolerance rule for whole models: the fused run's error against the fp64 math-SDPA run may be at most
2× (+ a small floor) the error of the same model run with stock math SDPA in the same dtype — the
non-attention layers contribute the same rounding to both.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastdistill.integrations import jvp_sdpa, sdpa_stats

pytestmark = pytest.mark.gpu
DEV = "cuda"
ROOT = pathlib.Path(__file__).resolve().parents[2]


def _err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _llama(dtype):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   attn_implementation="sdpa")
    return transformers.LlamaModel(cfg).to(DEV, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_llama_jvp_sdpa_tolerance_rule(dtype):
    m64 = _llama(torch.float64)
    m = _llama(dtype)
    x = torch.randn(2, 300, 256, device=DEV, dtype=torch.float64)
    tx = torch.randn_like(x)
    f64 = lambda e: m64(inputs_embeds=e).last_hidden_state
    f = lambda e: m(inputs_embeds=e).last_hidden_state
    with sdpa_kernel(SDPBackend.MATH):
        o64, t64 = torch.func.jvp(f64, (x,), (tx,))
        o_math, t_math = torch.func.jvp(f, (x.to(dtype),), (tx.to(dtype),))
    sdpa_stats(reset=True)
    with jvp_sdpa():
        o, t = torch.func.jvp(f, (x.to(dtype),), (tx.to(dtype),))
    assert sdpa_stats() == {"jvp": 2}, sdpa_stats()
    floor = 1e-3 if dtype == torch.bfloat16 else 1e-5
    assert _err(o, o64) <= 2 * _err(o_math, o64) + floor
    assert _err(t, t64) <= 2 * _err(t_math, t64) + floor


def test_scm_example_on_gpu_matches_math_sdpa():
    spec = importlib.util.spec_from_file_location("scm_step", ROOT / "examples" / "scm_step.py")
    ex = importlib.util.module_from_spec(spec)
    sys.modules["scm_step"] = ex
    spec.loader.exec_module(ex)
    preset = ex.PRESETS["toy"]
    cfg = ex.SCMConfig(warmup_steps=2)
    losses = {}
    for attn in ("math", "fastdistill"):
        student, teacher, logvar_net, opt = ex.build(preset, torch.device(DEV), torch.float32, seed=0)
        gen = torch.Generator(device=DEV).manual_seed(0)
        losses[attn] = [ex.scm_step(student, teacher, logvar_net, opt, *ex.data(preset, torch.device(DEV),
                                                                              torch.float32, gen),
                                    step, cfg, attn=attn, gen=gen)["loss"] for step in range(3)]
    for a, b in zip(losses["fastdistill"], losses["math"]):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), losses
