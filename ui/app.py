"""sd-lora studio: blend LoRA adapters with one slider each, compare styles, fold a blend into a checkpoint or
export it as one adapter.

    python ui/app.py [--model tiny] [--adapters ./adapters] [--outputs ./outputs] [--port 7860]
    sd-lora ui --model ./sd15 --adapters ~/loras

Scripts use the same app through gradio_client: /generate(prompt, negative_prompt, weights_json, steps, guidance,
seed, width, height), /compare, /sweep, /export_lora, /merge_checkpoint and /adapters() (see the API tab).
This file is layout and callbacks only; the work is in ui/engine.py, and the LoRA math in sd_lora.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python ui/app.py`: make `ui.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool

import gradio as gr

import sd_lora
from sd_lora.pipeline import default_guidance
from ui import api, catalog
from ui.api import PROGRESS, notes, safely, tracker
from ui.engine import LIMITS, SEED_AXIS, Settings, Studio, axis_choice

MAX_ROWS = 24  # adapter rows made up front; unused ones stay hidden
SLOT_FIELDS = ("group", "preview", "card", "on", "weight", "te", "trigger")
LICENSES = ["", "CreativeML OpenRAIL-M", "CC-BY-4.0", "CC-BY-NC-4.0", "Apache-2.0", "MIT"]
CSS = """
.lora-row { padding: 6px 8px !important; }
.lora-preview { max-width: 96px; }
.lora-card p { margin: 0 !important; }
#generate-btn { min-height: 64px; }
"""


def header(studio: Studio) -> str:
    usable = len(studio.usable())
    off = len(studio.entries) - usable
    folders = ", ".join(f"`{d.name}/`" for d in studio.adapter_dirs) or "none"
    return (f"# sd-lora studio\nModel **{studio.model_name}** ({catalog.FAMILY_NAMES[studio.family]}) on "
            f"**{studio.device}** · {usable} adapter{'s' * (usable != 1)} from {folders}"
            + (f" ({off} disabled)" if off else "") + f" · images go to `{studio.outputs.name}/`")


def build(studio: Studio, max_upload_mb: int = 512) -> gr.Blocks:
    names0 = _slot_names(studio)
    with gr.Blocks(title="sd-lora studio") as demo:
        title = gr.Markdown(header(studio))
        names = gr.State(names0)  # which adapter each row shows, per browser session
        last_image = gr.State(None)  # the newest generated image: the export's thumbnail
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=380):
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a violin on a table, oil painting",
                                    elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", lines=1)
                with gr.Row():
                    steps = gr.Slider(*LIMITS["steps"], value=20, step=1, label="Steps", elem_id="steps")
                    cfg = gr.Slider(*LIMITS["guidance"], value=default_guidance(studio.model_name), step=0.5,
                                    label="CFG scale")
                with gr.Row():
                    width = gr.Slider(*LIMITS["size"], value=studio.native_size, step=8, label="Width")
                    height = gr.Slider(*LIMITS["size"], value=studio.native_size, step=8, label="Height")
                with gr.Row():
                    seed = gr.Number(-1, precision=0, label="Seed (-1: random)", scale=3, elem_id="seed")
                    dice = gr.Button("Random", scale=0, min_width=80)
                    count = gr.Slider(*LIMITS["count"], value=1, step=1, label="Batch count", scale=3)
                gr.Markdown("### Adapters")
                advanced = gr.Checkbox(False, label="Advanced: separate text-encoder weights", elem_id="advanced")
                slots = [_slot(studio, names0[i], i) for i in range(MAX_ROWS)]
                overflow = gr.Markdown(_overflow(studio))
                with gr.Accordion("Add adapters", open=not studio.entries):
                    upload = gr.File(label=f"Upload .safetensors (up to {max_upload_mb} MB each)",
                                     file_types=[".safetensors"], file_count="multiple")
                    rescan = gr.Button("Rescan adapter folders", size="sm")
            with gr.Column(scale=6, min_width=380), gr.Tabs():
                with gr.Tab("Generate"):
                    generate = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                    gallery = gr.Gallery(label="Images", columns=2, height=420, object_fit="contain", elem_id="gallery")
                    status = gr.Markdown(elem_id="status")
                    with gr.Accordion("Reproduce: parameters and weights_json", open=False):
                        infotext = gr.Textbox(label="parameters (A1111 format, also in each PNG)", lines=3,
                                              interactive=False, buttons=["copy"], elem_id="infotext")
                        blend_box = gr.Code(language="json", lines=2, label="weights_json for the API")
                with gr.Tab("Compare"):
                    compare = gr.Button("Compare: base + each enabled adapter, same seed", variant="primary",
                                        elem_id="compare-btn")
                    compare_image = gr.Image(show_label=False, type="filepath", interactive=False, height=240,
                                             elem_id="compare-image")
                    compare_status = gr.Markdown(elem_id="compare-status")
                    gr.Markdown("#### Weight sweep\nX: one adapter's weight in 5 steps. Y: a second adapter's "
                                "weight, or the seed. The other enabled adapters keep their weights.")
                    with gr.Row():
                        x_name = gr.Dropdown(studio.usable(), value=_first(studio.usable()), label="X adapter")
                        x_from = gr.Number(0.0, label="X from")
                        x_to = gr.Number(1.0, label="X to")
                    with gr.Row():
                        y_axis = gr.Dropdown(_y_choices(studio), value=SEED_AXIS, label="Y")
                        y_from = gr.Number(0.0, label="Y from")
                        y_to = gr.Number(1.0, label="Y to")
                        y_steps = gr.Slider(1, 5, value=3, step=1, label="Y steps")
                    sweep = gr.Button("Make sweep grid", elem_id="sweep-btn")
                    sweep_image = gr.Image(show_label=False, type="filepath", interactive=False, elem_id="sweep-image")
                    sweep_status = gr.Markdown()
                with gr.Tab("Merge & export"):
                    gr.Markdown("#### Export blend as LoRA\nOne `.safetensors` adapter equal to the current "
                                "blend: exact (ranks concatenated) or SVD to a smaller rank.")
                    with gr.Row():
                        export_name = gr.Textbox("blend", label="File name")
                        method = gr.Radio(["Exact", "SVD"], value="Exact", label="Method")
                        rank = gr.Slider(1, 128, value=8, step=1, label="SVD rank", visible=False)
                    with gr.Row():
                        card_title = gr.Textbox(label="Title", elem_id="card-title")
                        card_author = gr.Textbox(label="Author")
                        card_license = gr.Dropdown(LICENSES, value="", allow_custom_value=True, label="License")
                    card_trigger = gr.Textbox(label="Trigger words")
                    card_description = gr.Textbox(label="Description", lines=2)
                    use_thumb = gr.Checkbox(True, label="Thumbnail: the last generated image")
                    export = gr.Button("Export blend as LoRA", variant="primary", elem_id="export-btn")
                    export_file = gr.File(label="Exported LoRA", interactive=False, visible=False,
                                          elem_id="export-file")
                    export_status = gr.Markdown()
                    gr.Markdown("#### Merge into checkpoint\nThe base model with the blend folded into its "
                                "weights: zero overhead at inference, loads anywhere as a plain model.")
                    merge_format = gr.Radio(["Single file .safetensors (A1111, ComfyUI)",
                                             "diffusers folder (.zip)"], value=
                                            "Single file .safetensors (A1111, ComfyUI)", label="Format")
                    merge = gr.Button("Merge into checkpoint", variant="primary", elem_id="merge-btn")
                    merge_file = gr.File(label="Merged checkpoint", interactive=False, visible=False,
                                         elem_id="merge-file")
                    merge_status = gr.Markdown()
                with gr.Tab("API"):
                    gr.Markdown(api.HELP)

        # ---- the adapter rows ----------------------------------------------------------------------------------
        for s in slots:  # moving a slider switches its adapter on; the trigger button fills the prompt
            s["weight"].input(None, None, s["on"], js="() => true")
            # Outside advanced mode the text-encoder weight follows the row's weight; in it, each keeps its own.
            s["weight"].input(None, [advanced, s["weight"], s["te"]], s["te"], js="(adv, w, te) => adv ? te : w")
            s["trigger"].click(None, [prompt, s["trigger"]], prompt, js=_INSERT_TRIGGER)

        def on_advanced(adv: bool, shown: list) -> list:  # shows or hides the sliders; their values stay
            usable = [bool(n) and studio.entries[n].usable for n in shown]
            return [gr.update(visible=adv and ok) for ok in usable]

        advanced.change(on_advanced, [advanced, names], [s["te"] for s in slots], api_visibility="private")
        dice.click(None, None, seed, js="() => Math.floor(Math.random() * 2147483647)")
        method.change(lambda m: gr.update(visible=m == "SVD"), method, rank, api_visibility="private")
        rows_out = [names, title, overflow, x_name, y_axis, *[s[f] for s in slots for f in SLOT_FIELDS]]

        def refresh(old: list, note: str = "") -> list:
            new = _slot_names(studio)
            rows = [u for i in range(MAX_ROWS) for u in _slot_update(studio, new[i], old[i])]
            return [new, header(studio) + note, _overflow(studio), gr.update(choices=studio.usable()),
                    gr.update(choices=_y_choices(studio)), *rows]

        def on_upload(files: list | None, old: list) -> list:
            notes = []
            for f in files or []:
                try:
                    path = catalog.store_upload(Path(f), studio.adapter_dirs[0], Path(f).name, max_upload_mb << 20)
                    entry = studio.add(path)
                    notes.append(f"added **{entry.name}**" + (f" (disabled: {entry.error})" if entry.error else ""))
                except (sd_lora.AdapterError, OSError) as e:
                    notes.append(f"⚠️ rejected: {e}")
            return refresh(old, "\n\n" + " · ".join(notes) if notes else "")

        def on_rescan(old: list) -> list:
            studio.rescan()
            return refresh(old)

        upload.upload(on_upload, [upload, names], rows_out, api_visibility="private")
        rescan.click(on_rescan, names, rows_out, api_visibility="private")
        demo.load(refresh, names, rows_out, api_visibility="private")  # a reload shows adapters added since

        # ---- actions: the UI reads its rows into weights_json, as a script would send it ------------------------
        row_state = {names, advanced, *[s[f] for s in slots for f in ("on", "weight", "te")]}

        def read(v: dict) -> tuple[Settings, str]:
            on, w, te = ([v[s[f]] for s in slots] for f in ("on", "weight", "te"))
            settings = Settings(v[prompt], v[negative], v[steps], v[cfg], v[seed], v[width], v[height], v[count])
            return settings, _blend_json(v[names], v[advanced], on, w, te)

        def run(method, v: dict, *args, **kwargs):
            settings, blend = read(v)
            return safely(lambda: method(settings, studio.parse_weights(blend), *args, **kwargs)), blend

        def ui_generate(v: dict, progress=PROGRESS):
            result, blend = run(studio.generate, v, tracker(progress))
            last = result.images[-1][0] if result.images else None
            return result.images, notes(result, "Done."), result.parameters, blend, last

        def ui_compare(v: dict, progress=PROGRESS):
            result, _ = run(studio.compare, v, tracker(progress))
            return result.images[0][0], notes(result)  # the labelled strip; each tile is saved beside it

        def ui_sweep(v: dict, progress=PROGRESS):
            result, _ = run(studio.sweep, v, v[x_name], (v[x_from], v[x_to]), v[y_axis], (v[y_from], v[y_to]),
                            int(v[y_steps]), tracker(progress))
            return result.images[0][0], notes(result)

        def ui_export(v: dict):
            card = {"title": v[card_title], "author": v[card_author], "trigger": v[card_trigger],
                    "license": v[card_license], "description": v[card_description]}
            result, _ = run(lambda _, w: studio.export_blend(w, v[export_name], v[rank] if v[method] == "SVD" else None,
                                                             card, v[last_image] if v[use_thumb] else None), v)
            return gr.update(value=result.images[0][0], visible=True), notes(result)

        def ui_merge(v: dict, progress=PROGRESS):
            progress(0.2, desc="merging")
            single = v[merge_format].startswith("Single")
            result, _ = run(lambda _, w: studio.merge_checkpoint(w, single), v)
            return gr.update(value=result.images[0][0], visible=True), notes(result)

        ui_inputs = {prompt, negative, steps, cfg, seed, width, height, count} | row_state
        generate.click(ui_generate, ui_inputs, [gallery, status, infotext, blend_box, last_image],
                       api_visibility="private")
        compare.click(ui_compare, ui_inputs, [compare_image, compare_status], api_visibility="private")
        sweep.click(ui_sweep, ui_inputs | {x_name, x_from, x_to, y_axis, y_from, y_to, y_steps},
                    [sweep_image, sweep_status], api_visibility="private")
        export.click(ui_export, ui_inputs | {export_name, method, rank, card_title, card_author, card_license,
                                             card_trigger, card_description, use_thumb, last_image},
                     [export_file, export_status], api_visibility="private")
        merge.click(ui_merge, ui_inputs | {merge_format}, [merge_file, merge_status], api_visibility="private")

        api.add_endpoints(studio)
    return demo


# ---- helpers ------------------------------------------------------------------------------------------------------
def _slot(studio: Studio, name: str | None, i: int) -> dict:
    """One adapter row: preview, card, on/off, weight, text-encoder weight (advanced), trigger-words button."""
    e = studio.entries.get(name) if name else None
    row = gr.Group(visible=e is not None, elem_classes="lora-row", elem_id=f"lora-row-{i}")
    with row as group, gr.Row(equal_height=True):
        preview = gr.Image(e.preview if e else None, show_label=False, container=False, interactive=False,
                           height=88, width=88, scale=0, min_width=88, buttons=[], visible=bool(e and e.preview),
                           elem_classes="lora-preview")
        with gr.Column(scale=4, min_width=240):
            card = gr.Markdown(e.card() if e else "", elem_classes="lora-card")
            with gr.Row():
                usable = bool(e and e.usable)  # a disabled adapter shows its card and reason, no controls
                on = gr.Checkbox(False, label="on", scale=0, min_width=64, visible=usable, elem_id=f"lora-on-{i}")
                weight = gr.Slider(*catalog.WEIGHT_RANGE, value=e.weight if e else 1.0, step=0.05,
                                   label=name or "weight", scale=3, visible=usable,
                                   elem_id=f"lora-weight-{i}")
                te = gr.Slider(*catalog.WEIGHT_RANGE, value=e.weight if e else 1.0, step=0.05,
                               label="text encoder", scale=2, visible=False, elem_id=f"lora-te-{i}")
            trigger = gr.Button(f"+ {e.trigger}" if e else "", size="sm", visible=bool(e and e.trigger and e.usable),
                                elem_id=f"lora-trigger-{i}")
    return {"group": group, "preview": preview, "card": card, "on": on, "weight": weight, "te": te,
            "trigger": trigger}


def _slot_update(studio: Studio, name: str | None, old: str | None) -> list:
    """Updates for one row's SLOT_FIELDS: nothing when it shows the same adapter (the user's settings stay)."""
    if name == old:
        return [gr.skip()] * len(SLOT_FIELDS)
    e = studio.entries.get(name) if name else None
    if e is None:
        return [gr.update(visible=False)] + [gr.skip()] * (len(SLOT_FIELDS) - 1)
    return [gr.update(visible=True), gr.update(value=e.preview, visible=e.preview is not None), e.card(),
            gr.update(value=False, visible=e.usable), gr.update(value=e.weight, label=e.name, visible=e.usable),
            gr.update(value=e.weight, visible=False),
            gr.update(value=f"+ {e.trigger}", visible=bool(e.trigger and e.usable))]


def _slot_names(studio: Studio) -> list[str | None]:
    names = list(studio.entries)[:MAX_ROWS]
    return names + [None] * (MAX_ROWS - len(names))


def _overflow(studio: Studio) -> str:
    if not studio.entries:
        return ("No adapters yet: put `.safetensors` LoRA files in "
                f"`{studio.adapter_dirs[0] if studio.adapter_dirs else 'adapters'}` or upload them below.")
    extra = list(studio.entries)[MAX_ROWS:]
    if not extra:
        return ""
    return (f"{len(extra)} more adapter(s) not shown here ({', '.join(extra[:5])}…): the rows hold {MAX_ROWS}; "
            "use `<lora:name:0.8>` in the prompt or the API's weights_json for those.")


def _blend_json(names: list, advanced: bool, on: list, weight: list, te: list) -> str:
    """The rows' state as weights_json: enabled rows only, text-encoder weight apart only in advanced mode."""
    blend = {}
    for i, name in enumerate(names):
        if name and on[i]:
            blend[name] = {"unet": weight[i], "text_encoder": te[i]} if advanced and te[i] != weight[i] else weight[i]
    return json.dumps(blend)


