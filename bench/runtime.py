"""Runtime benchmark: sd_lora against diffusers+PEFT on an SD1.5-architecture UNet (random weights, CPU fp32).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/runtime.py            # ~10 min on 2 quiet CPU cores
    HF_HUB_OFFLINE=1 .venv/bin/python bench/runtime.py --profile  # where our load and fold spend their time

What it measures (issue 2, "Benchmarks"), ours and the peer interleaved in one process (the order rotates every
repetition), medians of per-repetition ratios; minima are printed too, since interference from other jobs on a shared
machine only ever slows a run down:

1. auto mode: 8 rank-16 adapters on attention (attn1+attn2 to_q/to_k/to_v/to_out.0, 128 modules), a 6-step
   "generation" (6 UNet calls, batch 2, 32x32 latent, fixed inputs) right after a weight change, the re-fold included,
   against the bare UNet. Goal: <= 1.03x bare. Peer: the same 8 adapters through diffusers' `load_lora_weights` and
   `set_adapters` (PEFT's live LoRA layers).
2. live mode (mode="live"), same 8 adapters: extra cost over bare. Goal: <= 3/4 of PEFT's extra cost.
3. Loading one rank-16 kohya SD1.5 adapter (kohya's full set: 192 UNet + 72 CLIP-L modules, fp16 file on disk) into a
   ready pipeline: `lora.load(path)` against diffusers' `pipe.load_lora_weights(path)`; each repetition starts from a
   clean pipeline (ours: `lora.remove`, peer: `pipe.unload_lora_weights()`). Goal: <= 1/5 of diffusers' time.
4. The memory folding adds (`Adapters.copy_bytes()`: on the CPU the saved originals are the model's own tensors, the
   folded weights are new ones), in MB and as a fraction of the model.

Every comparison is also checked for correctness: ours and the peer give the same outputs for the same adapters and
weights. A failed check makes the script exit with status 1 after printing the numbers.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (
    clip_l,
    clock,
    machine,
    max_diff,
    median,
    model_bytes,
    random_adapter,
    sd15_pipeline,
    sd15_unet,
    setup,
)

import sd_lora

TIMESTEPS = (999, 833, 666, 500, 333, 166)
RTOL = 1e-4  # max |ours - peer| relative to max |peer|; fp32 with a different summation order
FAILED: list[str] = []


def check(what: str, ours: torch.Tensor, peer: torch.Tensor, base: torch.Tensor | None = None) -> None:
    d, rel = max_diff(ours, peer)
    extra = ""
    if base is not None:
        extra = f"; the adapters move the output by {max_diff(ours, base)[0]:.3g}"
    ok = rel <= RTOL
    print(f"  check {what}: max |ours - peer| = {d:.3g} ({rel:.2g} relative){extra} -> {'ok' if ok else 'FAILED'}")
    if not ok:
        FAILED.append(what)


def generate(unet, latent, ctx, steps):
    """A fixed `steps`-step loop of UNet calls; returns (final latent, per-step seconds)."""
    lat, times = latent.clone(), []
    with torch.no_grad():
        for t in TIMESTEPS[:steps]:
            start = time.perf_counter()
            eps = unet(lat, t, encoder_hidden_states=ctx).sample
            times.append(time.perf_counter() - start)
            lat = lat - 0.1 * eps
    return lat, times


# ---- 3: loading --------------------------------------------------------------------------------------------------
def bench_load(pipe_ours, pipe_peer, folder: Path, reps: int) -> dict:
    print("\n== 3. load one rank-16 kohya adapter (192 UNet + 72 text-encoder modules, fp16) into a ready pipeline")
    w = random_adapter({"unet": pipe_ours.unet, "text_encoder": pipe_ours.text_encoder}, preset="full", rank=16,
                       alpha=8.0, seed=100)
    path = sd_lora.save_adapter(w, folder / "kohya_full_r16.safetensors")  # kohya, fp16: what people share
    counts = {p: sum(k.startswith(p + ".") for k in w.modules) for p in ("unet", "text_encoder")}
    print(f"  file: {path.name}, {path.stat().st_size / 2**20:.1f} MB, modules {counts}")
    lora = sd_lora.attach(pipe_ours)  # a ready pipeline: attached once, like the app does at start-up

    def ours():
        lora.load(path, name="k")

    def ours_clean():
        lora.remove("k")

    def peer():
        pipe_peer.load_lora_weights(str(path), adapter_name="k")

    def peer_clean():
        pipe_peer.unload_lora_weights()

    # warm-up (imports, first-call caches), not timed
    for load, clean in ((ours, ours_clean), (peer, peer_clean)):
        load()
        clean()
    t_ours, t_peer, t_read, t_fold = [], [], [], []
    for r in range(reps):
        pairs = [("ours", ours, ours_clean, t_ours), ("peer", peer, peer_clean, t_peer)]
        for _, load, clean, acc in (pairs if r % 2 == 0 else pairs[::-1]):
            gc.collect()
            acc.append(clock(load)[0])
            clean()
        t_read.append(clock(lambda: sd_lora.read_adapter(path))[0])
        gc.collect()
    # breakdown of ours, and the first fold that auto mode does on the next forward (not part of load)
    lora.load(path, name="k")
    t_fold = clock(lora.merge)[0]
    copy_full = lora.copy_bytes()
    lora.unmerge()

    # correctness: same file, same outputs (UNet at a small input, text encoder on random tokens)
    pipe_peer.load_lora_weights(str(path), adapter_name="k")
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 768, generator=g)
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    with torch.no_grad():
        u_ours = pipe_ours.unet(x, 500, encoder_hidden_states=ctx).sample
        u_peer = pipe_peer.unet(x, 500, encoder_hidden_states=ctx).sample
        te_ours, te_peer = pipe_ours.text_encoder(ids)[0], pipe_peer.text_encoder(ids)[0]
        lora.detach()
        u_bare = pipe_ours.unet(x, 500, encoder_hidden_states=ctx).sample
        te_bare = pipe_ours.text_encoder(ids)[0]
    pipe_peer.unload_lora_weights()
    check("load: UNet output", u_ours, u_peer, u_bare)
    check("load: text-encoder output", te_ours, te_peer, te_bare)

    size = model_bytes(pipe_ours.unet, pipe_ours.text_encoder)
    res = {"ours": median(t_ours), "peer": median(t_peer), "ratio": median(a / b for a, b in zip(t_ours, t_peer)),
           "read": median(t_read), "fold": t_fold, "copy": copy_full, "size": size}
    print(f"  ours lora.load(path):            {_fmt(t_ours)}")
    print(f"    of which read_adapter(path):   {_fmt(t_read)}")
    print(f"  diffusers load_lora_weights:     {_fmt(t_peer)}")
    res["ratio_min"] = min(t_ours) / min(t_peer)
    print(f"  ratio ours/diffusers (median of per-rep ratios): {res['ratio']:.3f}  goal <= 0.200  "
          f"{_verdict(res['ratio'] <= 0.2)}; ratio of minima {res['ratio_min']:.3f} {_verdict(res['ratio_min'] <= 0.2)}")
    print(f"  (not part of load) first fold in auto mode: {t_fold:.3f} s; "
          f"memory added by folding {copy_full / 2**20:.0f} MB = {copy_full / size:.1%} of UNet+text encoder")
    return res


# ---- 1, 2, 4: generation -----------------------------------------------------------------------------------------
class Ours:
    """Puts our pipeline in one of three states: bare (detached), auto or live with the 8 adapters loaded."""

    def __init__(self, pipe, adapters: dict, warm):
        self.pipe, self.adapters, self.lora, self.state, self.warm = pipe, adapters, None, "bare", warm
        self.first_fold: list[float] = []

    def to(self, state: str) -> None:
        if state == self.state:
            return
        if self.lora is not None:
            self.lora.detach()  # every LoRA layer unwrapped, weights restored bit for bit
            self.lora = None
        if state in ("auto", "live"):
            self.lora = sd_lora.attach(self.pipe, mode=state)
            for name, w in self.adapters.items():
                self.lora.load(w, name=name)
            if state == "auto":
                self.first_fold.append(clock(self.lora.merge)[0])
                self.lora.unmerge()
                self.warm()  # steady state: one auto-mode call, so folded weights exist as after any earlier image
        self.state = state


def bench_generation(pipe_ours, pipe_peer, folder: Path, n: int, steps: int, reps: int) -> dict:
    print(f"\n== 1/2/4. {n} rank-16 adapters on attention, {steps}-step generation, batch 2, 32x32 latent")
    models = {"unet": pipe_ours.unet}
    names = [f"a{i}" for i in range(n)]
    ours_w, paths = {}, []
    for i, name in enumerate(names):  # one uniform alpha per file (diffusers collapses per-module alphas)
        w = random_adapter(models, preset="attn", rank=16, alpha=4.0 + 2 * i, seed=i)
        paths.append(sd_lora.save_adapter(w, folder / f"{name}.safetensors"))
        ours_w[name] = sd_lora.read_adapter(paths[-1])  # from the same fp16 file the peer reads
    print(f"  adapters: {n} x {len(w.modules)} modules, rank 16, UNet only, fp16 kohya files")
    for name, p in zip(names, paths):
        pipe_peer.load_lora_weights(str(p), adapter_name=name)
    peer_api = "pipe.set_adapters"
    try:
        pipe_peer.set_adapters(names, adapter_weights=[1.0] * n)
    except Exception as e:  # noqa: BLE001 - report which API the peer ran on
        peer_api = f"pipe.unet.set_adapters (pipe.set_adapters raised {type(e).__name__}: {e})"
        pipe_peer.unet.set_adapters(names, weights=[1.0] * n)
    print(f"  peer: pipe.load_lora_weights(file, adapter_name=...) x{n}, then {peer_api}")

    def set_peer(ws):
        if peer_api == "pipe.set_adapters":
            pipe_peer.set_adapters(names, adapter_weights=ws)
        else:
            pipe_peer.unet.set_adapters(names, weights=ws)

    g = torch.Generator().manual_seed(0)
    latent, ctx = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, 768, generator=g)
    ours = Ours(pipe_ours, ours_w, warm=lambda: generate(pipe_ours.unet, latent, ctx, 1))

    def weights_for(rep):  # a new blend each repetition, negative and > 1 included
        return [round(0.9 - 0.25 * ((i + rep) % n) + 0.1 * rep, 3) for i in range(n)]

    def run(variant, ws):
        if variant == "bare":
            ours.to("bare")
            return clock(lambda: generate(pipe_ours.unet, latent, ctx, steps))
        if variant in ("auto", "live"):
            ours.to(variant)
            return clock(lambda: (ours.lora.set_weights(dict(zip(names, ws))),
                                  generate(pipe_ours.unet, latent, ctx, steps))[1])
        return clock(lambda: (set_peer(ws), generate(pipe_peer.unet, latent, ctx, steps))[1])

    # warm-up: one UNet call per variant (allocator, oneDNN primitives), not timed
    for variant in ("bare", "auto", "live", "peer"):
        ours.to(variant if variant != "peer" else ours.state)
        with torch.no_grad():
            (pipe_peer.unet if variant == "peer" else pipe_ours.unet)(latent, 999, encoder_hidden_states=ctx)
    variants = ["bare", "auto", "peer", "live"]
    times = {v: [] for v in variants}
    steps_t = {v: [] for v in variants}
    refold: list[float] = []
    outs = {}
    for rep in range(reps):
        ws = weights_for(rep)
        order = variants[rep % 4:] + variants[:rep % 4]
        for v in order:
            gc.collect()
            t, (lat, st) = run(v, ws)
            times[v].append(t)
            steps_t[v].append(st)
            outs[v] = lat
            print(f"  rep {rep} {v:5s} {t:7.2f} s  steps " + " ".join(f"{s:.2f}" for s in st), flush=True)
            if v == "auto":  # profile: a re-fold on its own, after a weight change (outside the timed run)
                ours.lora.set_weights(dict(zip(names, [x + 0.01 for x in ws])))
                refold.append(clock(ours.lora.merge)[0])
                ours.lora.unmerge()
                ours.lora.set_weights(dict(zip(names, ws)))
        # correctness on the last repetition's blend: every variant ran the same inputs and weights
        if rep == reps - 1:
            check("auto vs peer, final latent", outs["auto"], outs["peer"], outs["bare"])
            check("live vs peer, final latent", outs["live"], outs["peer"], outs["bare"])

    ours.to("auto")
    ours.lora.set_weights(dict(zip(names, weights_for(0))))
    ours.lora.merge()
    copy_b = ours.lora.copy_bytes()
    ours.to("bare")
    unet_b = model_bytes(pipe_ours.unet)

    def ratios(v):
        return [a / b for a, b in zip(times[v], times["bare"])]

    bare = median(times["bare"])
    res = {v: median(times[v]) for v in variants}
    res.update({f"{v}_ratio": median(ratios(v)) for v in ("auto", "peer", "live")})
    extra_live = [(a - b) for a, b in zip(times["live"], times["bare"])]
    extra_peer = [(a - b) for a, b in zip(times["peer"], times["bare"])]
    res["live_extra_frac"] = median(extra_live) / median(extra_peer)
    # Interference from other jobs only ever slows a run down, so minima are the noise-robust view: the fastest of
    # the repetitions, and the sum over step positions of each position's fastest step.
    lo = {v: min(times[v]) for v in variants}
    step_lo = {v: sum(min(st[k] for st in steps_t[v]) for k in range(steps)) for v in variants}
    res["robust"] = {name: {"auto": m["auto"] / m["bare"], "peer": m["peer"] / m["bare"],
                            "live_extra_frac": (m["live"] - m["bare"]) / (m["peer"] - m["bare"])}
                     for name, m in (("min of runs", lo), ("sum of per-step minima", step_lo))}
    res["live_extra_frac_per_rep"] = [a / b for a, b in zip(extra_live, extra_peer)]
    res["refold"] = median(refold)
    res["first_fold"] = median(ours.first_fold)
    later = 1 if steps > 1 else 0  # steps after the first (the one that re-folds)
    res["auto_step1_extra"] = median(st[0] - median(st[later:]) for st in steps_t["auto"])
    res["bare_step1_extra"] = median(st[0] - median(st[later:]) for st in steps_t["bare"])
    res["per_step"] = {v: median(s for st in steps_t[v] for s in st[later:]) for v in variants}
    res.update(copy=copy_b, unet_bytes=unet_b, peer_api=peer_api)

    print(f"\n  medians over {reps} reps ({steps} steps each):")
    for v, label in (("bare", "bare UNet"), ("auto", "ours auto (set_weights + re-fold + steps)"),
                     ("live", "ours live"), ("peer", "diffusers+PEFT (set_adapters + steps)")):
        r = "" if v == "bare" else f"  ratio {res[v + '_ratio']:.3f}x bare"
        print(f"    {label:45s} {_fmt(times[v])}{r}")
    print(f"    median step (steps 2..{steps}): " + ", ".join(f"{v} {s:.2f} s" for v, s in res["per_step"].items()))
    print(f"  1. auto/bare = {res['auto_ratio']:.3f}  goal <= 1.030  {_verdict(res['auto_ratio'] <= 1.03)};"
          f"  peer/bare = {res['peer_ratio']:.3f}")
    print(f"     re-fold alone (set_weights + merge, 128 modules): median {res['refold']:.3f} s "
          f"= {res['refold'] / bare:.1%} of a bare {steps}-step run; first step minus later steps: auto "
          f"{res['auto_step1_extra']:+.3f} s, bare {res['bare_step1_extra']:+.3f} s; first-ever fold "
          f"{res['first_fold']:.3f} s")
    print(f"  2. live extra = {median(extra_live):.2f} s, PEFT extra = {median(extra_peer):.2f} s, ours/PEFT = "
          f"{res['live_extra_frac']:.2f} (per rep: {', '.join(f'{x:.2f}' for x in res['live_extra_frac_per_rep'])})"
          f"  goal <= 0.75  {_verdict(res['live_extra_frac'] <= 0.75)}")
    for name, r in res["robust"].items():
        print(f"  noise-robust ({name}): auto/bare {r['auto']:.3f} {_verdict(r['auto'] <= 1.03)}, peer/bare "
              f"{r['peer']:.3f}, live extra / PEFT extra {r['live_extra_frac']:.2f} "
              f"{_verdict(r['live_extra_frac'] <= 0.75)}")
    print(f"  4. memory added by folding (auto mode, {n} adapters on attention): {copy_b / 2**20:.0f} MB = "
          f"{copy_b / unet_b:.1%} of the UNet ({unet_b / 2**20:.0f} MB)")
    return res


def _verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def _fmt(xs) -> str:
    return f"median {median(xs):.3f} s  (all: {', '.join(f'{x:.3f}' for x in xs)})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="repetitions of the generation comparison")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--load-reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", choices=("load", "generation"), action="append", default=[])
    ap.add_argument("--profile", action="store_true", help="only profile our load and fold against alternatives")
    args = ap.parse_args()
    setup(args.threads)
    print(machine())
    t, unet = clock(sd15_unet)
    te = clip_l()
    print(f"built SD1.5 UNet ({sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M params) + CLIP-L in {t:.0f} s; "
          "the peer gets a deep copy (identical weights)")
    pipe_ours = sd15_pipeline(unet, te)
    if args.profile:
        from runtime_profile import profile_costs

        with tempfile.TemporaryDirectory() as tmp:
            profile_costs(pipe_ours, Path(tmp))
        return 0
    pipe_peer = sd15_pipeline(copy.deepcopy(unet), copy.deepcopy(te))
    with tempfile.TemporaryDirectory() as tmp:
        if "load" not in args.skip:
            bench_load(pipe_ours, pipe_peer, Path(tmp), args.load_reps)
        if "generation" not in args.skip:
            bench_generation(pipe_ours, pipe_peer, Path(tmp), args.adapters, args.steps, args.reps)
    if FAILED:
        print(f"\nCORRECTNESS CHECKS FAILED: {', '.join(FAILED)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
