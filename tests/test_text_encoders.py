"""`--text-encoders first|sharded|auto` (engine/text_encoders): the embeddings are the replicated ones.

On 4 gloo ranks as one image (4 ranks per encoder group) and as two (--dp 2: 2 ranks per group, two
prompts, each group its own encoding rank / its own sharded copy; one spawn for both), for flux-tiny (CLIP + T5), sd3-tiny (CLIP-L, CLIP-G, T5) and
sana-tiny (Gemma-2, through transformers' own tensor-parallel plan), sdxl-tiny (two CLIPs, a UNet
pipeline's encode_prompt): every placement's encode_prompt
outputs equal the replicated pipeline's (fp32, ≤ 1e-5 relative), a `first` rank other than the
encoding one holds no text-encoder weight, a `sharded` rank holds its 1/N. The whole pipeline with
each placement is checked against diffusers' in tests/test_pipeline_parity.py and
tests/test_cfg_families.py (their layouts carry placements).
"""

from __future__ import annotations

import pytest
import torch

from tests.harness import run_distributed

MODELS = ("flux-tiny", "sd3-tiny", "sana-tiny", "sdxl-tiny")
PROMPTS = ("a small red circle top left", "a green tree by a lake at dawn")
NEGATIVE = "blue stripes"
GiB = 2**30


def _encode_kwargs(model: str, prompt: str) -> dict:
    common = dict(prompt=prompt, device=torch.device("cpu"), num_images_per_prompt=2, max_sequence_length=24)
    if model == "sdxl-tiny":  # CLIP's 77 tokens, always
        del common["max_sequence_length"]
        return dict(common, prompt_2=None, do_classifier_free_guidance=True, negative_prompt=NEGATIVE)
    if model == "flux-tiny":
        return dict(common, prompt_2=None)
    if model == "sd3-tiny":
        common.update(prompt_2=None, prompt_3=None)
    return dict(common, do_classifier_free_guidance=True, negative_prompt=NEGATIVE)


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _tensors(o)] if isinstance(out, (tuple, list)) else []


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if not a.is_floating_point():
        return float(not torch.equal(a, b))
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _local_numel(module) -> int:
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in module.parameters())


