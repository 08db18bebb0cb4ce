"""Independent float64 transcriptions of public distillation codebases' score-difference losses.

Each function takes the network outputs as plain tensors, reproduces the loss code of one
codebase (its CFG form, parameterisation conversion, normaliser scope/epsilon/clip, loss
scaling and NaN handling) and returns ``(loss_value, grad)`` where ``grad`` is obtained by
running torch autograd through the transcribed loss (e.g. the ``0.5*mse(x, sg(x - g))``
trick exactly as written). Everything runs in float64: the sources' casts to fp32 / bf16
(``.float()``, ``.to(original_dtype)``) are dropped and marked "(dtype cast dropped)".
Written from the source files cited above each function (read via the repositories on
GitHub); no fastdistill import here on purpose.
"""
import torch
import torch.nn.functional as F


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _bc(v, like):
    """Per-sample scalars [B] -> [B, 1, ...] broadcastable against `like` (floats pass)."""
    if not torch.is_tensor(v):
        return v
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like)


# ----------------------------------------------------------------------------------------
# tianweiy/DMD2 main/sd_guidance.py: predict_noise(), SDGuidance.compute_distribution_matching_loss,
# SDGuidance.compute_loss_fake; main/utils.py: get_x0_from_noise.
# ----------------------------------------------------------------------------------------
def _dmd2_predict_noise(noise_pred_text, noise_pred_uncond, guidance_scale):
    if guidance_scale > 1:  # CFG_GUIDANCE: standard CFG in eps space
        return noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
    return noise_pred_text


