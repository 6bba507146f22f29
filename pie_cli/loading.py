"""Compatibility: ``from pie_cli.loading import load`` (documented since 0.1); the loader is :mod:`pie_cli.core.loading`."""

from pie_cli.core.loading import as_pipeline, load

__all__ = ["as_pipeline", "load"]
