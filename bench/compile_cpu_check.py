"""Does torch.compile (inductor) compute the right LoRA gradients on the CPU with its default settings?

With torch 2.13.0+cpu it does not: the tiny UNet with cross-attention LoRA, compiled whole, gives exactly zero
gradients to the mid block's cross-attention LoRA and gradients 4-18% off (varying from run to run) to the down
blocks' LoRA, as soon as encoder_hidden_states requires grad (as when the text encoder trains). Outputs match eager
to 2e-6. What was ruled out on 2026-11-24 (bench/RESULTS.md, train_gpu):
- correct: backend "aot_eager_decomp_partition" (so decompositions and the partitioner are fine), and inductor with
  max_fusion_size=2 (so it is a fusion in inductor's CPU code), and each transformer block compiled on its own;
- still wrong: allow_buffer_reuse/inplace_buffers off, split_reductions off, loop_ordering_after_fusion off,
  loop_index_inversion_in_fusion off, epilogue/prologue fusion off, cpp.simdlen=1, pattern_matcher off.

So the trainer's --compile caps fusion on the CPU (sd_lora.training.prepare.CPU_COMPILE_OPTIONS), which gives eager's
gradients at the same speed; tests/test_training_compile.py checks that. This script is the bug report's repro:
exit code 0 when every gradient matches eager with the option given (default: none, inductor as it comes), 1
otherwise.

    python bench/compile_cpu_check.py                        # about 1.5 minutes with a cold inductor cache
    python bench/compile_cpu_check.py --max-fusion-size 2    # the trainer's setting: exit 0
"""

from __future__ import annotations

import argparse
import sys

import torch

import sd_lora


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-fusion-size", type=int, help="inductor's max_fusion_size (default: its own, 64)")
    args = parser.parse_args()
    options = {"max_fusion_size": args.max_fusion_size} if args.max_fusion_size else None
    torch.set_num_threads(1)
    pipe = sd_lora.load_pipeline("tiny")
    lora = sd_lora.attach(pipe, mode="live")
    lora.add_trainable("check", rank=4, alpha=4, preset="cross-attn", text_encoder=False, seed=0)
    unet = pipe.unet.train()
    named = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g).requires_grad_(True)
    weight = torch.randn(1, 4, 8, 8, generator=g)

    def gradients(model):
        for _, p in named:
            p.grad = None
        out = model(x, t, encoder_hidden_states=ctx).sample
        (out * weight).sum().backward()
        return out.detach(), [p.grad.clone() for _, p in named]

    eager_out, eager = gradients(unet)
    compiled_out, compiled = gradients(torch.compile(unet, dynamic=False, options=options))
    print(f"torch {torch.__version__}: outputs differ by {float((eager_out - compiled_out).abs().max()):.2e}")
    bad = [(n, float((b - a).norm() / a.norm())) for (n, _), a, b in zip(named, eager, compiled)
           if float((b - a).norm()) > 1e-3 * float(a.norm())]
    for name, rel in bad:
        print(f"  wrong gradient: {name} (off by {rel:.1%} of its norm)")
    print(f"{len(bad)} of {len(named)} LoRA gradients wrong" if bad else f"all {len(named)} LoRA gradients match")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
