"""fastdistill.integrations.jvp_sdpa on the diffusers models that sCM / rCM / MeanFlow distillers train, unmodified and
randomly initialised from tiny configs (1–2 layers, 2 heads, head dims 8–16, a few dozen tokens), in float64 on the CPU.

Oracle: the same step under stock SDPA restricted to its math backend (the only SDPA backend with forward-mode AD).
The step is ``torch.func.jvp`` of the whole model w.r.t. the noisy latent and the (float) timestep, random latent
tangent and dt = 1, text / image conditioning without a tangent (closed over, as in sCM), then a gradient pass
through the primal output of that same forward (MeanFlow / DMF pattern). Output, tangent and every parameter's
gradient must agree to 1e-11 relative; ``sdpa_stats()`` must show the fused path served every attention call with a
tangent (no silent fallback), padded-text key masks included, and fallbacks (activation checkpointing under
``jvp_sdpa()``) must warn with their reason and still give the math result.

The diffusers models compute some steps in float32 even in a float64 model (``FP32LayerNorm``, Wan's blocks and
RoPE / timestep embeddings all call ``.float()``). Left in, those islands round both runs' activations to fp32: a
1e-16 difference between the two attention paths then usually vanishes (outputs bitwise equal, so the comparison
tests nothing below ~1e-7) and occasionally flips an fp32 rounding (a ~1e-8 difference: a flaky 1e-11 check). The
fixture ``f64_throughout`` makes ``Tensor.float()`` a no-op on float64 tensors for the test, so the models run in
float64 end to end (except Mochi's explicit ``.to(torch.float32)`` norms: Mochi is checked to fp32 resolution). With it,
a 1e-9 relative error injected into the served attention output moves the output or the gradients of every other
served model here beyond the 1e-11 tolerance (checked by hand: outputs by 2e-11 to 8e-10), while the two paths agree to
~1e-15. (Without it the same error moved Wan's output by 9e-9: fp32 roundings flipped.)

Coverage: Wan 2.1 t2v / i2v and Wan 2.2 per-token timesteps, Flux.1, SD3.5, CogVideoX 1.0 / 1.5, Sana (as Sana-Sprint),
Qwen-Image, LTX-Video, Z-Image, Cosmos-Predict2, Flux.2, Lumina-Image 2.0, Mochi (padded text, one call per sample),
PixArt-Sigma; padded-text key masks in Sana, Qwen-Image, LTX-Video, Lumina-Image 2.0 and HunyuanVideo, which always
builds a mask (all served: bool [B, 1, 1, S] and float −1e4 biases [B, H, 1, S]); dual tensors and rCM's checkpointed
two-forward schedule on Wan; the Triton kernels (interpreter, fp32) on Wan, Flux and padded-text LTX-Video. No model
needs an xfail: every one, complex-valued RoPE included, runs under forward-mode AD in torch 2.13.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_jvp_sdpa import _clean  # noqa: F401  (autouse: sdpa_stats reset; SDPA unpatched after each test)
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastdistill.integrations import jvp_sdpa, patch_sdpa, sdpa_stats, unpatch_sdpa
from fastdistill.integrations import sdpa as _sdpa_mod

diffusers = pytest.importorskip("diffusers")

F64 = torch.float64
TOL = 1e-11




@pytest.fixture(autouse=True)
def f64_throughout(monkeypatch):
    """``Tensor.float()`` keeps float64 tensors float64 (module docstring: the models' fp32 islands)."""
    real = torch.Tensor.float
    keep = lambda self, *a, **kw: self if self.dtype == F64 else real(self, *a, **kw)
    monkeypatch.setattr(torch.Tensor, "float", keep)


def _close(a, b, tol=TOL, what="", floor=1e-6):
    a, b = a.detach(), b.detach()
    err = ((a - b).abs().max() / b.abs().max().clamp_min(floor)).item() if b.numel() else 0.0
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def _step(model, f, primals, tangents):
    """One sCM / MeanFlow step: the JVP pass, then a gradient pass through its primal (plus the detached tangent)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out, tout = torch.func.jvp(f, primals, tangents)
    loss = (out * torch.cos(out.detach())).sum() + (out * tout.detach()).sum()
    return out, tout, torch.autograd.grad(loss, params, allow_unused=True)


def _math_step(model, f, primals, tangents):
    with sdpa_kernel(SDPBackend.MATH):
        return _step(model, f, primals, tangents)


def _compare(got, ref, what, tol=TOL):
    _close(got[0], ref[0], tol, what=f"{what}: output")
    _close(got[1], ref[1], tol, what=f"{what}: tangent")
    assert ref[1].abs().max() > 0.1, f"{what}: a vanishing tangent tests nothing"
    assert [g is None for g in got[2]] == [g is None for g in ref[2]], what
    assert sum(g is not None for g in ref[2]) > len(ref[2]) // 2, what
    # parameters whose gradient vanishes analytically (a key-norm bias: softmax is shift invariant) carry rounding
    # noise only: their error is measured against 1e-4 of the largest gradient
    floor = 1e-4 * max(g.abs().max() for g in ref[2] if g is not None)
    for i, (a, b) in enumerate(zip(got[2], ref[2])):
        if b is not None:
            _close(a, b, tol, what=f"{what}: grad of parameter {i}", floor=floor)


# ----------------------------------------------------------------------------- the models
# Each builder returns (model, f, primals, tangents): f(latent, t) -> the model's prediction, conditioning closed over.
def _xt(x, t, seed=1, dt=F64):
    g = torch.Generator().manual_seed(seed)
    return _cast(dt, x, t), _cast(dt, torch.randn(x.shape, generator=g, dtype=F64), torch.ones_like(t))


def _cast(dt, *xs):
    """Everything is drawn in float64 (the same values for every dtype), then cast."""
    return tuple(x if x is None else x.to(dt) for x in xs)


def _wan(variant="t2v", dt=F64):
    """Wan 2.1 (rCM's main model): 3-D RoPE on self-attention, cross-attention to the text; i2v adds the image
    cross-attention (its text context is fixed at 512 tokens), ti2v (Wan 2.2) takes one timestep per token."""
    i2v = variant == "i2v"
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32, image_dim=20 if i2v else None,
        added_kv_proj_dim=24 if i2v else None).to(F64)
    x = torch.randn(2, 4, 3, 4, 4, dtype=F64)  # 3 frames of 2x2 patches: 12 tokens
    t = torch.rand(2, 12, dtype=F64) * 1000 if variant == "ti2v" else torch.tensor([300.0, 700.5], dtype=F64)
    ctx = torch.randn(2, 512 if i2v else 7, 16, dtype=F64)
    img = torch.randn(2, 3, 20, dtype=F64) if i2v else None
    model, ctx, img = _cast(dt, model, ctx, img)
    return (model, lambda x, t: model(x, t, ctx, encoder_hidden_states_image=img).sample, *_xt(x, t, dt=dt))


def _flux(dt=F64):
    """Flux.1 (dev, guidance-embedded): joint text-image attention with 3-axis RoPE in double- and single-stream
    blocks."""
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).to(F64)
    h, w, n_txt = 3, 4, 5
    x = torch.randn(2, h * w, 8, dtype=F64)
    ctx, pooled = torch.randn(2, n_txt, 12, dtype=F64), torch.randn(2, 10, dtype=F64)
    img_ids = torch.zeros(h, w, 3, dtype=F64)
    img_ids[..., 1], img_ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)
    txt_ids, img_ids = torch.zeros(n_txt, 3, dtype=F64), img_ids.reshape(-1, 3)
    guidance = torch.full((2,), 3.5, dtype=F64)
    model, ctx, pooled, img_ids, txt_ids, guidance = _cast(dt, model, ctx, pooled, img_ids, txt_ids, guidance)
    f = lambda x, t: model(x, ctx, pooled, t, img_ids, txt_ids, guidance=guidance).sample
    return (model, f, *_xt(x, torch.tensor([0.3, 0.75], dtype=F64), dt=dt))


def _sd3():
    """SD3 / SD3.5 MMDiT: joint attention; layer 0 is an SD3.5 dual-attention layer (an extra self-attention), with
    RMS qk-norm."""
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
        pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm").to(F64)
    x = torch.randn(2, 4, 8, 8, dtype=F64)
    ctx, pooled = torch.randn(2, 5, 12, dtype=F64), torch.randn(2, 10, dtype=F64)
    return (model, lambda x, t: model(x, ctx, pooled, t).sample, *_xt(x, torch.tensor([300.0, 700.5], dtype=F64)))


def _cogvideox(version="1.0"):
    """CogVideoX: joint text-video attention with 3-D RoPE (computed by the pipeline, applied to the video tokens
    only); 1.5 patches time too and embeds the ofs condition."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    v15 = version == "1.5"
    model = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        ofs_embed_dim=8 if v15 else None, text_embed_dim=12, num_layers=2, sample_width=8, sample_height=8,
        sample_frames=9, patch_size=2, patch_size_t=2 if v15 else None, max_text_seq_length=5,
        use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False).to(F64)
    frames = 4 if v15 else 3
    x = torch.randn(2, frames, 4, 8, 8, dtype=F64)
    if v15:
        rope = get_3d_rotary_pos_embed(16, None, (4, 4), frames // 2, grid_type="slice", max_size=(4, 4))
    else:
        rope = get_3d_rotary_pos_embed(16, ((0, 0), (4, 4)), (4, 4), frames)
    rope = tuple(r.to(F64) for r in rope)
    ctx = torch.randn(2, 5, 12, dtype=F64)
    ofs = torch.full((2,), 2.0, dtype=F64) if v15 else None
    f = lambda x, t: model(x, ctx, t, ofs=ofs, image_rotary_emb=rope).sample
    return (model, f, *_xt(x, torch.tensor([300.0, 700.5], dtype=F64)))


def _sana(mask=None):
    """Sana as Sana-Sprint (sCM) configures it: guidance embedding, qk-norm; its self-attention is linear attention
    (no SDPA), its cross-attention to the text is SDPA."""
    model = diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=12,
        mlp_ratio=2.0, sample_size=8, patch_size=2, guidance_embeds=True, qk_norm="rms_norm_across_heads").to(F64)
    x = torch.randn(2, 4, 8, 8, dtype=F64)
    ctx, guidance = torch.randn(2, 5, 12, dtype=F64), torch.full((2,), 4.5, dtype=F64)
    f = lambda x, t: model(x, ctx, t, guidance=guidance, encoder_attention_mask=mask).sample
    return (model, f, *_xt(x, torch.tensor([0.3, 0.75], dtype=F64)))


def _qwen_image(mask=None):
    """Qwen-Image: joint attention with complex-valued RoPE (``torch.polar`` / ``view_as_complex``)."""
    model = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=12, axes_dims_rope=(4, 6, 6)).to(F64)
    x = torch.randn(2, 12, 16, dtype=F64)
    ctx = torch.randn(2, 5, 12, dtype=F64)
    f = lambda x, t: model(x, ctx, mask, t, img_shapes=[(1, 3, 4)] * 2).sample
    return (model, f, *_xt(x, torch.tensor([0.3, 0.75], dtype=F64)))


