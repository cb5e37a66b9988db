"""Fault-injection hooks for the kill tests (not a feature): ``STAYSAFE_TEST_PAUSE=point:seconds`` makes the process
announce ``point`` on stderr and sleep there, so a test can SIGKILL it at that exact moment.

Points: ``step@N`` (after step N's trace rows are written), ``eval@N`` (after evaluation N), ``checkpoint@N``
(after the checkpoint's model files, before its state file)."""

from __future__ import annotations

import os
import sys
import time

ENV = "STAYSAFE_TEST_PAUSE"


def fault_pause(point: str) -> None:
    """Sleep at ``point`` when ``$STAYSAFE_TEST_PAUSE`` names it; do nothing otherwise."""
    name, _, seconds = os.environ.get(ENV, "").partition(":")
    if name == point:
        print(f"STAYSAFE_PAUSED {point}", file=sys.stderr, flush=True)
        time.sleep(float(seconds or 30))
