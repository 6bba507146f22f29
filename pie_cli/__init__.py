"""pie: simulate disease progression on medical images (Progressive Image Editing)."""

__version__ = "0.1.0"
