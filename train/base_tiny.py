"""Train the built-in "tiny" model from scratch on generated scenes: the VAE first, then the UNet.

    HF_HUB_OFFLINE=1 python train/base_tiny.py                     # the shipped weights (see the model card)
    HF_HUB_OFFLINE=1 python train/base_tiny.py --quick --out /tmp/t # a smoke run: a few steps, loadable weights

Everything comes from one seed: the scenes (sd_lora.training.shapes, "train" split only, so the benchmark's
held-out combinations are never seen), the captions (paraphrased), the initial weights and the noise. The text
encoder is trained jointly with the UNet, starting from the same fixed-seed init that load_pipeline("tiny") uses.

Output: the configs of sd_lora/models/tiny with fp16 weights next to them (diffusion_pytorch_model.safetensors for
unet and vae, model.safetensors for text_encoder), each written to a temporary file and renamed into place, so a
crash never leaves a half-written model. The VAE's scaling_factor is measured on the data (1 / latent std) and
written into vae/config.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: make `sd_lora` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

from sd_lora.pipeline import TINY_DIR, TINY_SEED
from sd_lora.training import shapes
from sd_lora.training.clutter import clutter_images

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=TINY_DIR, help="model folder to write (default: the shipped one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=6000, help="number of generated training scenes")
    p.add_argument("--clutter", type=int, default=4000,
                   help="generic pictures (any color, texture, border) added to the VAE's data; the UNet never sees them")
    p.add_argument("--vae-steps", type=int, default=5000)
    p.add_argument("--vae-from", type=Path, default=None,
                   help="take the VAE from this model folder (an earlier run's --out) and train only the UNet")
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--unet-steps", type=int, default=7000)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--uncond", type=float, default=0.1, help="caption dropout, for classifier-free guidance")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 is fastest on a busy 2-core machine (2 threads spin-wait on each other)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="safety stop for the UNet stage on a slow machine (the log says where it stopped)")
    p.add_argument("--quick", action="store_true", help="smoke run: 64 images, 3 steps per stage")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.clutter, args.vae_steps, args.unet_steps, args.vae_batch, args.unet_batch = 64, 64, 3, 3, 8, 8
    return args


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_models(config_dir: Path):
    """UNet, VAE and text encoder from the configs, with load_pipeline's fixed-seed init (no shipped weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
    tokenizer = CLIPTokenizer.from_pretrained(config_dir / "tokenizer")
    return unet, vae, text_encoder, tokenizer


def as_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], as the pipeline's VAE sees pictures."""
    return torch.from_numpy(np.asarray(images, np.float32)).permute(0, 3, 1, 2).div(127.5).sub(1.0)


def make_data(n: int, seed: int):
    """n training scenes: images as a float tensor in [-1, 1] (N, 3, 64, 64) and the scenes themselves."""
    rng = random.Random(seed)
    scenes = [shapes.random_scene(rng, split="train") for _ in range(n)]
    return as_tensor(np.stack([np.asarray(shapes.render(s, 64)) for s in scenes])), scenes


