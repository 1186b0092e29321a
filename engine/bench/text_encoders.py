"""`python -m engine.bench.text_encoders --model flux-dev --ranks 1,2,4,8`: one rank's text-encoder memory
for each placement, measured on this one device.

For every `--text-encoders` placement and rank count, what the rank holding the most holds: its
weights (counted from the configs, as the engine decides, and measured: the device's allocated bytes
after loading), and the peak of one forward pass over the real token count. Run in one process:
`sharded` over N ranks is rank 0 of a fake N-rank process group (torch's `fake` backend: collectives
return at once), so the loader builds exactly rank 0's shard and the forward does rank 0's compute —
the memory and compute one GPU of N would see, without the communication (`first`'s encoding rank
is the replicated one; its other ranks hold nothing). Multi-GPU end-to-end figures, with the real
collectives: engine.bench.e2e --text-encoders.

    python -m engine.bench.text_encoders --model flux-dev --ranks 1,2,4,8 --json te.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from engine.config import DTYPES
from engine.loading.inspect import is_preset
from engine.runtime.distributed import pick_device, run_main
from engine.text_encoders.components import component_folder, counting_model
from engine.text_encoders.placement import plan_text_encoders

GiB = 2**30


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m engine.bench.text_encoders", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="flux-dev", help="preset name or diffusers directory")
    p.add_argument("--ranks", default="1,2,4,8", help="rank counts per image, comma-separated")
    p.add_argument("--tokens", type=int, default=512, help="text tokens (encoders with fewer positions take theirs)")
    p.add_argument("--dtype", default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default=None)
    p.add_argument("--repeats", type=int, default=3, help="timed forward passes (median)")
    p.add_argument("--json", default=None, help="write the records to this file")
    return p.parse_args(argv)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated(device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _param_bytes(module) -> int:
    from torch.distributed.tensor import DTensor

    return sum(t.numel() * t.element_size() for t in (p.to_local() if isinstance(p, DTensor) else p
                                                         for p in module.parameters()))


def _whole(model: str, name: str, dtype, device):
    if is_preset(model):
        from engine.models import get_preset

        return get_preset(model).build_component(name, dtype=dtype, device=device)
    import transformers

    from engine.loading.safety import check_weight_files, model_dir, read_model_index

    index = read_model_index(model_dir(model))
    check_weight_files(model_dir(model), index)
    cls = getattr(transformers, index[name][1])
    return cls.from_pretrained(component_folder(model, name), dtype=dtype, local_files_only=True,
                               use_safetensors=True).to(device).eval()


def _sharded(model: str, name: str, degree: int, dtype, device):
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    from engine.text_encoders.sharded import load_sharded_text_encoder

    group = dist.group.WORLD if degree == dist.get_world_size() else dist.new_group(list(range(degree)))
    mesh = DeviceMesh.from_group(group, device.type, mesh=list(range(degree)))
    return load_sharded_text_encoder(model, name, mesh, dtype=dtype, device=device)


def _forward(module, tokens: int, device, repeats: int) -> tuple[float | None, float]:
    """(peak GiB above the weights, median ms) of one forward over `tokens` random ids."""
    config = module.config.get_text_config() if hasattr(module.config, "get_text_config") else module.config
    length = min(tokens, getattr(config, "max_position_embeddings", None) or tokens)
    ids = torch.randint(0, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0)).to(device)
    times, base = [], _allocated(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        for _ in range(1 + repeats):
            _sync(device)
            start = time.perf_counter()
            module(input_ids=ids)
            _sync(device)
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(device) - base) / GiB if device.type == "cuda" else None
    return peak, statistics.median(times[1:]) * 1e3


def _register_fake_backend() -> None:
    """torch's `fake` process group (what torch.testing._internal.distributed.fake_pg registers, without
    importing torch's test utilities, 3 s): every collective returns at once, nothing is sent."""
    import torch.distributed as dist
    from torch._C._distributed_c10d import FakeProcessGroup

    if "FAKE" in dist.Backend._plugins:
        return
    dist.Backend.register_backend(
        dist.Backend.FAKE,
        lambda common, backend: FakeProcessGroup._create_internal(common.group_rank, common.group_size, backend),
        extended_api=True, devices=["cpu", "cuda"],
    )


