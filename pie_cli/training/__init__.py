"""Fine-tuning Stable Diffusion on report-image pairs (`pie finetune`).

config.py (options, YAML, precedence; torch-free) -> data.py (records from the dataset formats;
torch-free) -> dataset.py (batches) -> loop.py (accelerate loop, checkpoints, validation) -> lora.py.
"""