def edge_loss(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between horizontal and vertical pixel differences: penalises the soft corners and blurred outlines a
    plain reconstruction loss tolerates (what makes squares come out rounded and stars come out as blobs)."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]
    return F.l1_loss(dx(rec), dx(x)) + F.l1_loss(dy(rec), dy(x))


def cosine_lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(vae, images: torch.Tensor, args, gen: torch.Generator) -> None:
    """Reconstruction (L1 + MSE + edges) with a tiny KL term: the latents stay close to a deterministic code the
    UNet can model, and the decoder learns the sharp, flat-colored world exactly. `images` holds the scenes and
    the generic pictures of `clutter.py`, so the decoder can also draw what the scenes never show."""
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(args.vae_steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.vae_steps, args.vae_lr)
        x = images[torch.randint(len(images), (args.vae_batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + edge_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.vae_steps - 1:
            log(f"vae step {step}/{args.vae_steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    vae.eval()


@torch.no_grad()
def encode_all(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for chunk in images.split(256):
        post = vae.encode(chunk).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    # Exactly what StableDiffusionPipeline.encode_prompt does: pad to model_max_length (77).
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def train_unet(unet, text_encoder, tokenizer, latents, latent_std, scenes, scale: float, args, gen, rng) -> None:
    """Epsilon prediction on the scheduler's own noise schedule, min-SNR(5) weighting, caption dropout for CFG."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(DDPMScheduler.load_config(args.config_dir / "scheduler"))
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=5.0) / snr
    unet.train()
    text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=1e-2)
    t0 = time.time()
    for step in range(args.unet_steps):
        if args.max_minutes and time.time() - args.start > 60 * args.max_minutes:
            log(f"unet stage stopped by --max-minutes at step {step}/{args.unet_steps}")
            break
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.unet_steps, args.unet_lr, warmup=200)
        idx = torch.randint(len(latents), (args.unet_batch,), generator=gen)
        z0 = (latents[idx] + latent_std[idx] * torch.randn(latents[idx].shape, generator=gen)) * scale
        texts = ["" if rng.random() < args.uncond else shapes.caption(scenes[i], rng) for i in idx.tolist()]
        cond = text_encoder(tokenize(tokenizer, texts))[0]
        t = torch.randint(0, sched.config.num_train_timesteps, (args.unet_batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        pred = unet(sched.add_noise(z0, noise, t), t, cond).sample
        loss = ((pred - noise) ** 2).mean(dim=(1, 2, 3)).mul(weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == args.unet_steps - 1:
            log(f"unet step {step}/{args.unet_steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    unet.eval()
    text_encoder.eval()


def save_fp16(module: torch.nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """fp16 safetensors, written next to the target and renamed into place (atomic on one file system)."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)  # safetensors writes 0600; these files ship in the package
    os.replace(tmp, path)


def write_model(out: Path, config_dir: Path, unet, vae, text_encoder, scale: float, metadata: dict[str, str]):
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != config_dir.resolve():  # a fresh folder: copy the configs and tokenizer first
        shutil.copy2(config_dir / "model_index.json", out / "model_index.json")
        for part in COMPONENTS:
            shutil.copytree(config_dir / part, out / part, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.safetensors"))
    vae_cfg = json.loads((config_dir / "vae" / "config.json").read_text())
    vae_cfg["scaling_factor"] = round(scale, 5)
    tmp = out / "vae" / "config.json.tmp"
    tmp.write_text(json.dumps(vae_cfg, indent=2) + "\n")
    os.replace(tmp, out / "vae" / "config.json")
    save_fp16(unet, out / "unet" / "diffusion_pytorch_model.safetensors", metadata)
    save_fp16(vae, out / "vae" / "diffusion_pytorch_model.safetensors", metadata)
    save_fp16(text_encoder, out / "text_encoder" / "model.safetensors", metadata)


def main(argv=None) -> int:
    args = parse(argv)
    args.config_dir = TINY_DIR
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    rng = random.Random(args.seed)
    start = args.start = time.time()

    unet, vae, text_encoder, tokenizer = build_models(args.config_dir)
    images, scenes = make_data(args.images, args.seed)
    if args.vae_from:
        from safetensors.torch import load_file

        vae.load_state_dict({k: v.float() for k, v in load_file(args.vae_from / "vae" /
                                                                 "diffusion_pytorch_model.safetensors").items()})
        vae.eval()
        log(f"{len(images)} training scenes rendered; VAE taken from {args.vae_from}")
    else:
        generic = as_tensor(clutter_images(args.clutter, args.seed))
        log(f"{len(images)} training scenes and {len(generic)} generic pictures rendered")
        train_vae(vae, torch.cat([images, generic]), args, gen)
        del generic
    vae.requires_grad_(False)
    with torch.no_grad():
        rec = vae.decode(vae.encode(images[:256]).latent_dist.mean).sample
    log(f"vae reconstruction mean abs error {(rec - images[:256]).abs().mean().item() * 127.5:.2f} / 255")
    means, stds = encode_all(vae, images)
    scale = 1.0 / means.std().item()
    log(f"latent std {means.std().item():.4f} -> scaling_factor {scale:.5f}; posterior std {stds.mean():.4f}")

    train_unet(unet, text_encoder, tokenizer, means, stds, scenes, scale, args, gen, rng)
    minutes = (time.time() - start) / 60
    metadata = {"sd_lora.trained_by": "train/base_tiny.py", "sd_lora.seed": str(args.seed),
                "sd_lora.args": json.dumps({k: str(v) for k, v in vars(args).items()}, sort_keys=True)}
    write_model(args.out, args.config_dir, unet, vae, text_encoder, scale, metadata)
    log(f"wrote {args.out} after {minutes:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