def measure(model: str, placement: str, ranks: int, *, dtype, device, tokens: int, repeats: int) -> list[dict]:
    import torch.distributed as dist

    plan = plan_text_encoders(model, placement, ranks=ranks, dtype=dtype)
    rows = []
    fake = plan.placement == "sharded"
    if fake:
        _register_fake_backend()
        dist.init_process_group("fake", rank=0, world_size=ranks, store=dist.HashStore())
    try:
        for name, cls in plan.classes.items():
            degree = plan.degrees[name]
            before = _allocated(device)
            module = _sharded(model, name, degree, dtype, device) if degree > 1 else _whole(model, name, dtype, device)
            measured = (_allocated(device) - before) if device.type == "cuda" else _param_bytes(module)
            peak, ms = _forward(module, tokens, device, repeats)
            rows.append(dict(model=model, placement=plan.placement, asked=placement, ranks=ranks, component=name,
                             cls=cls, degree=degree, counted_gib=round(plan.local_bytes[name] / GiB, 6),
                             measured_gib=round(measured / GiB, 6), forward_peak_gib=None if peak is None else round(peak, 6),
                             forward_ms=round(ms, 2), whole_gib=round(plan.full_bytes[name] / GiB, 6)))
            del module
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if fake:
            dist.destroy_process_group()
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if args.dtype == "auto" else DTYPES[args.dtype]
    ranks = sorted({int(r) for r in args.ranks.split(",")})
    for name in plan_text_encoders(args.model, "replicated", ranks=1, dtype=dtype).classes:
        counting_model(args.model, name)  # built once, before any timing
    # Replicated is the same on any number of ranks, and `first`'s encoding rank holds just that.
    replicated = measure(args.model, "replicated", 1, dtype=dtype, device=device, tokens=args.tokens,
                         repeats=args.repeats)
    records = list(replicated)
    for n in (r for r in ranks if r > 1):
        records += [dict(r, placement="first", asked="first", ranks=n) for r in replicated]
        records += measure(args.model, "sharded", n, dtype=dtype, device=device, tokens=args.tokens,
                           repeats=args.repeats)
    # GiB for real models, MiB for the tiny ones.
    scale, unit = (1, "GiB") if max(r["whole_gib"] for r in records) >= 0.1 else (1024, "MiB")
    print(f"{args.model}, {dtype}, {device}: text encoders per rank (the rank holding the most), {unit}")
    print(f"{'placement':<11}{'ranks':>6}  {'component':<16}{'class':<30}{'split':>6}{'counted':>9}{'measured':>10}"
          f"{'fwd peak':>10}{'fwd ms':>9}")
    for r in records:
        peak = "-" if r["forward_peak_gib"] is None else f"{r['forward_peak_gib'] * scale:.3f}"
        print(f"{r['placement']:<11}{r['ranks']:>6}  {r['component']:<16}{r['cls']:<30}{r['degree']:>6}"
              f"{r['counted_gib'] * scale:>9.3f}{r['measured_gib'] * scale:>10.3f}{peak:>10}{r['forward_ms']:>9.1f}")
    by = {}
    for r in records:
        by.setdefault((r["placement"], r["ranks"]), []).append(r)
    for (placement, n), rows in by.items():
        total = sum(r["measured_gib"] for r in rows) * scale
        others = " (0 on the other ranks)" if placement == "first" else ""
        print(f"  {placement} over {n} rank(s): {total:.3f} {unit} of text-encoder weights on the rank holding the "
              f"most{others}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    run_main(main)