def _dmd2_get_x0_from_noise(sample, model_output, alpha_prod_t):
    alpha_prod_t = alpha_prod_t.reshape(-1, 1, 1, 1)  # alphas_cumprod[timestep]
    beta_prod_t = 1 - alpha_prod_t
    return (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5


def dmd2_sd(latents, noisy_latents, real_eps_cond, real_eps_uncond, fake_eps, alphas_cumprod_t,
            real_guidance_scale):
    """DMD2 SD/SDXL generator DM loss; eps-prediction UNets, fake_guidance_scale == 1."""
    latents = _leaf(latents)
    original_latents = latents
    with torch.no_grad():
        pred_fake_noise = fake_eps  # predict_noise(..., guidance_scale=1)
        pred_fake_image = _dmd2_get_x0_from_noise(noisy_latents.double(), pred_fake_noise.double(),
                                                  alphas_cumprod_t.double())
        pred_real_noise = _dmd2_predict_noise(real_eps_cond, real_eps_uncond, real_guidance_scale)
        pred_real_image = _dmd2_get_x0_from_noise(noisy_latents.double(), pred_real_noise.double(),
                                                  alphas_cumprod_t.double())
        p_real = latents - pred_real_image
        p_fake = latents - pred_fake_image
        grad = (p_real - p_fake) / torch.abs(p_real).mean(dim=[1, 2, 3], keepdim=True)
        grad = torch.nan_to_num(grad)
    # (.float() on both sides dropped)
    loss = 0.5 * F.mse_loss(original_latents, (original_latents - grad).detach(), reduction="mean")
    loss.backward()
    return loss.detach(), latents.grad


def dmd2_sd_fake_loss(fake_noise_pred, noise):
    """DMD2 SDGuidance.compute_loss_fake: epsilon-prediction loss of the fake UNet."""
    fake_noise_pred = _leaf(fake_noise_pred)
    loss_fake = torch.mean((fake_noise_pred - noise) ** 2)  # (.float() dropped)
    loss_fake.backward()
    return loss_fake.detach(), fake_noise_pred.grad


# tianweiy/DMD2 main/edm/edm_guidance.py: EDMGuidance.compute_distribution_matching_loss,
# EDMGuidance.compute_loss_fake (EDM denoisers output x0 directly; no CFG).
def dmd2_edm(latents, pred_real_image, pred_fake_image):
    latents = _leaf(latents)
    original_latents = latents
    with torch.no_grad():
        p_real = latents - pred_real_image
        p_fake = latents - pred_fake_image
        weight_factor = torch.abs(p_real).mean(dim=[1, 2, 3], keepdim=True)
        grad = (p_real - p_fake) / weight_factor
        grad = torch.nan_to_num(grad)
    loss = 0.5 * F.mse_loss(original_latents, (original_latents - grad).detach(), reduction="mean")
    loss.backward()
    return loss.detach(), latents.grad


def dmd2_edm_fake_loss(fake_x0_pred, latents, timestep_sigma, sigma_data=0.5):
    fake_x0_pred = _leaf(fake_x0_pred)
    timestep_sigma = timestep_sigma.reshape(-1, 1, 1, 1)
    snrs = timestep_sigma ** -2
    weights = snrs + 1.0 / sigma_data ** 2  # weight_schedule karras
    loss_fake = torch.mean(weights * (fake_x0_pred - latents) ** 2)
    loss_fake.backward()
    return loss_fake.detach(), fake_x0_pred.grad


# ----------------------------------------------------------------------------------------
# guandeh17/Self-Forcing model/dmd.py: DMD._compute_kl_grad + DMD.compute_distribution_matching_loss
# (scores are x0 predictions, tensors [B, F, C, H, W]; gradient_mask from model/base.py).
# ----------------------------------------------------------------------------------------
def self_forcing(image_or_video, real_cond, real_uncond, fake_cond, real_guidance_scale,
                 fake_uncond=None, fake_guidance_scale=0.0, gradient_mask=None, normalization=True):
    original_latent = image_or_video = _leaf(image_or_video)
    with torch.no_grad():
        if fake_guidance_scale != 0.0:
            pred_fake_image = fake_cond + (fake_cond - fake_uncond) * fake_guidance_scale
        else:
            pred_fake_image = fake_cond
        pred_real_image = real_cond + (real_cond - real_uncond) * real_guidance_scale  # offset CFG
        grad = pred_fake_image - pred_real_image
        if normalization:
            p_real = image_or_video - pred_real_image
            normalizer = torch.abs(p_real).mean(dim=[1, 2, 3, 4], keepdim=True)
            grad = grad / normalizer
        grad = torch.nan_to_num(grad)
    if gradient_mask is not None:
        dmd_loss = 0.5 * F.mse_loss(original_latent.double()[gradient_mask],
                                    (original_latent.double() - grad.double()).detach()[gradient_mask],
                                    reduction="mean")
    else:
        dmd_loss = 0.5 * F.mse_loss(original_latent.double(),
                                    (original_latent.double() - grad.double()).detach(), reduction="mean")
    dmd_loss.backward()
    return dmd_loss.detach(), image_or_video.grad


# ----------------------------------------------------------------------------------------
# hao-ai-lab/FastVideo fastvideo/training/distillation_pipeline.py: DistillationPipeline._dmd_forward
# and fastvideo/models/utils.py: pred_noise_to_pred_video (flow pred -> x0 in f64, cast back).
# The source runs one timestep for the batch (sigma shared; it unflattens to batch 1); the
# global `.mean()` normaliser is kept exactly as written for B > 1.
# ----------------------------------------------------------------------------------------
def _fv_pred_noise_to_pred_video(pred_noise, noise_input_latent, sigma_t):
    pred_video = noise_input_latent.double() - sigma_t * pred_noise.double()
    return pred_video  # .to(dtype) (dtype cast dropped)


def fastvideo_legacy(generator_pred_video, noisy_latent, real_flow_cond, real_flow_uncond, fake_flow,
                     sigma_t, real_score_guidance_scale):
    original_latent = generator_pred_video = _leaf(generator_pred_video)
    with torch.no_grad():
        faker_score_pred_video = _fv_pred_noise_to_pred_video(fake_flow, noisy_latent, sigma_t)
        pred_real_video_cond = _fv_pred_noise_to_pred_video(real_flow_cond, noisy_latent, sigma_t)
        pred_real_video_uncond = _fv_pred_noise_to_pred_video(real_flow_uncond, noisy_latent, sigma_t)
        real_score_pred_video = pred_real_video_cond + (
            pred_real_video_cond - pred_real_video_uncond) * real_score_guidance_scale  # offset CFG
        grad = (faker_score_pred_video - real_score_pred_video) / torch.abs(
            original_latent - real_score_pred_video).mean()
        grad = torch.nan_to_num(grad)
    dmd_loss = 0.5 * F.mse_loss(original_latent, (original_latent - grad).detach())  # (.float() dropped)
    dmd_loss.backward()
    return dmd_loss.detach(), generator_pred_video.grad


# hao-ai-lab/FastVideo fastvideo/train/methods/distribution_matching/dmd2.py: DMD2Method._dmd_loss
# (same code in self_forcing.py); teacher/critic `predict_x0` outputs are the inputs here.
def fastvideo_new(generator_pred_x0, faker_x0, real_cond_x0, real_uncond_x0, guidance_scale):
    generator_pred_x0 = _leaf(generator_pred_x0)
    with torch.no_grad():
        real_cfg_x0 = real_uncond_x0 + (real_cond_x0 - real_uncond_x0) * guidance_scale  # std CFG
        denom = torch.abs(generator_pred_x0 - real_cfg_x0).mean()
        grad = (faker_x0 - real_cfg_x0) / denom
        grad = torch.nan_to_num(grad)
    loss = 0.5 * F.mse_loss(generator_pred_x0, (generator_pred_x0 - grad).detach())
    loss.backward()
    return loss.detach(), generator_pred_x0.grad


# hao-ai-lab/FastVideo fastvideo/train/methods/distribution_matching/streaming_long_tuning.py:
# StreamingLongTuningMethod._dmd_loss_masked + _masked_mean (chunk_mask e.g. [B, F]).
def fastvideo_streaming(generator_pred_x0, faker_x0, real_cond_x0, real_uncond_x0, guidance_scale,
                        chunk_mask=None, real_score_cfg=True):
    generator_pred_x0 = _leaf(generator_pred_x0)
    with torch.no_grad():
        if real_score_cfg:
            real_cfg_x0 = real_uncond_x0 + (real_cond_x0 - real_uncond_x0) * guidance_scale
        else:
            real_cfg_x0 = real_cond_x0
        denom = torch.abs(generator_pred_x0 - real_cfg_x0).mean(dim=[1, 2, 3, 4], keepdim=True).clamp_min(1e-6)
        grad = (faker_x0 - real_cfg_x0) / denom
        grad = torch.nan_to_num(grad)
    loss = 0.5 * (generator_pred_x0 - (generator_pred_x0 - grad).detach()) ** 2
    if chunk_mask is None:
        loss = loss.mean()
    else:
        mask_f = chunk_mask.to(device=loss.device, dtype=loss.dtype)
        while mask_f.ndim < loss.ndim:
            mask_f = mask_f.unsqueeze(-1)
        denom_m = mask_f.expand_as(loss).sum().clamp_min(1.0)
        loss = (loss * mask_f).sum() / denom_m
    loss.backward()
    return loss.detach(), generator_pred_x0.grad


# ----------------------------------------------------------------------------------------
# NVlabs/rcm rcm/models/t2v_model_distill_rcm.py: denoise() x0 reconstruction,
# _student_dmd_step, training_step_critic, _student_scm_step; rcm/utils/denoiser_scaling.py
# RectifiedFlow_TrigFlowWrapper; the trainer (rcm/trainers/trainer_distillation.py) backprops
# loss_i.sum() (grad_accum_iter = 1). Tensors are [B, C, T, H, W], time is [B].
# ----------------------------------------------------------------------------------------
def rcm_scaling(trigflow_t):
    trigflow_t = trigflow_t.to(torch.float64)
    c_skip = 1 / (torch.cos(trigflow_t) + torch.sin(trigflow_t))
    c_out = -1 * torch.sin(trigflow_t) / (torch.cos(trigflow_t) + torch.sin(trigflow_t))
    return c_skip, c_out


def _rcm_x0(xt, time, net_output):
    c_skip, c_out = rcm_scaling(_bc(time, xt))
    return c_skip * xt + c_out * net_output  # EDM reconstruction of x0


def rcm_dmd(G_x0, D_xt, net_fake, net_teacher_cond, net_teacher_uncond, D_time, teacher_guidance=5.0,
            loss_scale_dmd=1.0):
    """rCM DMD term. Note: a NaN sample's loss is zeroed by index_put; autograd then still
    yields 0*NaN = NaN at the NaN elements of that sample (finite elements get exactly 0)."""
    G = _leaf(G_x0)
    with torch.no_grad():
        x0_theta_fake = _rcm_x0(D_xt, D_time, net_fake)
        x0_theta_teacher = _rcm_x0(D_xt, D_time, net_teacher_cond)
        if teacher_guidance > 1.0:
            x0_uncond = _rcm_x0(D_xt, D_time, net_teacher_uncond)
            x0_theta_teacher = x0_uncond + teacher_guidance * (x0_theta_teacher - x0_uncond)
        weight_factor = torch.abs(G.double() - x0_theta_teacher.double()).mean(
            dim=[1, 2, 3, 4], keepdim=True).clip(min=0.00001)
    grad = (x0_theta_fake.double() - x0_theta_teacher.double()) / weight_factor
    loss_dmd = (G.double() - (G.double() - grad).detach()) ** 2
    loss_dmd[torch.isnan(loss_dmd).flatten(start_dim=1).any(dim=1)] = 0
    loss_dmd = loss_dmd.sum(dim=(1, 2, 3, 4))
    kendall_loss = loss_scale_dmd * loss_dmd
    loss = kendall_loss.sum()
    loss.backward()
    return loss.detach(), G.grad


def rcm_critic(net_fake, D_xt, G_x0, D_time):
    """rCM training_step_critic; gradient w.r.t. the fake-score network's raw output."""
    net_fake = _leaf(net_fake)
    x0_theta_fake = _rcm_x0(D_xt, D_time, net_fake)
    D_sint = torch.sin(_bc(D_time, D_xt))
    kendall_loss = ((G_x0 - x0_theta_fake) ** 2 / D_sint ** 2).sum(dim=(1, 2, 3, 4))
    loss = kendall_loss.sum()
    loss.backward()
    return loss.detach(), net_fake.grad


def rcm_scm(F_theta, t_F_theta, xt, time, F_teacher_cond, F_teacher_uncond, teacher_guidance=5.0,
            warmup_ratio=1.0, loss_scale=100.0):
    """rCM sCM tail after the JVP (t_F_theta is the JVP tangent output). Returns grad w.r.t. F_theta."""
    F_leaf = _leaf(F_theta)
    cost, sint = torch.cos(_bc(time, xt)), torch.sin(_bc(time, xt))
    F_teacher = F_teacher_cond
    if teacher_guidance > 1.0:
        F_teacher = F_teacher_uncond + teacher_guidance * (F_teacher_cond - F_teacher_uncond)
    F_theta = F_leaf
    F_theta_sg = F_theta.clone().detach()
    g = -cost * torch.sqrt(1 - warmup_ratio ** 2 * sint ** 2) * (F_theta_sg - F_teacher) - (
        warmup_ratio * cost * sint * xt + t_F_theta)
    with torch.no_grad():
        nan_mask_g = torch.isnan(g).flatten(start_dim=1).any(dim=1).view(-1, 1, 1, 1, 1).expand_as(g)
        nan_mask_F = torch.isnan(F_theta).flatten(start_dim=1).any(dim=1).view(-1, 1, 1, 1, 1).expand_as(F_theta)
    nan_mask = nan_mask_g | nan_mask_F
    g[nan_mask] = 0
    F_theta = torch.where(nan_mask, torch.tensor(0.0, dtype=F_theta.dtype), F_theta)
    F_theta_sg[nan_mask] = 0
    g = g.double() / (g.double().norm(p=2, dim=(1, 2, 3, 4), keepdim=True) + 0.1)
    loss_scm = ((F_theta - F_theta_sg - g) ** 2).sum(dim=(1, 2, 3, 4))
    kendall_loss = loss_scale * loss_scm
    loss = kendall_loss.sum()
    loss.backward()
    return loss.detach(), F_leaf.grad


# ----------------------------------------------------------------------------------------
# NVlabs/FastGen fastgen/methods/common_loss.py: variational_score_distillation_loss;
# fastgen/methods/distribution_matching/dmd2.py: DMD2Model._apply_classifier_free_guidance;
# fastgen/methods/distribution_matching/f_distill.py: FdistillModel._get_f_div_weighting_h.
# ----------------------------------------------------------------------------------------
def fastgen_cfg(teacher_x0, teacher_x0_neg, guidance_scale):
    return teacher_x0 + (guidance_scale - 1) * (teacher_x0 - teacher_x0_neg)


def fastgen_vsd(gen_data, teacher_x0, fake_score_x0, additional_scale=None):
    """teacher_x0: already CFG-combined (see fastgen_cfg)."""
    gen_data = _leaf(gen_data)
    dims = tuple(range(1, teacher_x0.ndim))
    with torch.no_grad():
        diff_abs_mean = (gen_data - teacher_x0).abs().mean(dim=dims, keepdim=True)  # (fp32 cast dropped)
        w_fp32 = 1 / (diff_abs_mean + 1e-6)
        if additional_scale is not None:
            w_fp32 *= _bc(additional_scale, w_fp32)
        w = w_fp32  # .to(original_dtype) (dtype cast dropped)
        vsd_grad = (fake_score_x0 - teacher_x0) * w
        pseudo_target = gen_data - vsd_grad
    loss = 0.5 * F.mse_loss(gen_data, pseudo_target, reduction="mean")
    loss.backward()
    return loss.detach(), gen_data.grad


_F_DIV_H = {
    "rkl": lambda r: torch.ones_like(r),
    "kl": lambda r: r,
    "js": lambda r: 1 - 1 / (1 + r),
    "sf": lambda r: 1 / (1 + r),
    "neyman": lambda r: 1 / torch.clamp(r, min=1e-8),
    "sh": lambda r: r ** 0.5,
    "jf": lambda r: 1 + r,
}


def fdistill_h(fake_logits, t, f_div="js", ratio_lower=0.1, ratio_upper=20.0, ratio_normalization=True,
               bin_num=10, min_t=0.0, max_t=1.0, ema_rate=0.0, bins=None):
    """Per-sample weight h (single process, world_size 1; bins start at ones as in build_model)."""
    fake_logits_clamped = torch.clamp(fake_logits.mean(dim=1), min=-10.0, max=10.0)
    ratio = torch.clamp(torch.exp(fake_logits_clamped), ratio_lower, ratio_upper)
    if ratio_normalization:
        bin_width = (max_t - min_t) / bin_num
        idx = ((t.double() - min_t) / bin_width).floor().long().clamp(0, bin_num - 1)
        cnt = torch.bincount(idx, minlength=bin_num).to(ratio.dtype)
        ratio_sum = torch.bincount(idx, weights=ratio, minlength=bin_num).to(ratio.dtype)
        valid = cnt > 0
        new_vals = ratio_sum / (cnt + 1e-6)
        bins = torch.ones(bin_num, dtype=ratio.dtype) if bins is None else bins.clone()
        bins[valid] = bins[valid] * ema_rate + (1 - ema_rate) * new_vals[valid]
        ratio = ratio / (bins[idx] + 1e-6)
    h = _F_DIV_H[f_div](ratio)
    h_mean = h.sum() / len(h)
    return h / (h_mean + 1e-6)


# NVlabs/FastGen fastgen/methods/consistency_model/sCM.py: SCMModel._compute_scm_loss (CFG on
# dxt_dt, use_cd=True) + SCMModel._scm_pred_to_loss + single_train_step (loss = scm_loss.mean()).
def fastgen_scm(F_theta, F_theta_jvp, x_t_hat, t_hat, sigma_t, logvar, teacher_F, teacher_F_neg=None,
                guidance_scale=None, sigma_data=0.5, r=1.0, tangent_warmup_const=0.1,
                g_norm_spatial_invariance=False, prior_weighting_enabled=True,
                divide_x_0_spatial_dim=True):
    """Returns (loss, (grad_F_theta, grad_logvar)); logvar is [B, 1] as returned by the net."""
    F_leaf, lv_leaf = _leaf(F_theta), _leaf(logvar)
    with torch.no_grad():
        dxt_dt = sigma_data * teacher_F  # CD
        if guidance_scale is not None:
            neg_dxt_dt = sigma_data * teacher_F_neg
            dxt_dt = dxt_dt + (guidance_scale - 1.0) * (dxt_dt - neg_dxt_dt)
    F_theta = F_leaf.to(torch.float64)
    F_theta_ = F_theta.detach()
    logvar = lv_leaf.squeeze(-1).to(torch.float64)
    alpha_hat, sigma_hat = torch.cos(t_hat), torch.sin(t_hat)  # TrigNoiseSchedule alpha/sigma
    g1_coeff = _bc(-alpha_hat * alpha_hat, x_t_hat)
    g1 = g1_coeff * (sigma_data * F_theta_ - dxt_dt)
    g2_coeff = _bc(alpha_hat * sigma_hat, x_t_hat)
    g2 = -(g2_coeff * x_t_hat + sigma_data * F_theta_jvp)
    g = g1 + r * g2
    g_norm = torch.linalg.vector_norm(g, dim=tuple(range(1, g.ndim)), keepdim=True)
    if g_norm_spatial_invariance:
        g_norm = g_norm * (g_norm.numel() / g.numel()) ** 0.5  # np.sqrt in source
    g = g / (g_norm + tangent_warmup_const)
    weight = 1.0 / sigma_t if prior_weighting_enabled else 1.0
    D = x_t_hat[0, :].numel() if divide_x_0_spatial_dim else 1.0
    scm_loss_unweighted = torch.mean(torch.square(F_theta - F_theta_ - g), dim=tuple(range(1, F_theta.ndim)))
    scm_loss = weight / (torch.exp(logvar) * D) * scm_loss_unweighted + logvar
    loss = scm_loss.mean()
    loss.backward()
    return loss.detach(), (F_leaf.grad, lv_leaf.grad)


# ----------------------------------------------------------------------------------------
# Luo-Yihong/TDM train_tdm_demo.py, generator block of the main loop ("Train the Few-Step Unet
# generator"): coop_samples target, weighting_factor, --use_huber (huber_c = 1e-3).
# Inputs are the x0 ("latents") outputs of predictor.predict for teacher cond/uncond and fake.
# ----------------------------------------------------------------------------------------
def tdm(model_latents, sd_latents, sd_latents_uncond, fake_latents, cfg, use_huber=False, huber_c=1e-3):
    model_latents = _leaf(model_latents)
    with torch.no_grad():
        coop_samples = model_latents.detach().clone()
        coop_samples = coop_samples.detach().clone() + 1 * (sd_latents - fake_latents).detach().clone() + (
            cfg - 1) * (sd_latents - sd_latents_uncond).detach().clone()
    sd_latents_cfg = sd_latents + (cfg - 1) * (sd_latents - sd_latents_uncond)
    weighting_factor = torch.abs(model_latents.double() - sd_latents_cfg.double()).mean(
        dim=[1, 2, 3], keepdim=True).detach()
    if use_huber:
        loss_instruct = torch.mean(
            (torch.sqrt((model_latents - coop_samples.detach()) ** 2 + huber_c ** 2) - huber_c) / weighting_factor)
    else:
        loss_instruct = F.mse_loss(model_latents, coop_samples.detach(), reduction="none") / weighting_factor
        loss_instruct = loss_instruct.mean()
    loss_instruct.backward()
    return loss_instruct.detach(), model_latents.grad


# ----------------------------------------------------------------------------------------
# SDS. ashawkey/stable-dreamfusion guidance/sd_utils.py StableDiffusion.train_step (std CFG);
# threestudio-project/threestudio threestudio/models/guidance/stable_diffusion_guidance.py
# StableDiffusionGuidance.compute_grad_sds + __call__ (offset CFG, weighting_strategy, grad_clip).
# ----------------------------------------------------------------------------------------
def sds_dreamfusion(latents, noise_pred_pos, noise_pred_uncond, noise, alphas_t, guidance_scale=100.0,
                    grad_scale=1.0):
    latents = _leaf(latents)
    with torch.no_grad():
        noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_pos - noise_pred_uncond)
    w = 1 - alphas_t  # self.alphas = scheduler.alphas_cumprod
    grad = grad_scale * w[:, None, None, None] * (noise_pred - noise)
    grad = torch.nan_to_num(grad)
    targets = (latents - grad).detach()
    loss = 0.5 * F.mse_loss(latents, targets, reduction="sum") / latents.shape[0]
    loss.backward()
    return loss.detach(), latents.grad


