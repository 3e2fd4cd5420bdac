"""sd_lora: a Stable Diffusion LoRA plugin and trainer."""

from sd_lora.pipeline import load_pipeline, tiny_dir

__version__ = "0.1.0"
__all__ = ["load_pipeline", "tiny_dir", "__version__"]
