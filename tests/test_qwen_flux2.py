"""Qwen-Image and FLUX.2 (dev and klein) end to end on tiny random diffusers directories: every layout
(Ulysses-2, Ring-2, Ulysses-2 × Ring-2, TP-2, TP-2 × Ulysses-2, CFG-2, CFG-2 × Ulysses-2) gives the
single-process latents, and the single process gives diffusers' own pipeline's for the same seed.

Cases are uneven for every split: 48×80 → 15 image tokens; Qwen-Image's prompt keeps 11 text tokens
after its template, its negative prompt 7; FLUX.2 pads its text to 45. Qwen-Image's second request
is a batch of two prompts of different lengths, so the shorter one is padded and its text mask goes
through every layout; FLUX.2-klein's runs CFG on a batch of two prompts. Qwen-Image's per-token
`modulate_index` (the edit models' zero_cond_t) is checked on the transformer called directly, with
two images of different sizes in one sequence. Sharded loading reads exactly each TP rank's bytes.
"""

from __future__ import annotations

import pytest
import torch

from tests.harness import rel_l2, run_distributed

MODELS = ("qwen-image-tiny", "flux2-dev-tiny", "flux2-klein-tiny")
PROMPT, OTHER, NEGATIVE = "a small red circle top left", "a green tree", "blue stripes"
CFG_MODELS = ("qwen-image-tiny", "flux2-klein-tiny")  # FLUX.2-dev has no second branch
LAYOUTS = {
    2: [dict(ulysses=2), dict(ring=2), dict(tp=2), dict(cfg=2)],
    4: [dict(ulysses=2, ring=2), dict(tp=2, ulysses=2), dict(cfg=2, ulysses=2), dict(tp=2, ring=2)],
}


def _requests(model: str) -> list:
    from engine import GenerateRequest

    common = dict(height=48, width=80, steps=2, seed=5)
    if model == "qwen-image-tiny":
        return [GenerateRequest(prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=4.0, **common),
                # Two prompts of different lengths: the shorter is padded and masked (no CFG: its negative
                # prompt would be one string for two prompts).
                GenerateRequest(prompt=[PROMPT, OTHER], **common)]
    if model == "flux2-dev-tiny":
        return [GenerateRequest(prompt=PROMPT, guidance=4.0, max_sequence_length=45, **common)]
    return [GenerateRequest(prompt=PROMPT, guidance=4.0, max_sequence_length=45, **common),
            GenerateRequest(prompt=[PROMPT, OTHER], guidance=3.0, max_sequence_length=45, **common)]


def _runs(model: str, degrees: dict) -> list:
    """The requests a layout can run: CFG layouts only those with both branches."""
    reqs = _requests(model)
    if degrees.get("cfg", 1) > 1:
        fam = _family(model)
        reqs = [r for r in reqs if fam.uses_cfg(fam.call_kwargs(r))]
    return reqs


def _family(model: str):
    from engine.loading import inspect_model
    from engine.models import family

    return family(inspect_model(model).family)


def _generate(world: int, dirs: dict[str, str]) -> dict:
    from engine import Engine, EngineConfig

    out = {}
    layouts = [{}] if world == 1 else LAYOUTS[world]
    for model in MODELS:
        for degrees in layouts:
            if degrees.get("cfg", 1) > 1 and model not in CFG_MODELS:
                continue
            engine = Engine(EngineConfig(model=dirs[model], **degrees))
            if degrees.get("tp", 1) > 1:  # loaded sharded: each rank holds half of every split weight
                q = engine.denoiser.transformer_blocks[0].attn.to_q
                assert q.weight.shape[0] == q.out_features // 2
            for i, req in enumerate(_runs(model, degrees)):
                out[(model, str(degrees), i)] = engine.generate(req, output_type="latent").latents.clone()
            engine.close()
    if world > 1:
        out["modulate_index"] = _modulate_index_errors(world)
    return out


