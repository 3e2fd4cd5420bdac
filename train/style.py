"""Train a style LoRA on a folder of images:

    accelerate launch train/style.py --images ./mozart_art --rank 4

Thin on purpose: flags -> sd_lora.training.TrainConfig -> sd_lora.training.train. Bad flags and bad input get one
line on stderr and exit code 2; a run that cannot go on (the loss stayed NaN) gets one line and exit code 1; Ctrl-C
(exit code 130) and SIGTERM (143) get one line saying what can be resumed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: make `sd_lora` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

NOTHING_TO_RESUME = "style.py: interrupted before the first checkpoint; nothing to resume"
STARTING = "style.py: interrupted while starting; nothing to resume"


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler preempting the run, `kill`): stopped as Ctrl-C stops it."""


def _terminate(signum, frame):
    raise _Terminated


def _stopped(e: KeyboardInterrupt) -> int:
    return 143 if isinstance(e, _Terminated) else 130


if __name__ == "__main__" and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _terminate)  # before the imports below: they load torch, which takes seconds
try:
    from sd_lora.training.config import TrainingError, UsageError, add_arguments, config_from_args, valid_text
except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM while torch loads: one line, not a traceback from its import
    if __name__ != "__main__":
        raise
    print(STARTING, file=sys.stderr, flush=True)
    sys.exit(_stopped(e))

# Under `accelerate launch` every process parses the same flags: the main one reports a bad flag at once; the others
# wait for the launcher to stop them once the main one has exited (exiting first, they got the main one killed before
# it printed), and report it themselves only if it does not.
_MAIN_PROCESS = os.environ.get("RANK", "0") == "0"
_REPORT_AFTER_S = 20


def _usage_error(message: str) -> int:
    if not _MAIN_PROCESS:
        time.sleep(_REPORT_AFTER_S)
    print(valid_text(f"style.py: error: {message}"), file=sys.stderr, flush=True)
    return 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage plus the error; one line is easier to read in logs
        sys.exit(_usage_error(message))


def parse(argv: list[str] | None = None):
    """Flags -> a validated TrainConfig (raises UsageError on a bad value)."""
    parser = _Parser(prog="style.py", description="Train a style LoRA (DreamBooth-style) on a folder of images.")
    return config_from_args(add_arguments(parser).parse_args(argv)).validate()


def main(argv: list[str] | None = None) -> int:
    config = None
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        try:
            config = parse(argv)
        except UsageError as e:
            return _usage_error(str(e))
    except KeyboardInterrupt as e:  # while parsing, or while another process waits to report a bad flag
        print(STARTING, file=sys.stderr)
        return _stopped(e)
    try:
        from sd_lora.training import train

        train(config)
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM: checkpoints are whole (written atomically): say how to go on
        print(_interrupted(config), file=sys.stderr)
        return _stopped(e)
    except UsageError as e:
        print(valid_text(f"style.py: error: {e}"), file=sys.stderr)
        return 2
    except TrainingError as e:  # e.g. the loss stayed NaN: not the user's flags, but still one line
        print(valid_text(f"style.py: error: {e}"), file=sys.stderr)
        return 1
    return 0


def _interrupted(config) -> str:
    from sd_lora.training.checkpoint import checkpoints

    saved = checkpoints(config.resolved().output) if config is not None else []
    if not saved:
        return NOTHING_TO_RESUME
    step, folder = saved[-1]
    return valid_text(f"style.py: interrupted; checkpoints up to step {step} ({folder}) are kept: run the same "
                      "command with --resume latest to continue")


if __name__ == "__main__":
    sys.exit(main())
