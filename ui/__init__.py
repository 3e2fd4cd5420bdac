"""The sd-lora Gradio app: `python ui/app.py` (see ui/app.py)."""