def _ltx(mask=None, dt=F64):
    """LTX-Video: self-attention with 3-D RoPE, cross-attention to the text."""
    model = diffusers.LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=2, caption_channels=12).to(F64)
    x = torch.randn(2, 2 * 3 * 4, 8, dtype=F64)
    ctx = torch.randn(2, 5, 12, dtype=F64)
    model, ctx = _cast(dt, model, ctx)
    f = lambda x, t: model(x, ctx, t, mask, num_frames=2, height=3, width=4).sample
    return (model, f, *_xt(x, torch.tensor([300.0, 700.5], dtype=F64), dt=dt))


def _z_image():
    """Z-Image: a caption refiner (no tangent), a noise refiner and the unified single-stream blocks, complex RoPE."""
    model = diffusers.ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=12, axes_dims=[4, 6, 6], axes_lens=[1024, 64, 64]).to(F64)
    x = torch.randn(2, 4, 1, 4, 4, dtype=F64)
    caps = [torch.randn(5, 12, dtype=F64) for _ in range(2)]  # equal lengths: no padding mask
    f = lambda x, t: torch.stack(model(list(x), t, caps).sample)
    return (model, f, *_xt(x, torch.tensor([0.3, 0.75], dtype=F64)))


def _hunyuan_video():
    """HunyuanVideo: dual- and single-stream joint attention with 3-D RoPE and a text token refiner. The model
    always builds a key-padding mask for the joint attention (also for unpadded text)."""
    model = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=12, pooled_projection_dim=10,
        rope_axes_dim=(2, 2, 4)).to(F64)
    x = torch.randn(2, 4, 2, 4, 4, dtype=F64)
    ctx, pooled = torch.randn(2, 5, 12, dtype=F64), torch.randn(2, 10, dtype=F64)
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    guidance = torch.full((2,), 6000.0, dtype=F64)
    f = lambda x, t: model(x, t, ctx, text_mask, pooled, guidance=guidance).sample
    return (model, f, *_xt(x, torch.tensor([300.0, 700.5], dtype=F64)))


