"""The examples run end to end at toy size, and mean what they say.

examples/scm_step.py: the sCM step under ``jvp_sdpa()`` (fused JVP attention) must update the student
exactly as the same step under stock math SDPA does (float64), with every attention call served by
fastdistill.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
import torch

import fastdistill

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_scm_step_matches_math_sdpa_fp64():
    """Three sCM steps of the toy model, math SDPA against fastdistill in float64: the same losses and parameters.
    With SGD, which moves each parameter by lr times its gradient, so that a gradient error shows in proportion.
    (Adam, the example's default, normalises each component: its first step is ±lr whatever the gradient's scale,
    and it multiplies the float64 rounding of components near its eps by lr/eps = 1e4; with it the parameters
    differed by 2.6e-12 on an AVX-512 CPU, past the parameters' 1e-12 then, while the losses agreed to 1e-16.)"""
    ex = _load("scm_step")
    preset = ex.PRESETS["toy"]
    cfg = ex.SCMConfig(warmup_steps=2)
    params, losses = {}, {}
    for attn in ("math", "fastdistill"):
        student, teacher, logvar_net, opt = ex.build(preset, torch.device("cpu"), torch.float64, seed=0,
                                                     optimizer=torch.optim.SGD)
        gen = torch.Generator().manual_seed(0)
        ex.sdpa_stats(reset=True)
        losses[attn] = []
        for step in range(3):
            x0, text = ex.data(preset, torch.device("cpu"), torch.float64, gen)
            losses[attn].append(ex.scm_step(student, teacher, logvar_net, opt, x0, text, step, cfg, attn=attn,
                                            gen=gen)["loss"])
        params[attn] = [p.detach().clone() for p in student.parameters()]
        if attn == "fastdistill":
            # 3 steps x 2 blocks x (self + cross attention), every one fused
            assert ex.sdpa_stats() == {"jvp": 12}, ex.sdpa_stats()
    assert all(abs(a - b) <= 1e-10 * max(1.0, abs(b)) for a, b in zip(losses["fastdistill"], losses["math"])), losses
    moved = 0
    for a, b, p0 in zip(params["fastdistill"], params["math"], ex.build(preset, "cpu", torch.float64)[0].parameters()):
        # the steps themselves (up to 7.6e-7 here, on parameters of ~0.1): agreeing to 1e-8 of each
        assert torch.allclose(a - p0.detach(), b - p0.detach(), rtol=1e-8, atol=1e-18)
        moved += int(not torch.equal(b, p0.detach()))
    assert moved > 0, "the optimiser step changed nothing: the test would not see a wrong gradient"


def test_scm_step_cli_runs():
    ex = _load("scm_step")
    assert ex.main(["--steps", "2", "--attn", "both", "--quiet", "--device", "cpu"]) == 0


def test_scm_step_cp_outside_torchrun_says_how_to_launch(monkeypatch):
    """--cp without torchrun: a message naming torchrun (before: torch's raw env:// traceback, "environment variable
    RANK expected")."""
    ex = _load("scm_step")
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit, match=r"--cp ring: run under torchrun"):
        ex.main(["--steps", "1", "--cp", "ring", "--quiet", "--device", "cpu"])


def test_distill_llm_fused_trains_like_eager_and_learns(tmp_path):
    """examples/distill_llm.py: the fused-linear loss drives the same training trajectory as the eager
    full-logits loss (fp32, same data), the KD loss goes down, the plot and CSV are written."""
    pytest.importorskip("transformers")  # test-only extras (scripts/setup.sh installs them; the GPU image lacks them)
    pytest.importorskip("matplotlib")
    ex = _load("distill_llm")
    with fastdistill.use_backend("reference"):  # (under TRITON_INTERPRET=1 the interpreter would take minutes)
        _distill_llm(ex, tmp_path)


def _distill_llm(ex, tmp_path):
    png, table = tmp_path / "loss.png", tmp_path / "distill.csv"
    assert ex.main(["--steps", "3", "--loss", "both", "--quiet", "--device", "cpu", "--plot", str(png),
                    "--csv", str(table)]) == 0
    assert png.stat().st_size > 1000 and table.read_text().count("\n") == 3
    args = ex.argparse.Namespace(preset="toy", arch="llama", steps=24, divergence="fkl", temperature=1.0,
                                 teacher_sharpen=3.0, device="cpu", dtype="fp32", seed=0, quiet=True)
    eager, fused = ex.train(args, "eager"), ex.train(args, "fused")
    for a, b in zip(fused["losses"], eager["losses"]):
        assert abs(a - b) <= 1e-4 * abs(b), (fused["losses"], eager["losses"])
    first, last = sum(fused["losses"][:4]) / 4, sum(fused["losses"][-4:]) / 4
    assert last < 0.85 * first, fused["losses"]


