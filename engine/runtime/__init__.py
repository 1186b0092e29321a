"""What runs around the model: process groups, the startup agreement and failing fast
(`distributed.py`), regional torch.compile (`compile.py`) and CUDA-graph replay (`cuda_graphs.py`)."""