def sds_threestudio(latents, noise_pred_text, noise_pred_uncond, noise, alphas_t, guidance_scale=100.0,
                    weighting_strategy="sds", grad_clip_val=None):
    latents = _leaf(latents)
    batch_size = latents.shape[0]
    with torch.no_grad():
        noise_pred = noise_pred_text + guidance_scale * (noise_pred_text - noise_pred_uncond)
    if weighting_strategy == "sds":
        w = (1 - alphas_t).view(-1, 1, 1, 1)
    elif weighting_strategy == "uniform":
        w = 1
    elif weighting_strategy == "fantasia3d":
        w = (alphas_t ** 0.5 * (1 - alphas_t)).view(-1, 1, 1, 1)
    else:
        raise ValueError(weighting_strategy)
    grad = w * (noise_pred - noise)
    grad = torch.nan_to_num(grad)
    if grad_clip_val is not None:
        grad = grad.clamp(-grad_clip_val, grad_clip_val)
    target = (latents - grad).detach()
    loss_sds = 0.5 * F.mse_loss(latents, target, reduction="sum") / batch_size
    loss_sds.backward()
    return loss_sds.detach(), latents.grad


# ----------------------------------------------------------------------------------------
# VinAIResearch/SwiftBrush train_swiftbrush.py main loop: "VSD loss" and "LoRA loss" blocks.
# ----------------------------------------------------------------------------------------
def swiftbrush_vsd(pred_original_samples, teacher_pred_cond, teacher_pred_uncond, lora_pred_cond,
                   lora_pred_uncond, alphas_cumprod_t, guidance_scale=7.5):
    x = _leaf(pred_original_samples)
    with torch.no_grad():
        teacher_pred = teacher_pred_uncond + guidance_scale * (teacher_pred_cond - teacher_pred_uncond)
        lora_pred = lora_pred_uncond + guidance_scale * (lora_pred_cond - lora_pred_uncond)
    sigma_t = ((1 - alphas_cumprod_t) ** 0.5).view(-1, 1, 1, 1)
    score_gradient = torch.nan_to_num(sigma_t ** 2 * (teacher_pred - lora_pred))
    target = (x - score_gradient).detach()
    loss_vsd = 0.5 * F.mse_loss(x, target, reduction="mean")  # (.float() dropped)
    loss_vsd.backward()
    return loss_vsd.detach(), x.grad