def _cosmos_predict2():
    """Cosmos-Predict2 (rCM's other model family): self-attention with 3-D RoPE and qk-norm, cross-attention to
    the text, adaLN-LoRA."""
    model = diffusers.CosmosTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2, mlp_ratio=2.0,
        text_embed_dim=12, adaln_lora_dim=8, max_size=(8, 16, 16), patch_size=(1, 2, 2), rope_scale=(1.0, 4.0, 4.0),
        concat_padding_mask=False, extra_pos_embed_type=None).to(F64)
    x = torch.randn(2, 4, 2, 4, 4, dtype=F64)
    ctx = torch.randn(2, 5, 12, dtype=F64)
    return (model, lambda x, t: model(x, t, ctx).sample, *_xt(x, torch.tensor([0.3, 0.75], dtype=F64)))


def _flux2():
    """Flux.2: joint attention with 4-axis RoPE, shared modulation."""
    model = diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=12, timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4)).to(F64)
    h, w, n_txt = 3, 4, 5
    x = torch.randn(2, h * w, 8, dtype=F64)
    ctx = torch.randn(2, n_txt, 12, dtype=F64)
    img_ids = torch.zeros(h, w, 4, dtype=F64)
    img_ids[..., 1], img_ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)
    img_ids = img_ids.reshape(1, -1, 4).expand(2, -1, -1)
    txt_ids = torch.zeros(2, n_txt, 4, dtype=F64)
    txt_ids[..., 3] = torch.arange(n_txt)
    guidance = torch.full((2,), 4.0, dtype=F64)
    f = lambda x, t: model(x, ctx, t, img_ids, txt_ids, guidance=guidance).sample
    return (model, f, *_xt(x, torch.tensor([0.3, 0.75], dtype=F64)))


