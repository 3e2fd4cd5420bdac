"""Shared test helpers: random adapters shaped like trained ones, and model outputs to compare."""

import torch

from sd_lora.targets import preset_paths
from sd_lora.weights import AdapterWeights, LoRAModule


def random_adapter(pipe, preset="full", rank=4, seed=0, alphas="varied", parts=("unet", "text_encoder"),
                   scale=0.1) -> AdapterWeights:
    """An adapter with random up AND down (a trained-looking one), alphas differing per module when 'varied'."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for part in parts:
        model = getattr(pipe, part)
        for i, path in enumerate(preset_paths(model, part, preset)):
            base = model.get_submodule(path if part == "unet" else _real(model, path))
            if isinstance(base, torch.nn.Conv2d):
                down = torch.randn(rank, base.in_channels, *base.kernel_size, generator=g)
                up = torch.randn(base.out_channels, rank, 1, 1, generator=g)
            else:
                down = torch.randn(rank, base.in_features, generator=g)
                up = torch.randn(base.out_features, rank, generator=g)
            alpha = {"varied": float(1 + i % 5), "none": None}.get(alphas, alphas)
            modules[f"{part}.{path}"] = LoRAModule(down * scale, up * scale, alpha)
    return AdapterWeights(modules, family="sd1", format="kohya")


def with_conv_module(pipe, adapter: AdapterWeights, conv: str, rank: int = 2, seed: int = 0) -> AdapterWeights:
    """`adapter` plus a rank-`rank` update of the kxk conv `conv` ("unet.up_blocks.1.resnets.0.conv2"): a LoCon
    module, as extract --conv-rank should recover."""
    weight = pipe.unet.get_submodule(conv.removeprefix("unet.")).weight
    g = torch.Generator().manual_seed(seed)
    adapter.modules[conv] = LoRAModule(torch.randn(rank, *weight.shape[1:], generator=g) * 0.1,
                                       torch.randn(weight.shape[0], rank, 1, 1, generator=g) * 0.1, float(rank))
    return adapter


def _real(model, path):
    names = dict(model.named_modules())
    return path if path in names else "text_model." + path


def unet_out(pipe, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    ctx = torch.randn(batch, 77, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return pipe.unet(x, 500, encoder_hidden_states=ctx).sample


def te_out(pipe, prompts=("a red circle on a blue background", "a mozart style star")):
    ids = pipe.tokenizer(list(prompts), padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def generate(pipe, prompt="a red circle", seed=0, steps=3, **kw):
    return pipe(prompt, num_inference_steps=steps, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(seed), **kw).images
