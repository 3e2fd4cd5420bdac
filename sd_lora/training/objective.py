"""The training objective: the denoising loss of one batch, for every prediction type a scheduler may ask for."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def diffusion_loss(unet, scheduler, latents, cond, generator, min_snr_gamma=None, noise_offset=0.0) -> torch.Tensor:
    """Per-sample denoising loss: noise the latents at random timesteps, predict what the scheduler's prediction
    type asks (noise, velocity or the clean sample), mean squared error, optionally Min-SNR weighted."""
    b, c = latents.shape[:2]
    noise = torch.randn(latents.shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((b, c, 1, 1), generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
    noise, t = noise.to(latents.device, latents.dtype), t.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    kind = scheduler.config.prediction_type
    target = {"epsilon": lambda: noise, "v_prediction": lambda: scheduler.get_velocity(latents, noise, t),
              "sample": lambda: latents}[kind]()
    pred = unet(noisy, t, encoder_hidden_states=cond).sample
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:
        alpha = scheduler.alphas_cumprod.to(latents.device)[t].float()
        snr = alpha / (1 - alpha)
        weight = snr.clamp(max=min_snr_gamma) / (snr + 1 if kind == "v_prediction" else snr)
        loss = loss * (1.0 if kind == "sample" else weight)
    return loss