@pytest.mark.parametrize("flags, match", [
    (["--steps", "0"], "--steps"),
    (["--temperature", "0"], "--temperature"),
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--teacher-sharpen", "inf"], "--teacher-sharpen"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
    (["--device", "nonsense"], "--device"),
    (["--plot", "/nonexistent-folder/x.png"], "--plot"),
    (["--csv", "/nonexistent-folder/x.csv"], "--csv"),
])
def test_distill_llm_bad_flags_fail_before_training(flags, match, capsys, monkeypatch):
    """A bad flag exits 2 with a message naming it, before any model is built (before: a NaN table and an empty
    plot, a traceback after a whole eager run, a raw AssertionError, or an error only after training)."""
    ex = _load("distill_llm")
    monkeypatch.setattr(ex, "train", lambda *a, **k: pytest.fail("trained despite a bad flag"))
    assert ex.main([*flags, "--quiet"]) == 2
    assert match in capsys.readouterr().err


def test_distill_llm_runs_without_matplotlib(tmp_path, monkeypatch, capsys):
    """matplotlib is not a dependency: the default run skips the plot with a message instead of failing after
    training."""
    pytest.importorskip("transformers")
    ex = _load("distill_llm")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    monkeypatch.chdir(tmp_path)
    with fastdistill.use_backend("reference"):
        assert ex.main(["--steps", "1", "--quiet", "--device", "cpu"]) == 0
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not (tmp_path / "distill_loss.png").exists()


def test_scm_grad_scaled_keeps_the_value_exactly():
    """scm_step's logvar trick under FSDP2 + CP (gradient ÷ W): the value must stay bit-exact for any W, also in bf16
    (logvar / W + (logvar − logvar / W).detach() moved ~11% of values by an ulp at W = 3)."""
    ex = _load("scm_step")
    for dtype in (torch.bfloat16, torch.float32):
        x = (torch.randn(4096, generator=torch.Generator().manual_seed(7)) * 3).to(dtype).requires_grad_()
        y = ex.grad_scaled(x, 1.0 / 3)
        assert torch.equal(y, x)
        y.sum().backward()
        assert torch.allclose(x.grad.float(), torch.full((4096,), 1 / 3), rtol=1e-2)


def test_scm_two_forward_schedule_and_checkpointing_match_one_forward():
    """rCM's schedule (the JVP under no_grad, then a gradient forward) with and without per-block activation
    checkpointing updates the student and logvar_net exactly as the one-forward step (float64, SGD, 3 steps):
    what makes the full wan-1.3b-like preset fit one GPU (--checkpoint)."""
    ex = _load("scm_step")
    preset = ex.PRESETS["toy"]
    results = {}
    with fastdistill.use_backend("reference"):
        for schedule, ckpt in (("one-forward", False), ("two-forward", False), ("two-forward", True)):
            student, teacher, logvar_net, opt = ex.build(preset, torch.device("cpu"), torch.float64, seed=0,
                                                         optimizer=torch.optim.SGD)
            student.checkpoint = ckpt
            p0 = [p.detach().clone() for p in [*student.parameters(), *logvar_net.parameters()]]
            gen = torch.Generator().manual_seed(0)
            losses = []
            for step in range(3):
                x0, text = ex.data(preset, torch.device("cpu"), torch.float64, gen)
                losses.append(ex.scm_step(student, teacher, logvar_net, opt, x0, text, step,
                                          ex.SCMConfig(warmup_steps=2), gen=gen, schedule=schedule)["loss"])
            params = [p.detach() for p in [*student.parameters(), *logvar_net.parameters()]]
            results[(schedule, ckpt)] = (losses, [p - q for p, q in zip(params, p0)])
    ref_losses, ref_upd = results[("one-forward", False)]
    for key, (losses, upd) in results.items():
        assert all(abs(a - b) <= 1e-12 * max(1.0, abs(b)) for a, b in zip(losses, ref_losses)), (key, losses)
        for i, (a, b) in enumerate(zip(upd, ref_upd)):
            err = ((a - b).abs().max() / b.abs().max()).item()
            assert err <= 1e-10, f"{key}: parameter {i}: its update differs ({err:.2e})"
    assert ex.main(["--checkpoint", "--schedule", "one-forward", "--steps", "1", "--device", "cpu"]) == 2