def _lumina2(mask=None):
    """Lumina-Image 2.0: grouped key/value heads (4 query heads over 2, repeated by the model), complex RoPE, a
    caption refiner (a mask, no tangent: stock) and a noise refiner; an unpadded caption gives the joint layers no
    mask, a padded one a key mask."""
    model = diffusers.Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=1, num_refiner_layers=1,
        num_attention_heads=4, num_kv_heads=2, multiple_of=16, axes_dim_rope=(4, 2, 2), axes_lens=(64, 32, 32),
        cap_feat_dim=12).to(F64)
    x = torch.randn(2, 4, 8, 8, dtype=F64)
    ctx = torch.randn(2, 5, 12, dtype=F64)
    caption_mask = torch.ones(2, 5, dtype=torch.bool) if mask is None else mask.bool()
    f = lambda x, t: model(x, t, ctx, caption_mask).sample
    return (model, f, *_xt(x, torch.tensor([0.3, 0.75], dtype=F64)))


def _mochi():
    """Mochi: joint attention with learned 3-D RoPE; padded text is handled by one SDPA call per sample over its
    valid tokens (no mask), so a padded batch is served."""
    model = diffusers.MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=16, time_embed_dim=8, max_sequence_length=5).to(F64)
    x = torch.randn(2, 4, 2, 4, 4, dtype=F64)
    ctx, text_mask = torch.randn(2, 5, 16, dtype=F64), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    f = lambda x, t: model(x, ctx, t, text_mask).sample  # (its RoPE warns: CPU autocast declines fp32)
    return (model, f, *_xt(x, torch.tensor([300.0, 700.5], dtype=F64)))


def _pixart():
    """PixArt-Sigma: self-attention, cross-attention to the text (no mask), adaLN-single."""
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=12,
        use_additional_conditions=False).to(F64)
    x = torch.randn(2, 4, 8, 8, dtype=F64)
    ctx, cond = torch.randn(2, 5, 12, dtype=F64), {"resolution": None, "aspect_ratio": None}
    f = lambda x, t: model(x, ctx, t, added_cond_kwargs=cond).sample
    return (model, f, *_xt(x, torch.tensor([300.0, 700.5], dtype=F64)))


