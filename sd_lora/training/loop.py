"""The training pass behind train/style.py. Read `train` and `Trainer` top to bottom, as nanoGPT's train.py:

    check flags and images -> load the model -> buckets -> class images -> LoRA -> caches -> optimizer -> [resume]
    -> steps (loss, backward, clip, optimizer, log; samples and checkpoints now and then) -> adapter file

One optimizer step is --grad-accum batches on each process. Everything random a step uses (timesteps, noise, the
latent sample) comes from one torch.Generator the trainer owns, reseeded from (seed, process, step) at every step, and
batch order is a pure function of (seed, position), so a CPU run is reproducible bit for bit, and so is a killed run
resumed from a checkpoint, with any number of processes.

Several processes (`accelerate launch --multi_gpu`) each train on their share of the batches and average the LoRA
gradients before every optimizer step, a few MB; nothing here wraps models, so sampling and export use the very
modules that train. Only the main process writes files.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from sd_lora.training import checkpoint, host_memory, prepare, report, run_folder
from sd_lora.training.buckets import BucketSampler, assign_buckets, bucket_counts, bucket_info
from sd_lora.training.caches import (
    LatentCache,
    LiveLatents,
    TextCache,
    encode_text,
    sample_latents,
    tokenize,
)
from sd_lora.training.config import TrainConfig, TrainingError, UsageError, say
from sd_lora.training.data import scan_images, tag_frequency
from sd_lora.training.objective import diffusion_loss

NAN_LIMIT = 10  # this many NaN/Inf steps in a row stop the run
SAMPLE_STEPS = 25  # denoising steps for sample images


def train(config: TrainConfig, pipe=None) -> dict:
    """Train the LoRA `config` describes and write it. `pipe`: an already-loaded base pipeline to use instead of
    loading config.model. Returns a summary: adapter path, losses per step, skipped steps, seconds."""
    cfg = config.resolved()
    prepare.check_extras(cfg)
    main = os.environ.get("RANK", "0") == "0"
    run_folder.check_apart(cfg)
    records = scan_images(cfg.images, caption=cfg.prompt, token=cfg.token,  # before any model loads
                          exclude=cfg.written_folders(), **({} if main else {"warn": None}))
    dataset = run_folder.fingerprint(cfg)  # what run.json records as trained on: the files scanned just now
    resume_from = run_folder.check_output(cfg, dataset)  # another run there, nothing to resume: before loading too
    run_folder.check_writable(cfg)
    pipe = pipe or prepare.load_model(cfg.model)
    accelerator = prepare.make_accelerator(cfg, notice=main)
    on_cpu, lock = accelerator.device.type == "cpu", None
    if on_cpu:  # each step reuses the last one's buffers instead of faulting fresh pages in (~20% of an SD1.5 step)
        host_memory.keep_freed_memory()
    try:
        if main:  # held until the run ends: a second run in this folder is refused, not mixed in
            lock = run_folder.OutputLock(Path(cfg.output))
            run_folder.check_folder(cfg, dataset)  # again, under the lock: another run may have written meanwhile
        result = _train(cfg, records, dataset, resume_from, accelerator, pipe)
        accelerator.end_training()
        return result
    finally:
        if lock is not None:
            lock.release()
        if on_cpu:
            host_memory.release_free_memory()
        for tracker in accelerator.trackers:
            tracker.finish()
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state()  # so a later train() in this process may pick another precision
        GradientState._reset_state()


def _train(cfg: TrainConfig, records, dataset: dict, resume_from, accelerator, pipe) -> dict:
    started, main, out = time.time(), accelerator.is_main_process, Path(cfg.output)
    resolution = cfg.resolution or prepare.native_resolution(pipe)
    prepare.warn_sizes(cfg, pipe, notice=main)  # a --resolution or --rank far beyond what the model can use
    records = assign_buckets(records, resolution)
    pipe.to(accelerator.device)
    pipe.to(dtype=prepare.weight_dtype(accelerator))  # frozen weights: fp16/bf16 when mixed, else fp32 (LoRA: fp32)
    class_records = prepare.class_images(cfg, pipe, resolution, accelerator) if cfg.prior_preservation else []
    trainer = Trainer(cfg, pipe, records, class_records, accelerator, resolution)
    if resume_from is not None:
        trainer.resume(resume_from)
    if main:  # the run takes the folder over only now that everything has loaded
        if cfg.overwrite or run_folder.abandoned(out):  # a run killed before its first checkpoint left nothing
            run_folder.clear_previous_run(out, cfg.name)
        checkpoint.remove_stale(out)
        if resume_from is not None:  # going back to an earlier checkpoint drops the later ones
            checkpoint.drop_after(out, trainer.state.step)
        run_folder.write_run(cfg, dataset, started=started)
    first = trainer.state.step
    accelerator.init_trackers("sd-lora", config={k: report.loggable(v) for k, v in run_folder.identity(cfg).items()})
    if main:
        print(report.screen("sd-lora: training a style LoRA", trainer.start_rows(resume_from)), flush=True)
        prepare.warn_long_captions(pipe.tokenizer, [r.caption for r in records + class_records])
    bar, step_seconds = prepare.progress_bar(trainer.total_steps, first, disable=not main), 0.0
    with bar:  # closed on Ctrl-C or an error too, so what is printed next starts on a line of its own
        while trainer.state.step < trainer.total_steps:
            tick = time.perf_counter()
            loss = trainer.step()
            step_seconds += time.perf_counter() - tick
            step, lr = trainer.state.step, trainer.lr_scheduler.get_last_lr()[0]
            accelerator.log({"loss": loss, "lr": lr} if loss is not None else {"lr": lr}, step=step)
            bar.set_postfix(loss="nan" if loss is None else f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
            if cfg.sample_every and step % cfg.sample_every == 0 and step < trainer.total_steps:
                trainer.save_samples()
            if cfg.save_every and step % cfg.save_every == 0 and step < trainer.total_steps:
                trainer.save_checkpoint(started)
    preview = trainer.save_samples()
    trainer.save_checkpoint(started)
    adapter = out / f"{cfg.name}.safetensors"
    if main:
        written = trainer.write_outputs(adapter, preview, started)
        rows = report.end_rows(seconds=time.time() - started, step_seconds=step_seconds,
                               trained_steps=trainer.state.step - first, losses=trainer.state.losses,
                               images_per_step=trainer.images_per_step, skipped=trainer.state.skipped,
                               adapter=adapter, extra_files=written,
                               peak_memory=prepare.peak_memory(accelerator.device))
        print(report.screen(f"sd-lora: done, {adapter}", rows), flush=True)
    accelerator.wait_for_everyone()
    return {"adapter": adapter, "output": out, "steps": trainer.state.step, "losses": list(trainer.state.losses),
            "skipped": trainer.state.skipped, "seconds": time.time() - started}


class Trainer:
    """Everything an optimizer step needs, built once: the model with its LoRA, the data, the optimizer and schedule,
    and the generator. `step()` is the training step; the rest saves what the run shows and keeps."""

    def __init__(self, cfg: TrainConfig, pipe, records, class_records, accelerator, resolution: int):
        from diffusers import DDPMScheduler

        import sd_lora

        self.cfg, self.pipe, self.accelerator, self.resolution = cfg, pipe, accelerator, resolution
        self.records, self.class_records, self.device = records, class_records, accelerator.device
        for model in (pipe.unet, pipe.text_encoder, pipe.vae):  # from_pretrained leaves every weight trainable
            model.requires_grad_(False)
        if cfg.attention == "xformers":
            pipe.unet.enable_xformers_memory_efficient_attention()
        self.lora = sd_lora.attach(pipe, mode="live")  # live: nothing is folded while the weights train
        params = self.lora.add_trainable(cfg.name, cfg.rank, cfg.alpha, preset=cfg.targets,
                                         text_encoder=cfg.text_encoder, seed=cfg.seed)
        self.train_te = "text_encoder" in params
        self.params = [p for group in params.values() for p in group]
        self.models = [pipe.unet] + ([pipe.text_encoder] if self.train_te else [])
        for model in self.models:
            model.train()
        if cfg.gradient_checkpointing:
            prepare.checkpoint_activations(pipe.unet, pipe.text_encoder if self.train_te else None)
        # --compile: the step calls compiled wrappers of the same modules; sampling and export use the modules as
        # they are
        if cfg.compile:
            prepare.allow_recompiles(records, class_records)
        self.unet = prepare.compile_model(pipe.unet, self.device) if cfg.compile else pipe.unet
        self.text_encoder = (prepare.compile_model(pipe.text_encoder, self.device) if cfg.compile and self.train_te
                             else pipe.text_encoder)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.token_ids: dict[str, torch.Tensor] = {}

        # Data: latents cached once (or encoded every step), text embeddings cached when the encoder is frozen.
        if cfg.cache:  # main first: with --cache-dir it writes the files the other processes then read
            with accelerator.main_process_first():
                self._cache_latents(cfg, pipe, records, class_records)
        else:
            self.latents = LiveLatents(records, pipe.vae)
            self.class_latents = LiveLatents(class_records, pipe.vae) if class_records else None
        captions = [r.caption for r in records + class_records]
        self.texts = TextCache(captions, pipe.tokenizer, pipe.text_encoder) if cfg.cache and not self.train_te else None
        self.sample_embeds = None if self.train_te else self._sample_embeddings()
        if cfg.cache and self.device.type != "cpu":  # the VAE and a frozen text encoder leave the GPU
            pipe.vae.to("cpu")
            if self.texts is not None:
                pipe.text_encoder.to("cpu")
            torch.cuda.empty_cache()

        world, rank = accelerator.num_processes, accelerator.process_index
        self.sampler = BucketSampler([r.bucket for r in records], cfg.batch_size, cfg.seed, cfg.flip, rank=rank,
                                     world_size=world)
        self.class_sampler = BucketSampler([r.bucket for r in class_records], cfg.batch_size, cfg.seed + 1,
                                           cfg.flip, rank=rank, world_size=world) if class_records else None
        # a bucket's last batch may be smaller than --batch-size: the mean over an epoch
        self.images_per_step = len(records) / len(self.sampler) * cfg.grad_accum * world
        self.state = checkpoint.TrainState(self.models, cfg.seed, rank, batches_per_step=cfg.grad_accum * world)
        self.total_steps = self._total_steps()

        if not params.get("unet"):
            raise UsageError(f"--targets {cfg.targets}: no module of this model's UNet matches")
        groups = [{"params": params["unet"], "lr": cfg.lr}]
        if self.train_te:
            groups.append({"params": params["text_encoder"], "lr": cfg.te_lr})
        self.optimizer = accelerator.prepare(prepare.make_optimizer(cfg.optimizer, groups))
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer.optimizer, prepare.lr_factor(cfg.lr_scheduler, cfg.warmup_steps, self.total_steps))
        self.restart_batches()

    def _total_steps(self) -> int:
        """--steps, or the steps that make --epochs: those already trained plus enough for the batches left."""
        if self.cfg.epochs is None:
            return self.cfg.steps
        left = max(0.0, self.cfg.epochs * len(self.sampler) - self.state.batches)
        return self.state.step + math.ceil(left / self.state.batches_per_step)

    def planned_batches(self) -> int:
        """Global batches the whole run trains on (those a resumed run's checkpoint trained on included)."""
        return self.state.batches + (self.total_steps - self.state.step) * self.state.batches_per_step

    def _cache_latents(self, cfg, pipe, records, class_records) -> None:
        bar = prepare.progress_bar(len(records + class_records) * (2 if cfg.flip else 1), 0,
                                   desc="caching latents", disable=not self.accelerator.is_main_process)
        kwargs = {"flip": cfg.flip, "cache_dir": cfg.cache_dir, "progress": lambda done, total: bar.update(1)}
        self.latents = LatentCache(records, pipe.vae, **kwargs)
        self.class_latents = LatentCache(class_records, pipe.vae, **kwargs) if class_records else None
        bar.close()

    def restart_batches(self) -> None:
        """Batch iterators positioned after the batches all processes have trained on (0, or a checkpoint's)."""
        done = self.state.batches
        self.batches = self.sampler.iterate(done)
        self.class_batches = self.class_sampler.iterate(done) if self.class_sampler else None

    def resume(self, folder: Path) -> None:
        """Continue from a checkpoint: weights, optimizer, schedule, step and data position. With another number of
        processes than the run that saved it, the data goes on where it stopped but the noise differs from what the
        original run would have drawn; say so."""
        saved = checkpoint.load(self.accelerator, folder, self.state, self.lr_scheduler)
        self.restart_batches()
        if self.cfg.epochs is not None and self._total_steps() <= self.state.step:
            raise UsageError(f"--resume: {folder} has trained {self.state.batches / len(self.sampler):.3g} epochs "
                             f"(step {self.state.step}), and --epochs {self.cfg.epochs} leaves nothing to train; "
                             "pass more --epochs to train on")
        if self.cfg.epochs is not None and self._total_steps() != self.total_steps:
            self.total_steps = self._total_steps()
            self.lr_scheduler.lr_lambdas = [prepare.lr_factor(self.cfg.lr_scheduler, self.cfg.warmup_steps,
                                                              self.total_steps)] * len(self.lr_scheduler.lr_lambdas)
        world = self.accelerator.num_processes
        if saved["processes"] != world and self.accelerator.is_main_process:
            was = report.count(saved["processes"], "process", "processes")
            say(f"warning: --resume: {folder} was trained with {was}, this run has {world}: training goes on from "
                "the next batch, but not as the original run would have")

    # ---- the training step --------------------------------------------------------------------------------------
    def step(self) -> float | None:
        """One optimizer step. Returns the loss (mean over the batches and processes), or None when it was NaN/Inf
        and the step was skipped."""
        cfg, acc = self.cfg, self.accelerator
        self.state.begin_step()  # noise and timesteps depend on (seed, process, step) only: resume is exact
        losses = []
        for _ in range(cfg.grad_accum):
            keys = next(self.batches)
            class_keys = next(self.class_batches) if self.class_batches else None
            with acc.autocast():
                loss = self.loss(keys, class_keys)
            acc.backward(loss / cfg.grad_accum)  # through accelerate: fp16 loss scaling
            losses.append(loss.detach().float())
        loss = acc.reduce(torch.stack(losses).mean(), "mean").item()
        finite = math.isfinite(loss)  # the same on every process, so they all skip together
        if finite:
            self.average_gradients()
            if cfg.max_grad_norm:
                acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
            self.optimizer.step()
        with warnings.catch_warnings():  # when the first step is skipped, torch warns that the optimizer did not step
            warnings.simplefilter("ignore", UserWarning)
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.record(loss if finite else float("nan"))
        if self.state.streak >= NAN_LIMIT:
            raise TrainingError(f"the loss was NaN or Inf for {NAN_LIMIT} steps in a row (up to step "
                                f"{self.state.step}); lower --lr, keep --max-grad-norm on, or try "
                                "--mixed-precision bf16 or no")
        return loss if finite else None

    def loss(self, keys, class_keys=None) -> torch.Tensor:
        """The batch's diffusion loss, plus the prior-preservation loss on a class batch (a second pass)."""
        loss = self.pass_loss(self.latents, self.records, keys)
        if class_keys is not None:
            loss = loss + self.cfg.prior_weight * self.pass_loss(self.class_latents, self.class_records, class_keys)
        return loss

    def pass_loss(self, source, records, keys) -> torch.Tensor:
        latents = sample_latents(source.params(keys).to(self.device), self.pipe.vae.config, self.state.generator)
        cond = self.condition([records[i].caption for i, _ in keys])
        return diffusion_loss(self.unet, self.noise_scheduler, latents, cond, self.state.generator,
                              self.cfg.min_snr_gamma, self.cfg.noise_offset).mean()

    def condition(self, captions: list[str]) -> torch.Tensor:
        if self.train_te:  # the encoder changes every step; its input does not
            for c in captions:
                if c not in self.token_ids:
                    self.token_ids[c] = tokenize(self.pipe.tokenizer, [c])
            return encode_text(self.text_encoder, torch.cat([self.token_ids[c] for c in captions]))
        if self.texts is not None:
            return self.texts(captions).to(self.device)
        with torch.no_grad():  # each caption on its own, exactly as the cache encodes them
            return torch.cat([encode_text(self.text_encoder, tokenize(self.pipe.tokenizer, [c])) for c in captions])

    def average_gradients(self) -> None:
        """Average the LoRA gradients over the processes: one all-reduce of a few MB per optimizer step."""
        if self.accelerator.num_processes == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), "mean")
        for p, chunk in zip(self.params, flat.split([g.numel() for g in grads])):
            p.grad = chunk.view_as(p).clone()

    # ---- what the run shows and keeps ---------------------------------------------------------------------------
    def _sample_embeddings(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        te, tok = self.pipe.text_encoder, self.pipe.tokenizer
        with torch.no_grad():
            empty = encode_text(te, tokenize(tok, [""]))
            return [(encode_text(te, tokenize(tok, [p])), empty) for p in self.cfg.sample_prompts]

    @torch.no_grad()
    def save_samples(self):
        """Images for the sample prompts (seeds seed, seed+1, ...) as a grid under <output>/samples and in
        TensorBoard. The UNet runs as it trains (frozen low-precision weights, fp32 LoRA): nothing is cast."""
        self.check_weights()  # a diverged run stops here, before it draws NaN images
        if not self.accelerator.is_main_process:
            self.accelerator.wait_for_everyone()
            return None
        pipe, vae_device = self.pipe, self.pipe.vae.device
        pipe.vae.to(self.device)
        for model in self.models:
            model.eval()
        with self.accelerator.autocast():
            images = [pipe(prompt_embeds=embeds.to(self.device), negative_prompt_embeds=empty.to(self.device),
                           height=self.resolution, width=self.resolution, num_inference_steps=SAMPLE_STEPS,
                           generator=torch.Generator().manual_seed(self.cfg.seed + i)).images[0]
                      for i, (embeds, empty) in enumerate(self.sample_embeds or self._sample_embeddings())]
        for model in self.models:
            model.train()
        pipe.vae.to(vae_device)
        sheet = report.grid(images)
        prepare.write_png(Path(self.cfg.output) / "samples" / f"step-{self.state.step:06d}.png", sheet)
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"samples": np.stack([np.asarray(i) for i in images])}, self.state.step,
                                   dataformats="NHWC")
        self.accelerator.wait_for_everyone()
        return images[0]

    def check_weights(self) -> None:
        """Raise TrainingError if the LoRA weights cannot make a usable fp16 adapter (NaN/Inf, or beyond fp16's range:
        a diverged run). Every process holds the same weights, so all raise together, before any collective save."""
        peak = float(torch.stack([p.detach().abs().max() for p in self.params]).max())  # one device sync
        if not math.isfinite(peak) or peak > torch.finfo(torch.float16).max:
            problem = "hold NaN or Inf" if not math.isfinite(peak) else f"reached {peak:.3g}, beyond fp16's 65504"
            raise TrainingError(f"the LoRA weights {problem} at step {self.state.step}: the run diverged and its "
                                "adapter would be unusable; lower --lr and keep --max-grad-norm on")

    def save_checkpoint(self, started: float) -> None:
        """The accelerate state and the adapter so far; `started`: when this run (this process) started."""
        self.check_weights()
        step, name = self.state.step, self.cfg.name
        checkpoint.save(self.accelerator, self.cfg.output, step, self.cfg.keep_checkpoints,
                        lambda folder: self._save_adapter(folder / f"{name}.safetensors", started),
                        self.state, self.lr_scheduler)

    def _save_adapter(self, path: Path, started: float) -> None:
        import sd_lora

        tags, buckets = ((tag_frequency(self.records, self.cfg.images), bucket_info(self.records))
                         if self.cfg.dataset_metadata else (None, None))
        metadata = report.adapter_metadata(
            self.cfg, resolution=self.resolution, images=len(self.records), class_images=len(self.class_records),
            steps=self.state.step, epochs=self.state.batches / len(self.sampler), started=started,
            finished=time.time(), precision=self.accelerator.mixed_precision,
            processes=self.accelerator.num_processes, tag_frequency=tags, bucket_info=buckets,
            prediction_type=self.noise_scheduler.config.prediction_type)
        sd_lora.save_adapter(self.lora.export(self.cfg.name), path, format="kohya", metadata=metadata)

    def write_outputs(self, adapter: Path, preview, started: float) -> list[Path]:
        """The adapter (kohya, fp16, with metadata) and what travels with it. Returns the extra files written."""
        import sd_lora
        from sd_lora.adapter import atomic_write_bytes
        from sd_lora.formats.detect import model_family

        out, name = adapter.parent, self.cfg.name
        self._save_adapter(adapter, started)
        written = [out / f"{name}.preview.png", out / "loss.png", out / f"{name}.json"]
        prepare.write_png(written[0], preview)
        prepare.write_png(written[1], report.loss_plot(self.state.losses, f"{name}: loss per step"))
        atomic_write_bytes(written[2], json.dumps(report.sidecar(self.cfg, model_family(self.pipe.unet)),
                                                  indent=1).encode())
        if self.cfg.save_format == "diffusers":
            written.append(out / "diffusers" / "pytorch_lora_weights.safetensors")
            sd_lora.save_adapter(self.lora.export(name), written[-1], format="diffusers")
        return written

    def start_rows(self, resume_from) -> list:
        modules = self.lora.adapters[self.cfg.name].modules
        frozen = sum(p.nbytes for m in (self.pipe.unet, self.pipe.text_encoder, self.pipe.vae)
                     for p in m.parameters() if not p.requires_grad)
        text = ("trained: the text encoder runs every step" if self.train_te else
                "text embeddings cached" if self.texts is not None else "text encoder runs every step (frozen)")
        where = f"on disk in {self.cfg.cache_dir}" if self.cfg.cache_dir else "in RAM"
        latents = (f"latents of {len(self.records) + len(self.class_records)} images cached {where}"
                   f"{' (both flips)' if self.cfg.flip else ''}" if self.cfg.cache else "off: the VAE encodes every step")
        return report.start_rows(
            self.cfg, images=len(self.records), buckets=bucket_counts(self.records),
            sidecars=sum(1 for r in self.records if r.sidecar is not None),
            class_images=len(self.class_records), steps=self.total_steps, start_step=self.state.step,
            epochs=self.planned_batches() / len(self.sampler), processes=self.accelerator.num_processes,
            images_per_step=self.images_per_step, modules=modules,
            trainable=sum(p.numel() for p in self.params), precision=prepare.precision_text(self.accelerator),
            device=str(self.device), frozen_bytes=frozen, caching=f"{latents}; {text}",
            resume=str(resume_from) if resume_from else None)
