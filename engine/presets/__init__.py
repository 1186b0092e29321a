"""How a random-weight preset becomes a pipeline: its spec (`spec.py`), its weights (`weights.py`),
the component configs several families share (`components.py`) and our word-level tokenizer
(`tokenizer.py`).

No checkpoint can be downloaded here, yet tests, demos and benchmarks need the exact module shapes
of real models. A preset is the configuration of every component of a real pipeline; its weights are
a pure function of (seed, parameter name), so every rank of a job builds the same model on its own
and a tensor-parallel loader can recreate any one parameter alone. The presets themselves live with
their families (`engine/models/`); `python -m engine.presets list|save` lists and writes them.
"""
