"""Reward functions that misbehave, importable by the pool's spawned workers (module:function)."""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path


def echo(response: str, label, metadata=None) -> float:
    return float(response == str(label))


def sleepy(response: str, label, metadata=None) -> float:
    if response == "slow":
        time.sleep(60)  # interruptible: the per-item alarm ends it
    return 1.0


def busy(response: str, label, metadata=None) -> float:
    if response == "slow":
        while True:  # pure-Python loop: the alarm's exception lands between bytecodes
            pass
    return 1.0


def unreachable(response: str, label, metadata=None) -> float:
    if response == "stuck":
        # SIGALRM blocked: like a long C call that never returns to the interpreter.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(60)
    return 1.0


def crash_once(response: str, label, metadata=None) -> float:
    """Kills its worker the first time it sees a "crash" item (a marker file remembers)."""
    if response == "crash":
        marker = Path(metadata)
        if not marker.exists():
            marker.write_text("crashed")
            os._exit(1)
    return 1.0


def crash_always(response: str, label, metadata=None) -> float:
    if response == "crash":
        os._exit(1)
    return 1.0


def raises(response: str, label, metadata=None) -> float:
    if response == "bug":
        raise ZeroDivisionError("user reward bug")
    return 1.0


def nonfinite(response: str, label, metadata=None) -> float:
    """A reward with a bug: "nan", "inf", "-inf" responses score as those floats (as does any response
    whose first line is "nan"); "huge" scores 1e308."""
    if response in ("nan", "inf", "-inf"):
        return float(response)
    if response.startswith("nan\n"):
        return math.nan
    return 1e308 if response == "huge" else 1.0
