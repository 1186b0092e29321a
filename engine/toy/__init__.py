"""The `shapes` toy model: a procedural dataset, a tiny Flux-family pipeline trained on it, and its training script.

The trained weights ship in `engine/assets/shapes` (a plain diffusers directory, safetensors only) and are the
engine's default `--model`, so a first run on any machine draws what the prompt asks for:

    python -m engine.generate --prompt "a blue square bottom right on a yellow background"

`python -m engine.toy.train --out DIR` reproduces them (see engine/toy/train.py).
"""
