"""`pie finetune` as a service: fine-tuning Stable Diffusion on report-image pairs.

runner.py (plan: configuration, checks, data; train: the run folder and the summary) drives
config.py (TrainSpec, YAML recipes, precedence; torch-free) -> data.py + formats.py (records
from the dataset formats; torch-free, so --dry-run is fast) -> dataset.py (batches) ->
loop.py (the accelerate loop) with lora.py (adapters), checkpoints.py (complete-or-absent
checkpoints) and outputs.py (validation samples, final weights).
"""
