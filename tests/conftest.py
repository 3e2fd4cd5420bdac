import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

import sd_lora

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def pipe():
    """A fresh tiny pipeline per test: adapters mutate it."""
    return sd_lora.load_pipeline("tiny")



@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model gets loaded: the error it checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(sd_lora, "load_pipeline", refuse)