def _embeddings():
    """Per (layout, model, placement): the largest relative difference from the replicated outputs, and
    what this rank holds of each text encoder (numel, or None)."""
    from datetime import timedelta

    import torch.distributed as dist

    from engine.loading import load_pipeline
    from engine.models import family, get_preset
    from engine.text_encoders.encoders import TextEncoders
    from engine.text_encoders.placement import plan_text_encoders
    from shardiff_parallel.config import ParallelConfig
    from shardiff_parallel.mesh import Mesh

    layouts = [ParallelConfig(ulysses=4), ParallelConfig(dp=2, ulysses=2)]
    out = {}
    for layout in layouts:
        mesh = Mesh.build(layout, torch.device("cpu"), timeout=timedelta(seconds=60))
        prompt = PROMPTS[mesh.coord("dp")]  # each dp group encodes its own prompt
        for model in MODELS:
            ref = load_pipeline(model, dtype=torch.float32, device="cpu")
            want = _tensors(ref.encode_prompt(**_encode_kwargs(model, prompt)))
            full = {n: _local_numel(getattr(ref, n)) for n in get_preset(model).components if n.startswith("text_encoder")}
            for placement in ("first", "sharded"):
                plan = plan_text_encoders(model, placement, ranks=layout.world_size // layout.dp, dtype=torch.float32)
                texts = TextEncoders(plan, model, family(get_preset(model).family).encode_methods)
                texts.setup(mesh, timedelta(seconds=60))
                # The denoiser and VAE are the reference's: only the text encoders are loaded anew.
                reuse = {n: getattr(ref, n) for n in get_preset(model).components if n not in full}
                pipe = load_pipeline(model, dtype=torch.float32, device="cpu",
                                     components=reuse | texts.components(dtype=torch.float32, device="cpu", seed=0))
                texts.install(pipe)
                got = _tensors(pipe.encode_prompt(**_encode_kwargs(model, prompt)))
                assert len(got) == len(want)
                held = {n: None if getattr(pipe, n) is None else _local_numel(getattr(pipe, n)) for n in full}
                error = None
                if placement == "first":
                    # A mistake on the encoding rank reaches every rank (nobody waits for tensors).
                    try:
                        pipe.encode_prompt(**_encode_kwargs(model, prompt), no_such_argument=1)
                    except (TypeError, RuntimeError) as e:
                        error = str(e)
                out[(str(layout.degrees()), model, placement)] = dict(
                    err=max(_rel(g, w) for g, w in zip(got, want)), held=held, full=full, degrees=plan.degrees,
                    image_rank=texts.image_rank, error=error)
                texts.remove()
        dist.barrier()
    return out


def test_every_placement_gives_the_replicated_embeddings():
    results = run_distributed(_embeddings, 4, timeout=300)
    for rank, res in enumerate(results):
        assert len(res) == 4 * len(MODELS)
        for (layout, model, placement), r in res.items():
            where = f"rank {rank} {layout} {model} {placement}"
            assert r["err"] <= 1e-5, f"{where}: embeddings differ from the replicated ones by {r['err']:.2e}"
            for name, numel in r["held"].items():
                if placement == "first":
                    assert (numel is None) == (r["image_rank"] > 0), f"{where}: {name} {numel}"
                    assert r["error"] is not None and "no_such_argument" in r["error"], where
                else:
                    d = r["degrees"][name]
                    assert d > 1 or model != "sana-tiny", f"{where}: {name} not split"
                    # 1/d of the split weights plus the small replicated ones (norms, row biases, positions).
                    assert r["full"][name] / d <= numel <= 1.15 * r["full"][name] / d, (where, name, numel, d)
    # Gemma-2 (4 key/value heads) splits 4 ways on 4 ranks, T5 (4 heads) too; the CLIPs (2 heads) 2 ways,
    # two copies; with --dp 2 everything 2 ways.
    one = "{'dp': 1, 'cfg': 1, 'ring': 1, 'ulysses': 4, 'tp': 1}"
    two = "{'dp': 2, 'cfg': 1, 'ring': 1, 'ulysses': 2, 'tp': 1}"
    assert results[0][(one, "sd3-tiny", "sharded")]["degrees"] == {"text_encoder": 2, "text_encoder_2": 2, "text_encoder_3": 4}
    assert results[0][(one, "sana-tiny", "sharded")]["degrees"] == {"text_encoder": 4}
    assert results[0][(two, "sd3-tiny", "sharded")]["degrees"] == {"text_encoder": 2, "text_encoder_2": 2, "text_encoder_3": 2}
    # One encoding rank per image: ranks 0 and 2 with --dp 2.
    assert [r[(two, "flux-tiny", "first")]["image_rank"] for r in results] == [0, 1, 0, 1]


def test_bad_placements_are_refused_before_any_collective():
    from engine import EngineConfig
    from engine.generate import build_parser
    from engine.models import family
    from engine.runtime.distributed import UserError
    from engine.text_encoders.encoders import layout_varies
    from engine.text_encoders.placement import plan_text_encoders

    with pytest.raises(ValueError, match="--text-encoders must be auto, replicated, first or sharded, got 'all'"):
        EngineConfig(text_encoders="all")
    assert build_parser().parse_args([]).text_encoders == "auto"
    assert build_parser().parse_args(["--text-encoders", "sharded"]).text_encoders == "sharded"
    with pytest.raises(UserError, match="--text-encoders"):
        build_parser().parse_args(["--text-encoders", "half"])
    # UNets choose CFG split or data parallel per request: their ranks regroup, unless the layout is fixed.
    sd = family("sd")
    assert layout_varies(sd, EngineConfig(model="sd1.5-tiny"), 2)
    assert not layout_varies(sd, EngineConfig(model="sd1.5-tiny", parallel="cfg"), 2)
    assert not layout_varies(family("flux"), EngineConfig(model="flux-tiny"), 4)
    for placement in ("first", "sharded"):
        with pytest.raises(ValueError, match=f"--text-encoders {placement} keeps .* regroup.*--parallel cfg"):
            plan_text_encoders("sd1.5-tiny", placement, ranks=2, dtype=torch.float32, layout_varies=True)
    assert plan_text_encoders("sd1.5-tiny", "auto", ranks=2, dtype=torch.float32, layout_varies=True).placement == "replicated"


def test_flux_dev_text_encoder_memory_per_placement():
    """T5-XXL (4.76 B) + CLIP-L (123 M) in bf16, counted on the meta device."""
    from engine.text_encoders.placement import plan_text_encoders

    def per_rank(placement, ranks):
        return plan_text_encoders("flux-dev", placement, ranks=ranks, dtype=torch.bfloat16)

    replicated = per_rank("replicated", 4)
    assert replicated.bytes_per_rank / GiB == pytest.approx(9.10, abs=0.01)
    first = per_rank("first", 4)
    assert first.rank_bytes(0) == replicated.bytes_per_rank and first.rank_bytes(1) == 0
    assert per_rank("sharded", 2).bytes_per_rank / GiB == pytest.approx(4.55, abs=0.01)
    four = per_rank("sharded", 4)
    assert four.bytes_per_rank / GiB == pytest.approx(2.28, abs=0.01) and four.degrees == {"text_encoder": 4, "text_encoder_2": 4}
    # CLIP-L's 12 heads do not split 8 ways: 4 ways, two copies; T5-XXL's 64 heads do.
    eight = per_rank("sharded", 8)
    assert eight.degrees == {"text_encoder": 4, "text_encoder_2": 8}
    assert "text_encoder (CLIPTextModel) 4 ways (2 copies)" in eight.describe()
    # auto keeps them replicated where they fit (CPU: no limit known), shards where they do not.
    assert plan_text_encoders("flux-dev", "auto", ranks=4, dtype=torch.bfloat16).placement == "replicated"
    assert plan_text_encoders("flux-dev", "auto", ranks=4, dtype=torch.bfloat16, room=10 * GiB).placement == "replicated"
    tight = plan_text_encoders("flux-dev", "auto", ranks=4, dtype=torch.bfloat16, room=3 * GiB)
    assert tight.placement == "sharded" and "auto: 9.10 GiB of replicated text encoders do not fit" in tight.describe()


def test_tp_auto_shards_the_text_encoders_before_the_denoiser():
    """`--tp auto` with `--text-encoders auto`: sharding the text encoders (once per request) comes before
    TP (every step). flux-dev on 4 GPUs: 24 GB cards need TP-2 instead of TP-4, 40 GB ones none."""
    from engine.loading import inspect_model
    from engine.loading.auto_tp import choose_tp
    from engine.models import family
    from engine.text_encoders.encoders import TextEncoders
    from engine import EngineConfig

    info = inspect_model("flux-dev")

    def choose(gpu_gib, placement="auto"):
        text = TextEncoders.bytes_for_room(EngineConfig(model="flux-dev", text_encoders=placement), ranks=4,
                                           dtype=torch.bfloat16)
        return choose_tp("flux-dev", info, family("flux"), world_size=4, dp=1, cfg=1, dtype=torch.bfloat16,
                         gpu_bytes=int(gpu_gib * GiB), text_bytes=text)

    tp, why = choose(24)
    assert tp == 2 and "13.5 GiB" in why
    assert choose(24, "replicated")[0] == 4  # as before: 14.8 GiB on TP-4
    assert choose(40) == (1, "")  # 22.3 + 2.28 GiB ≤ 30
    assert choose(40, "replicated")[0] == 2
    assert choose(141) == (1, "")


def test_transformers_plans_cover_the_new_text_encoders():
    """Qwen3 (Z-Image), Mistral-3 (FLUX.2), Qwen2.5-VL (Qwen-Image): transformers' own plans, read from
    the model, split every attention and MLP projection, and the key/value heads bound the degree."""
    import transformers as tf
    from accelerate import init_empty_weights

    from engine.text_encoders.plans import plan_of, planned, shard_degree

    text = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8)
    models = [
        ("Qwen3Model", tf.Qwen3Config(**text)),
        ("Mistral3ForConditionalGeneration", tf.Mistral3Config(text_config=text, vision_config=dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8))),
        ("Qwen2_5_VLForConditionalGeneration", tf.Qwen2_5_VLConfig(text_config=text, vision_config=dict(
            depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32))),
    ]
    for cls, config in models:
        with init_empty_weights():
            model = getattr(tf, cls)(config)
        plan = plan_of(model)
        split = planned(model, plan)
        layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n
                  and "language_model" in n or (cls == "Qwen3Model" and isinstance(m, torch.nn.Linear))]
        assert layers and all(f"{n}.weight" in split for n in layers), (cls, [n for n in layers if f"{n}.weight" not in split])
        assert not any("visual" in n or "vision" in n for n in split), cls  # the vision towers stay whole
        assert shard_degree(model, plan, 4) == 2, cls  # 2 key/value heads


def test_one_rank_memory_bench_measures_what_is_counted(tmp_path, capsys):
    """engine.bench.text_encoders on flux-tiny: rank 0 of a fake 2-rank group holds exactly the counted shard."""
    import json

    from engine.bench.text_encoders import main

    out = tmp_path / "te.json"
    main(["--model", "flux-tiny", "--ranks", "2", "--repeats", "1", "--tokens", "24", "--json", str(out)])
    records = json.loads(out.read_text())
    assert {(r["placement"], r["ranks"]) for r in records} == {("replicated", 1), ("first", 2), ("sharded", 2)}
    for r in records:
        assert r["measured_gib"] == r["counted_gib"], r
    sharded = sum(r["measured_gib"] for r in records if r["placement"] == "sharded")
    assert sharded < 0.55 * sum(r["measured_gib"] for r in records if r["placement"] == "replicated")
    assert "sharded over 2 rank(s)" in capsys.readouterr().out
