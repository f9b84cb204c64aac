"""The core: the project folder (spec, data, model, checkpoints), the trainer, errors and progress."""
