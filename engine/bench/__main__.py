"""`torchrun --nproc-per-node N -m engine.bench`: the side-by-side per-step benchmark (engine/bench/steps.py)."""

from engine.runtime.distributed import run_main

from .steps import main

run_main(lambda: main())
