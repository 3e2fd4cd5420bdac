"""The peers bench/train_step.py measures our training step against: a reference step written the way diffusers'
examples/dreambooth/train_dreambooth_lora.py trains (PEFT LoRA, the VAE and text encoder run every step), and a
full fine-tuning step of the same UNet. See bench/train_step.py's docstring for what each does and why."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sd_lora.training.caches import sample_latents

RANK = 4


class Reference:
    """One step as diffusers' train_dreambooth_lora.py takes it with --train_text_encoder: read + transform the
    image(s), VAE-encode, tokenize, PEFT LoRA forward, backward, clip, AdamW, scheduler. With `precision` fp16/bf16
    (GPU) it does what that script does under accelerate's mixed precision: frozen weights in the low precision (the
    caller casts the pipeline), LoRA parameters upcast to fp32, the forward under autocast, fp16 loss scaling. On the
    CPU in fp32 the accelerator's wrapping is the identity, so none of that applies."""

    def __init__(self, pipe, unet, folder: Path, resolution: int, prompt: str, train_text_encoder: bool = True,
                 batch: int = 1, precision: str = "no", copy_text_encoder: bool = True):
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler
        from peft import LoraConfig

        self.pipe, self.unet, self.vae, self.size, self.batch_size = pipe, unet, pipe.vae, resolution, batch
        self.device = unet.device
        # A copy when ours shares the pipeline (it puts its LoRA layers into the original).
        self.text_encoder = copy.deepcopy(pipe.text_encoder) if copy_text_encoder else pipe.text_encoder
        self.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                         target_modules=r".*attn2\.(to_q|to_k|to_v|to_out\.0)"))
        if train_text_encoder:
            self.text_encoder.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                                     target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
            self.text_encoder.train()
        self.unet.train()
        self.params = [p for m in (self.unet, self.text_encoder) for p in m.parameters() if p.requires_grad]
        for p in self.params:  # diffusers' cast_training_params: trainable LoRA weights in fp32
            p.data = p.data.float()
        groups = [{"params": [p for p in self.unet.parameters() if p.requires_grad], "lr": 1e-4}]
        if train_text_encoder:
            groups.append({"params": [p for p in self.text_encoder.parameters() if p.requires_grad], "lr": 5e-5})
        self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.lr_scheduler = get_scheduler("constant", optimizer=self.optimizer)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.files, self.prompt, self.index = sorted(folder.glob("*.png")), prompt, 0
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None

    def image(self) -> torch.Tensor:
        """DreamBoothDataset.__getitem__: open, RGB, Resize (bilinear), CenterCrop, ToTensor, Normalize."""
        image = Image.open(self.files[self.index % len(self.files)]).convert("RGB")
        self.index += 1
        w, h = image.size
        scale = self.size / min(w, h)
        image = image.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR)
        left, top = (image.width - self.size) // 2, (image.height - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (pixels - 0.5) / 0.5

    def batch(self):
        """The collate_fn: stacked images and the tokenized prompt per image."""
        pixels = torch.stack([self.image() for _ in range(self.batch_size)])
        ids = self.pipe.tokenizer([self.prompt] * self.batch_size, truncation=True, padding="max_length",
                                  max_length=self.pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
        return pixels.to(self.device, self.vae.dtype), ids.to(self.device)

    def step(self) -> float:
        pixel_values, input_ids = self.batch()
        model_input = self.vae.encode(pixel_values).latent_dist.sample() * self.vae.config.scaling_factor
        noise = torch.randn_like(model_input)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (model_input.shape[0],),
                                  device=self.device)
        noisy_model_input = self.noise_scheduler.add_noise(model_input, noise, timesteps)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            encoder_hidden_states = self.text_encoder(input_ids)[0]
            model_pred = self.unet(noisy_model_input, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        return loss.item()

    def close(self) -> None:
        self.unet.unload_lora()
        self.unet.eval()
        del self.text_encoder


class FullFineTune:
    """A step that trains every UNet weight on the same cached latents and text embedding as ours. `in_backward`:
    apply AdamW to each weight as its gradient arrives, moments in scratch buffers (see the module docstring)."""

    def __init__(self, pipe, unet, latents, text, in_backward: bool):
        from diffusers import DDPMScheduler

        self.unet, self.vae_config, self.latents, self.text = unet, pipe.vae.config, latents, text
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.params = [p for p in self.unet.parameters()]
        self.unet.requires_grad_(True).train()
        self.generator, self.hooks, self.optimizer, self.t = torch.Generator().manual_seed(0), [], None, 0
        if in_backward:
            biggest = max(p.numel() for p in self.params)
            self.m, self.v = torch.zeros(biggest), torch.zeros(biggest)
            self.hooks = [p.register_post_accumulate_grad_hook(self._adamw) for p in self.params]
        else:
            self.optimizer = torch.optim.AdamW(self.params, lr=1e-5, weight_decay=1e-2, fused=True)

    def _adamw(self, p, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2) -> None:
        """torch's single-tensor AdamW update, then the gradient is freed."""
        with torch.no_grad():
            g, n = p.grad, p.numel()
            m, v = self.m[:n].view_as(p), self.v[:n].view_as(p)
            step = self.t + 1
            p.mul_(1 - lr * weight_decay)
            m.lerp_(g, 1 - betas[0])
            v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
            denom = (v.sqrt() / (1 - betas[1] ** step) ** 0.5).add_(eps)
            p.addcdiv_(m, denom, value=-lr / (1 - betas[0] ** step))
        p.grad = None

    def step(self) -> float:
        latents = sample_latents(self.latents, self.vae_config, self.generator)
        noise = torch.randn(latents.shape, generator=self.generator)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (1,), generator=self.generator)
        pred = self.unet(self.noise_scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=self.text).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        if self.optimizer is not None:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.t += 1 if self.hooks else 0
        return loss.item()

    def memory(self) -> int:
        if self.optimizer is None:  # what a real full fine-tune holds: fp32 gradient + exp_avg + exp_avg_sq
            return sum(p.numel() for p in self.params) * 12
        return sum(p.numel() * p.element_size() for p in self.params) + state_bytes(self.optimizer)

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.unet.requires_grad_(False).eval()
        for p in self.params:
            p.grad = None


def state_bytes(optimizer) -> int:
    return sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
