"""sd_lora.training.host_memory: on glibc, a freed activation-sized buffer stays in the heap for the next step
instead of going back to the kernel (which made every CPU training step fault its buffers in again)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import ctypes, json, torch
from sd_lora.training import host_memory

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = Info

def step():  # one 64 MB buffer, as a training step's activations are: how much is mmapped, how much kept when freed
    x = torch.ones(16 << 20)
    mapped = mallinfo2().hblkhd
    del x
    return {"mapped": mapped, "kept": mallinfo2().fordblks}

before = step()
took = host_memory.keep_freed_memory()
step()
after = step()
print(json.dumps({"before": before, "after": after, "took": took}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator only")
def test_freed_buffers_stay_in_the_heap_after_keep_freed_memory():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    if not probe["took"]:
        pytest.skip("the C library is not glibc")
    size = 64 << 20
    assert probe["before"]["mapped"] >= size and probe["before"]["kept"] < size  # default: mmapped, then unmapped
    assert probe["after"]["mapped"] < size and probe["after"]["kept"] >= size  # now: from the heap, kept there

