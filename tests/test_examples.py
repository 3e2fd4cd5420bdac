"""The examples run as users run them, so they never rot."""

import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_two_adapters_example_writes_a_strip(tmp_path):
    out = tmp_path / "strip.png"
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "two_adapters.py"), "--out", str(out)],
                         check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    image = Image.open(out)
    assert image.size == (64 * 4 * 4, 64 * 4)
    tiles = [image.crop((256 * i, 0, 256 * (i + 1), 256)).tobytes() for i in range(4)]
    assert len(set(tiles)) == 4  # base, each adapter and the blend all differ
    assert (tmp_path / "mozart.safetensors").is_file()
