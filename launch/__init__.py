"""Single-node launcher: `python -m launch --gpus N -- <engine args>` wraps torchrun."""