def swiftbrush_lora_loss(lora_pred, noise, alphas_cumprod_t):
    lora_pred_leaf = _leaf(lora_pred)
    alpha_t = (alphas_cumprod_t ** 0.5).view(-1, 1, 1, 1)
    lora_pred = alpha_t * lora_pred_leaf
    target = alpha_t * noise
    loss_lora = F.mse_loss(lora_pred, target, reduction="mean")
    loss_lora.backward()
    return loss_lora.detach(), lora_pred_leaf.grad


# ----------------------------------------------------------------------------------------
# mingyuanzhou/SiD training/sid_loss.py SID_EDMLoss.generator_loss + training/sid_training_loop.py
# (loss.sum().mul(loss_scaling_G / batch_gpu_total)). y, y_real = D_real(y+n), y_fake = D_fake(y+n)
# are all differentiable; we return the gradients w.r.t. each of them.
# ----------------------------------------------------------------------------------------
def sid_edm(y, y_real, y_fake, alpha=1.2, loss_scaling_G=100.0):
    y_l, yr_l, yf_l = _leaf(y), _leaf(y_real), _leaf(y_fake)
    y, y_real, y_fake = y_l, yr_l, yf_l
    batch_gpu_total = y.shape[0]
    nan_mask_y = torch.isnan(y).flatten(start_dim=1).any(dim=1)
    nan_mask_y_real = torch.isnan(y_real).flatten(start_dim=1).any(dim=1)
    nan_mask_y_fake = torch.isnan(y_fake).flatten(start_dim=1).any(dim=1)
    nan_mask = nan_mask_y | nan_mask_y_real | nan_mask_y_fake
    if nan_mask.any():
        non_nan_mask = ~nan_mask
        y = y[non_nan_mask]
        y_real = y_real[non_nan_mask]
        y_fake = y_fake[non_nan_mask]
    with torch.no_grad():
        weight_factor = abs(y - y_real).mean(dim=[1, 2, 3], keepdim=True).clip(min=0.00001)  # (fp32 cast dropped)
    loss = (y_real - y_fake) * ((y_real - y) - alpha * (y_real - y_fake)) / weight_factor
    loss = loss.sum().mul(loss_scaling_G / batch_gpu_total)
    loss.backward()
    return loss.detach(), (y_l.grad, yr_l.grad, yf_l.grad)