def _y_choices(studio: Studio) -> list[str]:
    """The sweep's Y axis: the seed, or an adapter (one named "seed" shows as `<lora:seed>`)."""
    return [SEED_AXIS, *(axis_choice(n) for n in studio.usable())]


def _first(items: list):
    return items[0] if items else None


_INSERT_TRIGGER = """(prompt, label) => {
  const words = label.replace(/^\\+ /, "");
  if (!prompt || !prompt.trim()) return words;
  return prompt.includes(words) ? prompt : prompt.replace(/[\\s,]*$/, "") + ", " + words;
}"""

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="sd-lora studio: blend, compare, merge and export LoRA adapters")
    p.add_argument("--model", default="tiny", help="'tiny', a diffusers folder, a .safetensors checkpoint or hub id")
    p.add_argument("--adapters", action="append", metavar="DIR",
                   help="folder of .safetensors adapters (repeatable; default ./adapters, and ./output if it exists)")
    p.add_argument("--outputs", default="outputs", metavar="DIR", help="where images, exports and merges go")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=None, help="default: 7860, or the next free port")
    p.add_argument("--share", action="store_true", help="open a public gradio.live link (prints a warning)")
    p.add_argument("--max-upload-mb", type=int, default=512, help="largest adapter upload accepted")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda when available)")
    args = p.parse_args(argv)
    if not args.adapters:
        args.adapters = ["adapters"] + (["output"] if Path("output").is_dir() else [])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.share:
        print("WARNING: --share publishes this app at a public gradio.live address: anyone with the link can "
              "generate images, upload adapters and download merged checkpoints.", file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"WARNING: listening on {args.host}: other machines on the network can use this app.", file=sys.stderr)
    studio = Studio(args.model, args.adapters, args.outputs, device=args.device)
    demo = build(studio, args.max_upload_mb)
    demo.queue(default_concurrency_limit=2, max_size=64)  # the engine's lock keeps each request's blend its own
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size=f"{args.max_upload_mb}mb",
                allowed_paths=[str(d) for d in studio.adapter_dirs] + [str(studio.outputs)],
                theme=gr.themes.Soft(), css=CSS, footer_links=["api", "gradio"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
