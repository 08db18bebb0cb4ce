"""Distil a transformers causal LM into a smaller one with ``fused_linear_kd_loss``.

Teacher and student are ordinary ``transformers`` models (Llama- / Qwen2-style configs, randomly
initialised: no weight downloads); the student is narrower and shallower (hidden sizes may differ).
The loss never builds ``[tokens, vocab]`` logits: it takes the models' final hidden states and their
``lm_head`` weights, and runs the KD softmax chunk by chunk (GEMM with fp32 logits, fused divergence
and gradient, dW accumulated in fp32)::

    h_s = student.model(input_ids).last_hidden_state[:, :-1]   # [B, T-1, H_s]: row i predicts token i + 1
    with torch.no_grad():
        h_t = teacher.model(input_ids).last_hidden_state[:, :-1]  # [B, T-1, H_t]
    loss = fastdistill.fused_linear_kd_loss(h_s, student.lm_head.weight, h_t, teacher.lm_head.weight,
                                            divergence="jsd", beta=0.5, temperature=1.0, labels=labels[:, 1:])

``--loss eager`` runs the same objective the way most training code does today (full logits, then
log-softmax KD in PyTorch) for a side-by-side time / memory comparison.

CPU, under a minute:   python examples/distill_llm.py --steps 60 --plot loss.png
GPU, realistic size:   python examples/distill_llm.py --preset llama-3b-to-1b --steps 20 --loss both --csv distill.csv
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fastdistill


@dataclass
class Preset:
    vocab: int
    teacher: dict
    student: dict
    batch: int
    seq: int
    lr: float


PRESETS = {
    "toy": Preset(vocab=64, batch=8, seq=32, lr=3e-3,
                  teacher=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2),
                  student=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                               num_key_value_heads=2)),
    # Llama-3.2-3B and -1B widths (vocab 128256), 4 x 2048 tokens per step
    "llama-3b-to-1b": Preset(vocab=128256, batch=4, seq=2048, lr=1e-4,
                             teacher=dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                          num_attention_heads=24, num_key_value_heads=8),
                             student=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                          num_attention_heads=32, num_key_value_heads=8)),
}


def make_model(arch: str, vocab: int, widths: dict, device, dtype, seed: int):
    import transformers

    torch.manual_seed(seed)
    cls_cfg, cls_model = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                          "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
    cfg = cls_cfg(vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False,
                  attn_implementation="sdpa", **widths)
    return cls_model(cfg).to(device=device, dtype=dtype)


def synthetic_batch(vocab: int, batch: int, seq: int, device, gen: torch.Generator) -> torch.Tensor:
    """Token ids from a fixed random bigram process (structure for the models to agree on)."""
    ids = torch.empty(batch, seq, dtype=torch.long)
    ids[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
    step = 1 + torch.randint(0, 7, (batch, seq), generator=gen)
    for j in range(1, seq):
        ids[:, j] = (ids[:, j - 1] * 31 + step[:, j]) % vocab
    return ids.to(device)


def eager_kd(h_s, w_s, h_t, w_t, labels, divergence, beta, temperature):
    """What training code does today: full logits, log-softmax, KL terms, mean over valid tokens."""
    s = (h_s @ w_s.T).float() / temperature
    with torch.no_grad():
        t = (h_t @ w_t.T).float() / temperature
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    if divergence == "fkl":
        per = (lt.exp() * (lt - ls)).sum(-1)
    elif divergence == "jsd":
        lm = torch.logsumexp(torch.stack([lt + math.log(beta), ls + math.log1p(-beta)]), 0)
        per = beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)
    else:
        raise ValueError(f"divergence: the eager baseline implements 'fkl' and 'jsd', got {divergence!r}")
    valid = labels != -100
    return (per * valid).sum() / valid.sum().clamp_min(1)


def train(args, loss_kind: str) -> dict:
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    p = PRESETS[args.preset]
    teacher = make_model(args.arch, p.vocab, p.teacher, device, dtype, seed=1).eval().requires_grad_(False)
    with torch.no_grad():  # a randomly initialised head is near-uniform: sharpen it so the targets carry information
        teacher.get_output_embeddings().weight.mul_(args.teacher_sharpen)
    student = make_model(args.arch, p.vocab, p.student, device, dtype, seed=2).train()
    opt = torch.optim.AdamW(student.parameters(), lr=p.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    losses, times = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        from tqdm import tqdm

        bar = tqdm(range(args.steps), desc=f"distil [{loss_kind}]", disable=args.quiet)
    except ImportError:  # tqdm is a test extra: the loop runs without a bar
        bar = range(args.steps)
    status = "ok"
    for _ in bar:
        ids = synthetic_batch(p.vocab, p.batch, p.seq, device, gen)
        labels = ids.clone()
        labels[:, : p.seq // 8] = -100  # e.g. a prompt that is not distilled
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        try:
            # row i predicts token i + 1: the last row has no target, and labels (aligned with ids, as in
            # transformers) are shifted by one as transformers' own loss does
            h_s = student.model(ids).last_hidden_state[:, :-1]
            with torch.no_grad():
                h_t = teacher.model(ids).last_hidden_state[:, :-1]
            w_s, w_t = student.get_output_embeddings().weight, teacher.get_output_embeddings().weight
            if loss_kind == "fused":
                loss = fastdistill.fused_linear_kd_loss(h_s, w_s, h_t, w_t, divergence=args.divergence, beta=0.5,
                                                        temperature=args.temperature, labels=labels[:, 1:])
            else:
                loss = eager_kd(h_s, w_s, h_t, w_t, labels[:, 1:], args.divergence, 0.5, args.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        except torch.OutOfMemoryError:
            status = "out of memory"
            break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    timed = times[1:] if len(times) > 1 else times
    return {
        "preset": args.preset, "loss_impl": loss_kind, "divergence": args.divergence, "dtype": args.dtype,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "tokens_per_step": p.batch * p.seq, "vocab": p.vocab, "steps": len(times),
        "ms_per_step": round(1e3 * sum(timed) / len(timed), 2) if timed else float("nan"),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda"
        else float("nan"),
        "first_loss": losses[0] if losses else float("nan"), "final_loss": losses[-1] if losses else float("nan"),
        "status": status, "losses": losses,
    }


def plot(results: list[dict], path: str) -> bool:
    """The loss curve as a PNG; False (with a message) where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:  # matplotlib is a test / bench extra, not a dependency of fastdistill
        print("no loss curve: matplotlib is not installed (pip install matplotlib, or --plot '')", file=sys.stderr)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in results:
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=f"{r['loss_impl']} ({r['divergence']})")
    ax.set_xlabel("step")
    ax.set_ylabel("KD loss")
    ax.set_title(f"distill_llm: {results[0]['preset']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def check_args(args) -> str | None:
    """The first bad flag, as an error message (None: all good) — checked before any model is built."""
    if args.steps < 1:
        return f"--steps: expected >= 1, got {args.steps}"
    if not (args.temperature > 0 and math.isfinite(args.temperature)):
        return f"--temperature: expected a finite value > 0, got {args.temperature}"
    if not math.isfinite(args.teacher_sharpen):
        return f"--teacher-sharpen: expected a finite value, got {args.teacher_sharpen}"
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        return f"--device: {e}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {args.device}: this torch sees no CUDA GPU"
    if args.preset != "toy" and device.type != "cuda":
        return f"--preset {args.preset}: needs a GPU (--device cuda)"
    for flag, path in (("--plot", args.plot), ("--csv", args.csv)):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            return f"{flag}: folder {folder} does not exist"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=list(PRESETS), default="toy")
    ap.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--divergence", choices=["fkl", "jsd"], default="fkl")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--teacher-sharpen", type=float, default=3.0,
                    help="multiply the random teacher's lm_head by this (a random head is near-uniform)")
    ap.add_argument("--loss", choices=["fused", "eager", "both"], default="fused")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on the CPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default="distill_loss.png", help="loss curve PNG ('' to skip)")
    ap.add_argument("--csv", default=None, help="append per-implementation rows to this CSV")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    bad = check_args(args)
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        return 2
    results = [train(args, k) for k in (["eager", "fused"] if args.loss == "both" else [args.loss])]
    keys = ["preset", "loss_impl", "divergence", "tokens_per_step", "ms_per_step", "peak_mem_gb", "first_loss",
            "final_loss", "status"]
    print(" | ".join(keys))
    for r in results:
        print(" | ".join(f"{r[k]:.4f}" if isinstance(r[k], float) and "loss" in k else str(r[k]) for k in keys))
    if args.plot and plot(results, args.plot):
        print(f"loss curve: {args.plot}")
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=[k for k in results[0] if k != "losses"])
            if new:
                w.writeheader()
            w.writerows([{k: v for k, v in r.items() if k != "losses"} for r in results])
    return 0 if all(math.isfinite(r["final_loss"]) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
