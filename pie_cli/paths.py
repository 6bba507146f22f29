"""Where pie keeps its user files, and where the Hugging Face cache is.

Both are read from the environment at call time (not import time), so tests and
scripts can redirect them with ``PIE_HOME`` / ``HF_HUB_CACHE`` / ``HF_HOME``.
"""

from __future__ import annotations

import os
from pathlib import Path


def pie_home() -> Path:
    """``$PIE_HOME`` if set, else the platform's app directory for "pie" (created on demand)."""
    env = os.environ.get("PIE_HOME")
    if env:
        return Path(env).expanduser()
    import typer

    return Path(typer.get_app_dir("pie"))


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, resolved the way huggingface_hub resolves it."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
