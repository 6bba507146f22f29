"""PIE and the model it drives: parameters, per-step schedules, the algorithm, model references,
loading, devices and processes. ``progression.py`` is the algorithm; read it first.

``parameters.py``, ``schedules.py``, ``registry.py`` and ``single_file.py`` are torch-free (commands check options
and resolve models before any heavy import); the other modules import torch.
"""
