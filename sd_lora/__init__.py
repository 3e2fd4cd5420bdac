"""sd_lora: a Stable Diffusion LoRA plugin and trainer.

    pipe = sd_lora.load_pipeline("tiny")
    lora = sd_lora.attach(pipe)
    lora.load("mozart.safetensors", name="mozart")
    lora.set_weights({"mozart": 0.8})
"""

from sd_lora.adapter import read_adapter, save_adapter
from sd_lora.adapters import AdapterInfo, Adapters, attach
from sd_lora.pipeline import ModelLoadError, load_pipeline, tiny_dir
from sd_lora.weights import AdapterError, AdapterWeights, LoRAModule

__version__ = "0.1.0"
__all__ = [
           "AdapterError",
           "AdapterInfo",
           "AdapterWeights",
           "Adapters",
           "LoRAModule",
           "ModelLoadError",
           "__version__",
           "attach",
           "load_pipeline",
           "read_adapter",
           "save_adapter",
           "tiny_dir",
]
