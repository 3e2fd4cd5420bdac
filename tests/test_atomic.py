"""sd_lora.atomic: whole files with the usual mode, from many threads at once."""

import os
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from sd_lora.atomic import atomic_write_bytes

STATUS = Path("/proc/self/status")


@pytest.mark.skipif(not STATUS.exists(), reason="reads the process's umask from /proc")
def test_writes_from_many_threads_never_touch_the_umask(tmp_path):
    """The UI saves images and adapters from several requests at once. Reading the umask in Python means setting it
    (to 0, then back), so files another thread created meanwhile came out world-writable (0666). A thread watches
    the umask through /proc while the others write; in RAM (/dev/shm), writes are fast enough to hit that window."""
    folder = Path(tempfile.mkdtemp(dir="/dev/shm")) if os.path.isdir("/dev/shm") else tmp_path
    seen, stop = set(), threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.update(line.split()[1] for line in STATUS.read_text().splitlines() if line.startswith("Umask:"))

    def write(i: int) -> None:
        for j in range(1500):
            atomic_write_bytes(folder / f"{i}-{j % 3}.bin", f"{i} {j}".encode())

    old_mask, old_interval = os.umask(0o027), sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, to give a race every chance
    threads = [threading.Thread(target=watch)] + [threading.Thread(target=write, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads[1:]:
            t.join()
    finally:
        stop.set()
        threads[0].join()
        sys.setswitchinterval(old_interval)
        os.umask(old_mask)
    files = sorted(folder.iterdir())
    try:
        assert seen == {"0027"}
        assert [p.name for p in files] == sorted(f"{i}-{j}.bin" for i in range(8) for j in range(3))  # no temp files
        assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o640)}
        assert all(p.read_bytes().split()[0] == p.name.split("-")[0].encode() for p in files)
    finally:
        for p in files:
            p.unlink()
        if folder != tmp_path:
            folder.rmdir()
