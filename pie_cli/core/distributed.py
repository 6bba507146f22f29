"""Several processes (torchrun / accelerate launch): one accelerate process state for all of pie.

accelerate forms a process group on CUDA by itself, but on machines without CUDA only when
told ``cpu=True``; otherwise every process believes it is alone (each trains on all the data,
each thinks it is the main process, barriers do nothing). The first ``PartialState`` of a
process fixes this for its lifetime, so pie creates it here, the same way everywhere.
"""

from __future__ import annotations

import os


def cpu_processes() -> bool:
    """Several processes and no CUDA: the CPU (gloo) process group is wanted."""
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def process_state():
    """accelerate's ``PartialState`` for this process, created with the right ``cpu`` flag."""
    from accelerate import PartialState

    return PartialState(cpu=cpu_processes())