# name: (builder, expected sdpa_stats() under jvp_sdpa(plain=...), plain[, tolerance])
SERVED = {
    "wan-t2v": (_wan, {"jvp": 4}, "sdpa"),  # 2 x (self, text cross)
    "wan-i2v": (lambda: _wan("i2v"), {"jvp": 6}, "sdpa"),  # 2 x (self, text cross, image cross)
    "wan2.2-ti2v-per-token-t": (lambda: _wan("ti2v"), {"jvp": 4}, "sdpa"),
    "flux": (_flux, {"jvp": 2}, "sdpa"),
    "sd3.5": (_sd3, {"jvp": 3}, "sdpa"),  # joint x 2, dual-attention self x 1
    "cogvideox-1.0": (_cogvideox, {"jvp": 2}, "sdpa"),
    "cogvideox-1.5": (lambda: _cogvideox("1.5"), {"jvp": 2}, "sdpa"),
    "sana-sprint": (_sana, {"jvp": 2}, "sdpa"),  # the cross-attentions (self-attention is linear attention)
    "qwen-image": (_qwen_image, {"jvp": 2}, "sdpa"),
    "ltx-video-no-text-mask": (_ltx, {"jvp": 4}, "sdpa"),
    # the caption refiner's attention has no tangent: fastdistill's plain attention serves it with plain="fastdistill"
    "z-image": (_z_image, {"jvp": 2, "plain": 1}, "fastdistill"),
    "cosmos-predict2": (_cosmos_predict2, {"jvp": 4}, "sdpa"),
    "flux.2": (_flux2, {"jvp": 2}, "sdpa"),
    "lumina2": (_lumina2, {"stock": 1, "jvp": 2}, "sdpa"),
    # one call per sample; the stock call is the caption pooling. Its norms are fp32 (.to(torch.float32)) in a float64
    # model too: a 1e-16 difference can flip an fp32 rounding there, so it is checked to fp32 resolution
    "mochi-padded-text": (_mochi, {"stock": 1, "jvp": 4}, "sdpa", 1e-6),
    "pixart-sigma": (_pixart, {"jvp": 4}, "sdpa"),
}


@pytest.mark.parametrize("name", list(SERVED))
def test_model_jvp_and_grads_match_math_sdpa(name):
    build, expect, plain, *tol = SERVED[name]
    torch.manual_seed(0)
    model, f, primals, tangents = build()
    ref = _math_step(model, f, primals, tangents)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with jvp_sdpa(plain=plain):
            got = _step(model, f, primals, tangents)
    assert not [w for w in seen if "fastdistill" in str(w.message)], [str(w.message) for w in seen]
    assert sdpa_stats() == expect, f"{name}: {sdpa_stats()}"
    _compare(got, ref, name, *tol)


PADDED = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # the second prompt is 3 tokens, padded to 5
MASKED = {
    # name: (builder, expected sdpa_stats()): every call with a tangent served, its key-padding mask included
    "sana-padded-text": (lambda: _sana(PADDED), {"jvp": 2}),  # float −1e4 bias [B, H, 1, S] (cross-attention)
    "qwen-image-padded-text": (lambda: _qwen_image(PADDED), {"jvp": 2}),  # bool [B, 1, 1, S] (joint attention)
    "ltx-video-padded-text": (lambda: _ltx(PADDED), {"jvp": 4}),  # float −1e4 bias (cross-attention), self unmasked
    "lumina2-padded-text": (lambda: _lumina2(PADDED), {"stock": 1, "jvp": 2}),  # the caption refiner: no tangent
    "hunyuan-video": (_hunyuan_video, {"stock": 1, "jvp": 2}),  # always a bool mask; the refiner: no tangent
}


@pytest.mark.parametrize("name", list(MASKED))
def test_padded_text_masks_are_served(name):
    """A key-padding mask for padded text (an ``attn_mask`` the same for every query row) is served by the fused path
    (before: every such call fell back to stock math SDPA with a warning): no warning, the calls counted as served,
    and the step matches math SDPA to 1e-11."""
    build, expect = MASKED[name]
    torch.manual_seed(0)
    model, f, primals, tangents = build()
    ref = _math_step(model, f, primals, tangents)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with jvp_sdpa():
            got = _step(model, f, primals, tangents)
    assert not [w for w in seen if "fastdistill" in str(w.message)], [str(w.message) for w in seen]
    assert sdpa_stats() == expect, f"{name}: {sdpa_stats()}"
    _compare(got, ref, name)


