"""Where StaySafe keeps its caches. One small module without heavy imports, so that the judges, the dashboard and
the CLI can find the home directory without loading torch."""

from __future__ import annotations

import os
from pathlib import Path


def staysafe_home() -> Path:
    """Cache root for converted models, probes and judge scores (``$STAYSAFE_HOME``, default ~/.cache/staysafe)."""
    return Path(os.environ.get("STAYSAFE_HOME", Path.home() / ".cache" / "staysafe")).expanduser()


def cached_model_dir(name: str) -> Path:
    return staysafe_home() / "models" / name
