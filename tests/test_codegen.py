"""Performance guard between GPU runs: every kernel configuration the dispatcher can pick (score:
worst case 8 terms and a mask; kd; JVP attention in bf16/fp16 per head-dim bucket) compiles ahead of
time for sm_90a without register spills (fp32 attention, a correctness path, is reported by the
script but not gated). The same holds for sm_80 (Ampere / Ada), every family: JVP attention has its own
block configurations there (mma.sync keeps more accumulator state in registers than wgmma), gated for shared
memory too (≤ 99 KiB, what sm_86 / sm_89 allow). sm_80 once had 4-byte spills in the kd jsd divergence kernel
and the fp32 top-k gradient kernels, and sm_90a in the kd top-k gradient, while row constants were held across
their loops; the gate keeps them out.
Runs ``benchmarks/triton_codegen.py`` in a subprocess (it needs real JIT functions, so
TRITON_INTERPRET is removed from its environment); the same script prints the full report."""

import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "triton_codegen.py")


def test_no_spills_sm90a():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, SCRIPT, "--arch", "90", "--gated-only"], capture_output=True, text=True,
                       env=env, timeout=900)
    report = r.stdout + r.stderr
    assert "stats op=0" in r.stdout and "attn fwd jvp   bf16 D128/128" in r.stdout, f"codegen report missing:\n{report}"
    assert r.returncode == 0, f"a configuration spills registers (or failed to compile):\n{report}"
    assert "SPILLS" not in r.stdout


def test_no_spills_sm80_attention_fits_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, SCRIPT, "--arch", "80", "--gated-only"],
                       capture_output=True, text=True, env=env, timeout=900)
    report = r.stdout + r.stderr
    for row in ("stats op=0", "kd div   div=2 fp16", "kd grad  div=2 fp32 top-k", "attn fwd plain bf16 D128/128"):
        assert row in r.stdout, f"codegen report missing {row!r}:\n{report}"
    assert r.returncode == 0 and "SPILLS" not in r.stdout, f"a configuration spills on sm_80:\n{report}"
    smem = [int(line.split()[-1]) for line in r.stdout.splitlines() if line.startswith("attn ")]
    assert smem and max(smem) <= 99 * 1024, f"shared memory above 99 KiB on sm_80:\n{report}"


def test_attention_fp32_fits_shared_memory_sm80():
    """fp32 attention (not gated for spills) must still launch: at head dim 256 the sm_80 configuration is
    the smallest; at head dims 65-128 (padded to 128) the float64 logit operands take 96 KiB of the 99 KiB
    that sm_86 / sm_89 give (benchmarks/triton_codegen.py; smaller head dims need less: 60 KiB at 64/128)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, SCRIPT, "--arch", "80", "--family", "attn", "--only",
                        "fp32 D(128|256)/"], capture_output=True, text=True, env=env, timeout=900)
    report = r.stdout + r.stderr
    for row in ("attn dkdv fp32 D256/256", "attn fwd 2pass fp32 D128/128", "attn dq   fp32 D128/64"):
        assert row in r.stdout, f"codegen report missing {row!r}:\n{report}"
    assert "SMEM" not in r.stdout and r.returncode == 0, f"fp32 needs more shared memory than sm_86 gives:\n{report}"


def test_attention_fp32_compiles_sm90a():
    """The fp32 kernels the dispatcher picks compile for sm_90a (fp32 spills are reported, not gated). Their
    float64 logits (kernels/jvp_attention.py, _logits) crashed LLVM's SLP vectorizer inside Triton 3.9 in the
    fused JVP pass at head dims 64-128 (an assertion that aborts the process, so a user's first fp32 call would
    kill it): fp32 takes two_pass, and this compiles its kernels at head dim 128 (all 40 fp32 configurations
    compiled under Triton 3.9 and 3.6 when this was written; the CPU suite's time keeps the test to one bucket)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, SCRIPT, "--arch", "90", "--family", "attn", "--only", "fp32 D128/"],
                       capture_output=True, text=True, env=env, timeout=900)
    report = r.stdout + r.stderr
    for row in ("attn fwd plain fp32 D128/128", "attn fwd 2pass fp32 D128/128", "attn dkdv fp32 D128/64",
                "attn dq   fp32 D128/128"):
        assert row in r.stdout, f"codegen report missing {row!r}:\n{report}"
    assert "attn fwd jvp   fp32" not in r.stdout, "fp32 must not take the fused pass"
    assert r.returncode == 0, f"an fp32 configuration failed to compile:\n{report}"