@pytest.mark.parametrize("flags", [["--checkpoint"], ["--cp", "ring", "--fsdp"]])
def test_scm_step_cli_needs_torch_2_13_for_fsdp_and_checkpoint(flags, capsys, monkeypatch):
    """Before torch 2.13 (2.11 checked) torch.func.jvp through FSDP2 modules and through non-reentrant checkpointing
    raises inside PyTorch: the example exits 2 with the reason before building anything."""
    ex = _load("scm_step")
    monkeypatch.setattr(ex.torch, "__version__", "2.11.0+cu130")
    assert ex.main([*flags, "--steps", "1", "--quiet", "--device", "cpu"]) == 2
    assert "need torch >= 2.13" in capsys.readouterr().err


def _scm_cp_worker(rank: int, world: int, tmp: str, mode: str, fsdp: bool = False) -> None:
    import os

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    with fastdistill.use_backend("reference"):
        ex = _load("scm_step")
        preset = ex.PRESETS["toy"]
        student, teacher, logvar_net, opt = ex.build(preset, torch.device("cpu"), torch.float64, seed=0,
                                                     optimizer=torch.optim.SGD)
        cp = ex.ContextParallel(group=None, mode=mode, rank=rank, world=world)
        student.set_context_parallel(cp)
        teacher.set_context_parallel(cp)
        if fsdp:
            opt = ex.shard_fsdp2(student, logvar_net, cp, torch.device("cpu"), optimizer=torch.optim.SGD)
        gen = torch.Generator().manual_seed(0)
        losses = []
        for step in range(3):
            x0, text = ex.data(preset, torch.device("cpu"), torch.float64, gen)
            losses.append(ex.scm_step(student, teacher, logvar_net, opt, x0, text, step, ex.SCMConfig(warmup_steps=2),
                                      gen=gen, fsdp=fsdp)["loss"])
        params = [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
                  for p in [*student.parameters(), *logvar_net.parameters()]]
    torch.save({"losses": losses, "params": params}, f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()
    os._exit(0)  # skip the interpreter's teardown of torch (seconds on a loaded machine)


def test_scm_step_context_parallel_matches_one_process(tmp_path):
    """The sCM step with the video tokens split over 2 gloo ranks (ring and Ulysses self-attention,
    forward-AD through torch.func.jvp, gradients summed over the group; and ring with the student FSDP2-sharded
    over the group, whose reduction averages: the loss scaled by the group size) updates the student exactly as
    one process does (float64): student and logvar_net. Before, the README said FSDP2 sums: unscaled, its
    gradients were 1/W; and with the loss scaled, logvar_net's gradients (whole on every rank) were W times too
    large — hidden while this test used Adam, whose update barely depends on the gradient's scale (now SGD)."""
    import torch.multiprocessing as mp

    ex = _load("scm_step")
    preset = ex.PRESETS["toy"]
    # SGD: the update is the gradient (Adam would divide last-bit differences in near-zero entries by their own
    # size), so the parameters compare the gradients themselves
    student, teacher, logvar_net, opt = ex.build(preset, torch.device("cpu"), torch.float64, seed=0,
                                                 optimizer=torch.optim.SGD)
    p0 = [p.detach().clone() for p in [*student.parameters(), *logvar_net.parameters()]]
    gen = torch.Generator().manual_seed(0)
    ref_losses = []
    with fastdistill.use_backend("reference"):
        for step in range(3):
            x0, text = ex.data(preset, torch.device("cpu"), torch.float64, gen)
            ref_losses.append(ex.scm_step(student, teacher, logvar_net, opt, x0, text, step,
                                          ex.SCMConfig(warmup_steps=2), gen=gen)["loss"])
    ref = [p.detach() for p in [*student.parameters(), *logvar_net.parameters()]]
    old_torch = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13)
    # (torch < 2.13, 2.11 checked: torch.func.jvp through an FSDP2 module raises in PyTorch, whatever the attention)
    for mode, fsdp in (("ring", False), ("ulysses", False), *(() if old_torch else (("ring", True),))):
        tmp = tmp_path / f"{mode}{'-fsdp' * fsdp}"
        tmp.mkdir()
        mp.spawn(_scm_cp_worker, args=(2, str(tmp), mode, fsdp), nprocs=2, join=True)
        for rank in range(2):
            got = torch.load(tmp / f"rank{rank}.pt")
            assert all(abs(a - b) <= 1e-10 * max(1.0, abs(b)) for a, b in zip(got["losses"], ref_losses)), \
                (mode, rank, got["losses"], ref_losses)
            for i, (a, b) in enumerate(zip(got["params"], ref)):
                err = ((a - b).abs().max() / (b - p0[i]).abs().max()).item()  # relative to the update
                assert err <= 1e-9, f"{mode}: rank {rank}, parameter {i}: its update differs ({err:.2e})"
