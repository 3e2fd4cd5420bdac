"""The app's programmatic endpoints (gradio_client) and the error handling the UI shares with them.

The endpoints take plain values: numbers are not bounded by slider limits (Gradio would reject an out-of-range
value before our code saw it), so the engine clamps them and the notes say so. Failures become gr.Error: a message
in the UI, an AppError with the same message in gradio_client, and the app keeps serving.
"""

from __future__ import annotations

import gradio as gr

from ui.engine import SEED_AXIS, Result, Settings, Studio

PROGRESS = gr.Progress()  # gradio gives each request its own tracker in place of this default
_WARN = ("out of range", "not a multiple", "ignored")  # notes worth a toast, not only a line under the output


def safely(action) -> Result:
    """Run an engine call; a failure becomes a message for the user instead of a traceback."""
    try:
        return action()
    except Exception as e:  # noqa: BLE001 - whatever failed, the user reads why and the app keeps serving
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise gr.Error(message if isinstance(e, ValueError) else f"{type(e).__name__}: {message}") from None


def notes(result: Result, done: str = "") -> str:
    for note in result.notes:
        if any(w in note for w in _WARN):
            gr.Warning(note)
    return "\n".join(f"- {n}" for n in result.notes) or done


def tracker(progress):
    return None if progress is None else (lambda fraction, desc: progress(fraction, desc=desc))


class Endpoints:
    """One method per endpoint; the parameter names are what gradio_client shows and accepts as keywords."""

    def __init__(self, studio: Studio):
        self.studio = studio

    def generate(self, prompt, negative_prompt, weights_json, steps, guidance, seed, width, height, batch_count=1,
                 progress=PROGRESS):
        s = Settings(prompt, negative_prompt, steps, guidance, seed, width, height, batch_count)
        result = safely(lambda: self.studio.generate(s, self.studio.parse_weights(weights_json), tracker(progress)))
        return result.images, notes(result, result.parameters)

    def compare(self, prompt, negative_prompt, weights_json, steps, guidance, seed, width, height,
                progress=PROGRESS):
        s = Settings(prompt, negative_prompt, steps, guidance, seed, width, height)
        result = safely(lambda: self.studio.compare(s, self.studio.parse_weights(weights_json), tracker(progress)))
        return result.images, notes(result)

    def sweep(self, prompt, negative_prompt, weights_json, steps, guidance, seed, width, height, x_adapter, x_from,
              x_to, y_axis, y_from, y_to, y_steps, progress=PROGRESS):
        s = Settings(prompt, negative_prompt, steps, guidance, seed, width, height)
        result = safely(lambda: self.studio.sweep(s, self.studio.parse_weights(weights_json), x_adapter,
                                                  (float(x_from), float(x_to)), y_axis or SEED_AXIS,
                                                  (float(y_from), float(y_to)), int(y_steps), tracker(progress)))
        return result.images, notes(result)

    def export_lora(self, weights_json, name, rank, title, author, trigger_words, license, description, thumbnail):
        card = {"title": title, "author": author, "trigger": trigger_words, "license": license,
                "description": description}
        result = safely(lambda: self.studio.export_blend(self.studio.parse_weights(weights_json), name or "blend",
                                                         int(rank or 0) or None, card, thumbnail))
        return result.images[0][0], notes(result)

    def merge_checkpoint(self, weights_json, single_file):
        result = safely(lambda: self.studio.merge_checkpoint(self.studio.parse_weights(weights_json),
                                                             bool(single_file)))
        return result.images[0][0], notes(result)

    def adapters(self) -> dict:
        """The model and every adapter in the library: name, family, ranks, trigger words, metadata, and why it is
        disabled when it is."""
        return self.studio.describe()


def add_endpoints(studio: Studio) -> None:
    """Register the API-only endpoints in the current gr.Blocks, on hidden components that carry their types."""
    api = Endpoints(studio)
    with gr.Column(visible=False):
        t = {k: gr.Textbox(label=k) for k in ("prompt", "negative_prompt", "weights_json", "x_adapter", "y_axis",
                                              "name", "title", "author", "trigger_words", "license", "description")}
        n = {k: gr.Number(v, label=k) for k, v in (("steps", 20), ("guidance", 7.5), ("seed", -1), ("width", 0),
                                                   ("height", 0), ("batch_count", 1), ("x_from", 0.0), ("x_to", 1.0),
                                                   ("y_from", 0.0), ("y_to", 1.0), ("y_steps", 3), ("rank", 0))}
        thumbnail = gr.Image(type="filepath", label="thumbnail")
        single_file = gr.Checkbox(True, label="single_file")
        images, file, text = gr.Gallery(), gr.File(), gr.Textbox()
    base = [t["prompt"], t["negative_prompt"], t["weights_json"],
            *(n[k] for k in ("steps", "guidance", "seed", "width", "height"))]
    axes = [t["x_adapter"], n["x_from"], n["x_to"], t["y_axis"], n["y_from"], n["y_to"], n["y_steps"]]
    card = [t[k] for k in ("name",)] + [n["rank"]] + [t[k] for k in ("title", "author", "trigger_words", "license",
                                                                     "description")]
    gr.on([], api.generate, [*base, n["batch_count"]], [images, text], api_name="generate")
    gr.on([], api.compare, base, [images, text], api_name="compare")
    gr.on([], api.sweep, base + axes, [images, text], api_name="sweep")
    gr.on([], api.export_lora, [t["weights_json"], *card, thumbnail], [file, text], api_name="export_lora")
    gr.on([], api.merge_checkpoint, [t["weights_json"], single_file], [file, text], api_name="merge_checkpoint")
    gr.api(api.adapters, api_name="adapters")


HELP = """
Every action is also an endpoint for scripts (`pip install gradio_client`):

```python
from gradio_client import Client
c = Client("http://127.0.0.1:7860/")
c.predict(api_name="/adapters")   # the library: names, families, ranks, trigger words, metadata
images, notes = c.predict("a violin", "", '{"mozart": 0.8, "ink": {"unet": 0.5, "text_encoder": 0.2}}',
                          20, 7.5, 42, 512, 512, api_name="/generate")
```

- `/generate(prompt, negative_prompt, weights_json, steps, guidance, seed, width, height[, batch_count])`
- `/compare(prompt, negative_prompt, weights_json, steps, guidance, seed, width, height)`
- `/sweep(prompt, negative_prompt, weights_json, steps, guidance, seed, width, height, x_adapter, x_from, x_to,
  y_axis, y_from, y_to, y_steps)`; `y_axis` is `"seed"` or an adapter name (`"<lora:name>"` also works, and
  picks an adapter that is itself named "seed")
- `/export_lora(weights_json, name, rank, title, author, trigger_words, license, description, thumbnail)`;
  rank 0 means exact
- `/merge_checkpoint(weights_json, single_file)`

`weights_json` maps adapter name → weight, or → `{"unet": w, "text_encoder": w}`; adapters not named are off.
Out-of-range steps or sizes are clamped, and the notes say so. Each image's PNG carries A1111 "parameters".
"""