def test_wan_dual_tensors():
    """forward_ad dual tensors instead of torch.func.jvp (the gradient pass after the dual level closes)."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    model, f, (x, t), (tx, tt) = _wan()
    ref = _math_step(model, f, (x, t), (tx, tt))
    with fwAD.dual_level(), jvp_sdpa():
        out, tout = fwAD.unpack_dual(f(fwAD.make_dual(x, tx), fwAD.make_dual(t, tt)))
    # (a backward inside the dual level raises in PyTorch with math SDPA too: aten::silu_backward has no forward AD)
    params = list(model.parameters())
    loss = (out * torch.cos(out.detach())).sum() + (out * tout.detach()).sum()
    got = (out, tout, torch.autograd.grad(loss, params, allow_unused=True))
    assert sdpa_stats() == {"jvp": 4}, sdpa_stats()
    _compare(got, ref, "wan dual tensors")


@pytest.mark.parametrize("mode", ["patch_sdpa", "jvp_sdpa"])
def test_wan_rcm_schedule_with_gradient_checkpointing(mode):
    """rCM's schedule on a checkpointed Wan (``enable_gradient_checkpointing()``: non-reentrant
    ``torch.utils.checkpoint`` per block): the JVP under ``no_grad`` (diffusers skips checkpointing there), then a
    separate gradient forward that checkpoints. It matches the one-forward math-SDPA step without checkpointing.
    ``patch_sdpa(plain="fastdistill")`` serves every call, the recomputation in backward included; under
    ``jvp_sdpa(plain="fastdistill")`` the checkpointed calls run stock SDPA with a warning naming the reason."""
    torch.manual_seed(0)
    model, f, primals, tangents = _wan()
    ref = _math_step(model, f, primals, tangents)
    model.enable_gradient_checkpointing()
    params = list(model.parameters())

    def two_pass():
        with torch.no_grad():
            _, tout = torch.func.jvp(f, primals, tangents)
        out = f(*primals)
        loss = (out * torch.cos(out.detach())).sum() + (out * tout).sum()
        return out, tout, torch.autograd.grad(loss, params, allow_unused=True)

    if mode == "patch_sdpa":
        patch_sdpa(plain="fastdistill")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", UserWarning)
                got = two_pass()
        finally:
            unpatch_sdpa()
        expect = {"jvp": 4, "plain": 8}  # 4 calls in the gradient forward, 4 in its recomputation
    else:
        with jvp_sdpa(plain="fastdistill"), pytest.warns(UserWarning, match="activation checkpointing under jvp_sdpa"):
            got = two_pass()
        expect = {"jvp": 4, "fallback: " + _sdpa_mod._CHECKPOINT_REASON: 8}
    assert sdpa_stats() == expect, sdpa_stats()
    _compare(got, ref, f"wan rCM schedule, {mode}")


@pytest.mark.parametrize("name", ["wan-t2v", "flux", "ltx-video-padded-text"])
def test_triton_kernels_fp32(name):
    """The GPU path's kernels (Triton, through the interpreter on the CPU) on a float32 model: the fused JVP pass and
    the flash backward at the model's shapes (head dims 12 and 16, padded inside the kernel; 7 text keys against 12
    latent queries in Wan's cross-attention). Against the float64 math step, every output, tangent and gradient is
    within twice the error of the float32 math step plus 1e-6 of the oracle's largest entry."""
    import fastdistill

    if not fastdistill._backend.interpreting():
        pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1 (the README test command sets it)")
    build = {"wan-t2v": _wan, "flux": _flux, "ltx-video-padded-text": lambda dt: _ltx(PADDED, dt=dt)}[name]
    torch.manual_seed(0)
    oracle = _math_step(*build(dt=F64))
    torch.manual_seed(0)
    plain = _math_step(*build(dt=torch.float32))
    torch.manual_seed(0)
    model, f, primals, tangents = build(dt=torch.float32)
    with fastdistill.use_backend("triton"), jvp_sdpa():
        got = _step(model, f, primals, tangents)
    assert sdpa_stats() == {**SERVED, **MASKED}[name][1], sdpa_stats()
    pairs = [("output", got[0], plain[0], oracle[0]), ("tangent", got[1], plain[1], oracle[1])]
    grads = enumerate(zip(got[2], plain[2], oracle[2]))
    pairs += [(f"grad of parameter {i}", *x) for i, x in grads if x[2] is not None]
    for what, a, b, o in pairs:
        scale = o.abs().max()
        err, base = ((a.double() - o).abs().max() / scale).item(), ((b.double() - o).abs().max() / scale).item()
        assert err <= 2 * base + 1e-6, f"{name} {what}: error {err:.2e} > 2 x {base:.2e} (fp32 math) + 1e-6"
