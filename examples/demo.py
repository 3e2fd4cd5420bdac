"""`make demo`: the main job on the built-in offline model.

Until the trainer lands this blends two adapters on the tiny model and writes demo_out/two_adapters.png.
"""

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "--out", "demo_out/two_adapters.png"]
    runpy.run_path(str(Path(__file__).with_name("two_adapters.py")), run_name="__main__")
