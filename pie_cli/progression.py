"""Compatibility: the Python API documented since 0.1 (``from pie_cli.progression import progress``).

The algorithm lives in :mod:`pie_cli.core.progression`; this module only re-exports it.
"""

from pie_cli.core.progression import (
    Components,
    Frame,
    PieConfig,
    ResumePoint,
    denoise_count,
    progress,
    progress_batch,
)

__all__ = ["Components", "Frame", "PieConfig", "ResumePoint", "denoise_count", "progress", "progress_batch"]