def _zero_cond_model_and_inputs():
    """A tiny Qwen-Image transformer with zero_cond_t (modulate_index: the first image's tokens use the
    timestep's modulation, the second image's a zero timestep's), on a target and a reference image."""
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel

    from engine.models.qwen_image import QWEN_IMAGE_TINY_TRANSFORMER
    from engine.presets.weights import materialize_

    with init_empty_weights(include_buffers=False):  # the rotary tables are plain attributes: real
        model = QwenImageTransformer2DModel(**{**QWEN_IMAGE_TINY_TRANSFORMER, "zero_cond_t": True})
    model = materialize_(model, prefix="transformer", seed=3, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    shapes = [[(1, 3, 5), (1, 2, 3)]]  # 15 + 6 image tokens
    kw = dict(hidden_states=torch.randn(1, 21, 16, generator=g),
              encoder_hidden_states=torch.randn(1, 9, 32, generator=g), timestep=torch.tensor([0.6]),
              img_shapes=shapes, return_dict=False)
    return model, kw


def _modulate_index_errors(world: int) -> dict:
    from engine.models import family
    from shardiff_parallel.attention import ParallelAttention
    from shardiff_parallel.config import ParallelConfig
    from shardiff_parallel.mesh import Mesh
    from shardiff_parallel.plan import apply_plan

    model, kw = _zero_cond_model_and_inputs()
    ref = model(**kw)[0]
    out = {}
    layouts = [dict(ulysses=2), dict(ring=2)] if world == 2 else [dict(ulysses=2, ring=2), dict(tp=2, ulysses=2)]
    for degrees in layouts:
        mesh = Mesh.build(ParallelConfig(**degrees), torch.device("cpu"))
        applied = apply_plan(model, family("qwen-image").plan, mesh, ParallelAttention(mesh))
        got = model(**kw)[0]
        applied.remove()
        out[str(degrees)] = rel_l2(got, ref)
    assert torch.equal(model(**kw)[0], ref)  # remove() put everything back
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from engine.models import get_preset

    root = tmp_path_factory.mktemp("qwen-flux2")
    return {m: str(get_preset(m).save(root / m)) for m in MODELS}


@pytest.fixture(scope="module")
def single(dirs):
    return _generate(1, dirs)


def test_single_process_equals_diffusers(dirs, single):
    from diffusers import DiffusionPipeline

    for model in MODELS:
        pipe = DiffusionPipeline.from_pretrained(dirs[model], dtype=torch.float32, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        fam = _family(dirs[model])
        for i, req in enumerate(_requests(model)):
            kw = dict(fam.call_kwargs(req), height=req.height, width=req.width, num_inference_steps=req.steps,
                      generator=torch.Generator("cpu").manual_seed(req.seed), output_type="latent")
            ref, got = pipe(**kw).images, single[(model, "{}", i)]
            assert torch.isfinite(ref).all() and got.shape == ref.shape, model
            assert rel_l2(got, ref) <= 1e-5, f"{model} request {i}: differs from diffusers by {rel_l2(got, ref):.2e}"
    # The padded prompt did get a mask: the batch's two prompts keep different token counts.
    qwen = DiffusionPipeline.from_pretrained(dirs["qwen-image-tiny"], dtype=torch.float32, local_files_only=True)
    _, mask = qwen.encode_prompt([PROMPT, OTHER], device="cpu")
    assert mask is not None and mask.sum(1).tolist() == [11, 8]


@pytest.mark.parametrize("world", [2, 4])
def test_layouts_equal_single_process(dirs, single, world):
    results = run_distributed(_generate, world, world, dirs, timeout=400)
    expected = {k for k in single if k[1] == "{}"}
    for rank, res in enumerate(results):
        for layout, err in res.pop("modulate_index").items():
            assert err <= 1e-5, f"rank {rank} zero_cond_t transformer {layout}: rel L2 {err:.2e}"
        assert {(m, i) for m, _, i in res} == {(m, i) for m, _, i in expected}
        for (model, degrees, i), lat in res.items():
            err = rel_l2(lat, single[(model, "{}", i)])
            assert err <= 1e-4, f"rank {rank} {model} {degrees} request {i}: latents rel L2 {err:.2e}"


@pytest.mark.parametrize("model", ["qwen-image-tiny", "flux2-dev-tiny"])
def test_sharded_loading_reads_only_each_ranks_slices(dirs, model):
    from pathlib import Path

    from engine.loading.sharded import load_sharded_denoiser
    from engine.loading.slices import SafetensorsSlices
    from shardiff_parallel.tensor import local_shards

    fam = _family(model)
    folder = Path(dirs[model]) / "transformer"
    tensor_bytes = {n: e.nbytes for n, e in SafetensorsSlices(folder).entries.items()}
    full = load_sharded_denoiser(dirs[model], fam, tp=1, tp_rank=0, dtype=torch.float32, device="cpu")
    full_params = dict(full.named_parameters())
    covered = {n: torch.zeros(b, dtype=torch.int32) for n, b in tensor_bytes.items()}
    for t in range(2):
        reader = SafetensorsSlices(folder, record_ranges=True)
        shard = load_sharded_denoiser(dirs[model], fam, tp=2, tp_rank=t, dtype=torch.float32, device="cpu",
                                      reader=reader)
        sl = local_shards(full, fam.plan.tp_styles, 2, t)
        assert reader.bytes_read == sum(b if n not in sl else b // 2 for n, b in tensor_bytes.items())
        for name, start, end in reader.ranges:
            covered[name][start:end] += 1
        for name, p in shard.named_parameters():
            ref = full_params[name].data
            assert torch.equal(p, ref if name not in sl else sl[name].take(ref)), name
    split = {n for n in local_shards(full, fam.plan.tp_styles, 2, 0)}
    # Most weights are split: the replicated ones are the embedders, norms and biases of row-split layers.
    assert sum(tensor_bytes[n] for n in split) > 0.97 * sum(tensor_bytes.values())
    covered_all = torch.cat(list(covered.values()))
    replicated = sum(b for n, b in tensor_bytes.items() if n not in split)
    assert int((covered_all == 2).sum()) == replicated
    assert int((covered_all == 1).sum()) + replicated == sum(tensor_bytes.values())
    assert int((covered_all > 2).sum()) == 0


def test_released_configs_and_bad_layouts():
    from engine import GenerateRequest
    from engine.loading import inspect_model
    from engine.models import family
    from shardiff_parallel.config import resolve_degrees

    heads = {m: inspect_model(m).num_heads for m in ("qwen-image", "flux2-dev", "flux2-klein-4b", "flux2-klein-9b")}
    assert heads == {"qwen-image": 24, "flux2-dev": 48, "flux2-klein-4b": 24, "flux2-klein-9b": 32}
    with pytest.raises(ValueError, match=r"24 attention heads"):
        resolve_degrees(32, 24, ulysses=32)  # fewer heads than Ulysses ranks (uneven splits are allowed)
    with pytest.raises(ValueError, match=r"--tp 5 does not divide the model's 48 attention heads.*: 2, 3, 4, 6, 8"):
        family("flux2").check_tp(inspect_model("flux2-dev"), 5)
    with pytest.raises(ValueError, match=r"--tp 5 does not divide the model's 32 attention heads.*: 2, 4, 8"):
        family("flux2-klein").check_tp(inspect_model("flux2-klein-9b"), 5)
    family("qwen-image").check_tp(inspect_model("qwen-image"), 8)
    assert inspect_model("flux2-dev").mlp_width == 18432 and inspect_model("qwen-image").spatial_multiple == 16
    # CFG: FLUX.2-dev has one call per step; the released klein models are step-distilled.
    with pytest.raises(ValueError, match="cannot use --cfg: Flux2Pipeline runs one transformer call per step"):
        family("flux2").check_axes(dict(cfg=2, ulysses=2))
    klein = family("flux2-klein")
    guided = klein.call_kwargs(GenerateRequest(prompt=PROMPT, guidance=4.0))
    with pytest.raises(ValueError, match="guidance-distilled"):
        klein.check_cfg(dict(cfg=2), guided, inspect_model("flux2-klein-4b"))
    klein.check_cfg(dict(cfg=2), guided, inspect_model("flux2-klein-tiny"))
    with pytest.raises(ValueError, match=r"guidance off \(needs --guidance > 1"):
        klein.check_cfg(dict(cfg=2), klein.call_kwargs(GenerateRequest(prompt=PROMPT, guidance=1.0)),
                        inspect_model("flux2-klein-tiny"))
    with pytest.raises(ValueError, match="empty prompt"):
        klein.call_kwargs(GenerateRequest(prompt=PROMPT, negative_prompt=NEGATIVE))
    with pytest.raises(ValueError, match="true CFG"):
        family("qwen-image").check_cfg(dict(cfg=2), family("qwen-image").call_kwargs(GenerateRequest(prompt=PROMPT)))


def test_tp_auto_follows_the_text_encoder_placement():
    """FLUX.2-dev (60.0 GiB transformer + 44.7 GiB Mistral in bf16) on H200s: --tp auto per placement."""
    from engine.loading import inspect_model
    from engine.loading.auto_tp import H200_GIB, choose_tp, weight_bytes_by_rank
    from engine.models import family

    info, fam, gib = inspect_model("flux2-dev"), family("flux2"), 2**30

    def choose(world, placement):
        return choose_tp("flux2-dev", info, fam, world_size=world, dp=1, cfg=1, dtype=torch.bfloat16,
                         gpu_bytes=int(H200_GIB * gib), text_encoders=placement)[0]

    # 104.90 GiB: just over 75% of an H200's 139.8 GiB (104.85): refused on one, TP-2 on two with the
    # encoder on every rank, no TP when the encoder is split over the two.
    with pytest.raises(ValueError, match=r"104\.9 GiB per rank without TP.*or give --tp 1"):
        choose(1, "replicated")
    assert choose(2, "replicated") == 2 and choose(2, "sharded") == 1
    # 4 GPUs of 100 GiB (budget 75): TP-2 with the encoder on every rank or on the first (74.9 GiB), none
    # when it is split over the 4 (72.0 GiB: what the encoder's TP plan splits, embeddings and vision tower whole).
    small = [choose_tp("flux2-dev", info, fam, world_size=4, dp=1, cfg=1, dtype=torch.bfloat16,
                       gpu_bytes=100 * gib, text_encoders=p)[0] for p in ("replicated", "first", "sharded")]
    assert small == [2, 2, 1]
    first = weight_bytes_by_rank("flux2-dev", fam, 2, torch.bfloat16, text_encoders="first", world_size=4)
    assert [round(b / gib, 1) for b in first] == [74.9, 30.2, 30.2, 30.2]
    sharded = weight_bytes_by_rank("flux2-dev", fam, 1, torch.bfloat16, text_encoders="sharded", world_size=4)
    assert round(max(sharded) / gib, 1) == 72.0
    # Qwen-Image (38.0 + 15.4 GiB) fits one H200 (or 80 GB card) whole; 48 GB cards need TP-2 (34.7 GiB per rank).
    q = inspect_model("qwen-image")
    assert choose_tp("qwen-image", q, family("qwen-image"), world_size=2, dp=1, cfg=1, dtype=torch.bfloat16,
                     gpu_bytes=int(H200_GIB * gib))[0] == 1
    assert choose_tp("qwen-image", q, family("qwen-image"), world_size=2, dp=1, cfg=1, dtype=torch.bfloat16,
                     gpu_bytes=int(47.5 * gib))[0] == 2