# mingyuanzhou/SiD-LSG training/sid_training_loop.py (generator update) + training/sid_sd_util.py
# sid_sd_denoise: std CFG in eps space (kappa4 real / kappa2=kappa3 fake), then per-sample
# DDPMScheduler.step(...).pred_original_sample (epsilon prediction, clip_sample off).
# x_t is taken as its own input (in the source it is add_noise(images, noise)); gradients are
# returned for images, x_t and the four eps outputs.
def _lsg_eps(cond, uncond, guidance_scale):
    if guidance_scale == 1:
        return cond
    return uncond + guidance_scale * (cond - uncond)


def _ddpm_pred_original_sample(model_output, alpha_prod_t, sample):
    beta_prod_t = 1 - alpha_prod_t
    return (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5


def sid_lsg(images, latents, eps_real_cond, eps_real_uncond, eps_fake_cond, eps_fake_uncond,
            alphas_cumprod_t, cfg_eval_fake=2.0, cfg_eval_real=2.0, alpha=1.0, loss_scaling_G=100.0):
    leaves = [_leaf(t) for t in (images, latents, eps_real_cond, eps_real_uncond, eps_fake_cond, eps_fake_uncond)]
    images, latents, erc, eru, efc, efu = leaves
    batch_gpu_total = images.shape[0]

    def denoise(cond, uncond, guidance_scale):
        noise_pred = _lsg_eps(cond, uncond, guidance_scale)
        D_x = [_ddpm_pred_original_sample(n, a, z) for n, a, z in zip(noise_pred, alphas_cumprod_t, latents)]  # noqa: B905 (as in source)
        return torch.stack(D_x)

    y_fake = denoise(efc, efu, cfg_eval_fake)
    y_real = denoise(erc, eru, cfg_eval_real)
    with torch.no_grad():
        weight_factor = abs(images - y_real).mean(dim=[1, 2, 3], keepdim=True).clip(min=0.00001)
    if alpha == 1:
        loss = (y_real - y_fake) * (y_fake - images) / weight_factor
    else:
        loss = (y_real - y_fake) * ((y_real - images) - alpha * (y_real - y_fake)) / weight_factor
    loss = loss.sum().mul(loss_scaling_G / batch_gpu_total)
    loss.backward()
    return loss.detach(), tuple(t.grad for t in leaves)


# ----------------------------------------------------------------------------------------
# NVlabs/Sana train_scripts/train_scm_ladd.py train(), phase "G", config.train.scm_loss branch
# with cfg_embed and per-sample scm_cfg_scale (read at commit 0c07b191). F_theta_grad is the JVP
# output; logvar the model's [B] logvar head. Returns grads w.r.t. F_theta and logvar.
# ----------------------------------------------------------------------------------------
def sana_scm(F_theta, F_theta_grad, x_t, t, pretrain_pred_cond, pretrain_pred_uncond, scm_cfg_scale, logvar,
             sigma_data=0.5, r=1.0):
    F_leaf, lv_leaf = _leaf(F_theta), _leaf(logvar)
    t = _bc(t, x_t)
    with torch.no_grad():
        dxt_dt_uncond, dxt_dt = sigma_data * pretrain_pred_uncond, sigma_data * pretrain_pred_cond
        scm_cfg_scale = scm_cfg_scale.view(-1, 1, 1, 1)
        dxt_dt = dxt_dt_uncond + scm_cfg_scale * (dxt_dt - dxt_dt_uncond)
    F_theta = F_leaf
    logvar = lv_leaf.view(-1, 1, 1, 1)
    F_theta_grad = F_theta_grad.detach()
    F_theta_minus = F_theta.detach()
    g = -torch.cos(t) * torch.cos(t) * (sigma_data * F_theta_minus - dxt_dt)
    second_term = -r * (torch.cos(t) * torch.sin(t) * x_t + sigma_data * F_theta_grad)
    g = g + second_term
    g_norm = torch.linalg.vector_norm(g, dim=(1, 2, 3), keepdim=True)
    g = g / (g_norm + 0.1)
    sigma = torch.tan(t) * sigma_data
    weight = 1 / sigma
    l2_loss = torch.square(F_theta - F_theta_minus - g)
    loss = (weight / torch.exp(logvar)) * l2_loss + logvar
    loss = loss.mean()
    loss.backward()
    return loss.detach(), (F_leaf.grad, lv_leaf.grad)
