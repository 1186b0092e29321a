"""Qwen-Image 2.1's transformer under the mesh: block-causal attention and the per-rank prefix cache.

The attention alone: `attend_block` over any query range and key block, merged, equals a dense masked
softmax of diffusers' rule `(q >= k) or same_image_block` (what Ring computes block by block, Ulysses
in one block). The transformer: a tiny random QwenImage21Transformer2DModel with a condition image
inside the prompt, a batch of two prompts of which one is padded, run as diffusers' loop runs it — a
prefill that fills the cache ("extract"), a cached step, and an uncached prefill of the same inputs —
gives diffusers' own processor's outputs on one process and on Ulysses-2, Ring-2, TP-2, Ulysses-2 ×
Ring-2, Ring-4 and TP-2 × Ulysses-2. 39 joint tokens: uneven pieces, the condition image and the
target cut between ranks.
"""

from __future__ import annotations

import pytest
import torch

from tests.harness import rel_l2, run_distributed

LAYOUTS = {2: [dict(ulysses=2), dict(ring=2), dict(tp=2)],
           4: [dict(ulysses=2, ring=2), dict(ring=4), dict(tp=2, ulysses=2)]}


def _dense_reference(q, k, v, image_ids, scale):
    S = q.shape[2]
    pos = torch.arange(S)
    same = (image_ids[:, None] == image_ids[None, :]) & (image_ids[:, None] >= 0)
    allowed = (pos[:, None] >= pos[None, :]) | same
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v.double()


@pytest.mark.parametrize("cuts", [[39], [20, 19], [10, 10, 10, 9], [3, 13, 1, 22]])
def test_block_causal_blocks_merge_to_the_dense_rule(cuts):
    from shardiff_kernels.registry import get_kernel
    from shardiff_parallel.block_causal import BlockCausal, attend_block
    from shardiff_parallel.blocks import merge_partial_masked

    # text [0, 3), condition image [3, 11), text [11, 15), target [15, 39)
    causal = BlockCausal(((0, 3, True), (3, 11, False), (11, 15, True)))
    image_ids = torch.tensor([-1] * 3 + [0] * 8 + [-1] * 4 + [1] * 24)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 39, 8, generator=g) for _ in range(3))
    ref = _dense_reference(q, k, v, image_ids, 8 ** -0.5)
    starts = [sum(cuts[:i]) for i in range(len(cuts))]
    for qs, qn in zip(starts, cuts):
        out = torch.zeros(2, 3, qn, 8)
        lse = torch.full((2, 3, qn), float("-inf"))
        for ks, kn in zip(starts, cuts):
            got = attend_block(get_kernel("math"), q[:, :, qs:qs + qn], k[:, :, ks:ks + kn], v[:, :, ks:ks + kn],
                               q_start=qs, k_start=ks, causal=causal, length=39, scale=None)
            if got is not None:
                out, lse = merge_partial_masked(out, lse, *got)
            else:  # a block no query sees lies wholly in their future, outside their image
                assert ks >= qs + qn
        assert rel_l2(out, ref[:, :, qs:qs + qn]) <= 1e-6


def _model():
    from accelerate import init_empty_weights
    from diffusers import QwenImage21Transformer2DModel

    from engine.models.qwen_image21 import QWEN_IMAGE21_TINY_TRANSFORMER
    from engine.presets.weights import materialize_

    with init_empty_weights(include_buffers=False):
        model = QwenImage21Transformer2DModel(**QWEN_IMAGE21_TINY_TRANSFORMER)
    return materialize_(model, prefix="transformer", seed=3, device="cpu", dtype=torch.float32).eval()


def _inputs(step: int) -> dict:
    """Step `step`'s inputs: two prompts of 9 vision-language positions (text, a 2×4 condition image's 2 slots, text), the
    second one's last two text tokens padded; a 4×6 target (6 slots)."""
    g = torch.Generator().manual_seed(10)  # the prefix (prompt, condition image) is the same at every step
    prompt, condition = torch.randn(2, 9, 32, generator=g), torch.randn(2, 8, 8, generator=g)
    target = torch.randn(2, 24, 8, generator=torch.Generator().manual_seed(11 + step))
    img_mask = torch.tensor([[False] * 3 + [True] * 2 + [False] * 4 + [True] * 6] * 2)
    text_mask = torch.ones(2, 9, dtype=torch.bool)
    text_mask[1, 7:] = False
    return dict(hidden_states=torch.cat([condition, target], 1), encoder_hidden_states=prompt,
                timestep=torch.tensor([0.9, 0.9]) - 0.3 * step, img_shapes=[[(1, 2, 4), (1, 4, 6)]] * 2, img_mask=img_mask,
                encoder_hidden_states_mask=text_mask, return_dict=False)


def _denoise(model) -> list[torch.Tensor]:
    """diffusers' loop: prefill filling the cache, a cached step; then the second step uncached."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    cache = QwenImage21KVCache(len(model.transformer_blocks))
    with torch.no_grad():
        return [model(**_inputs(0), kv_cache=cache, kv_cache_mode="extract")[0],
                model(**_inputs(1), kv_cache=cache, kv_cache_mode="cached")[0],
                model(**_inputs(1))[0]]


def _errors(world: int) -> dict:
    from engine.models.qwen_image21 import QWEN_IMAGE21_PLAN
    from shardiff_parallel.attention import ParallelAttention
    from shardiff_parallel.config import ParallelConfig
    from shardiff_parallel.mesh import Mesh
    from shardiff_parallel.plan import apply_plan

    model = _model()
    ref = _denoise(model)
    out = {}
    for degrees in LAYOUTS.get(world, [{}]):
        mesh = Mesh.build(ParallelConfig(**degrees), torch.device("cpu")) if degrees else Mesh.single(torch.device("cpu"))
        applied = apply_plan(model, QWEN_IMAGE21_PLAN, mesh, ParallelAttention(mesh))
        got = _denoise(model)
        applied.remove()
        out[str(degrees)] = [rel_l2(a, b) for a, b in zip(got, ref)]
    assert all(torch.equal(a, b) for a, b in zip(_denoise(model), ref))  # remove() put everything back
    return out


def test_single_process_equals_diffusers():
    # diffusers' own cache is exact: the cached step is the uncached one.
    model = _model()
    extract, cached, uncached = _denoise(model)
    assert extract.shape == (2, 39, 8) and cached.shape == (2, 24, 8)
    assert rel_l2(cached, uncached[:, 15:]) <= 1e-5
    for i, err in enumerate(_errors(1)["{}"]):
        assert err <= 1e-5, f"call {i}: rel L2 {err:.2e} from diffusers"


@pytest.mark.parametrize("world", [2, 4])
def test_layouts_equal_diffusers(world):
    for rank, res in enumerate(run_distributed(_errors, world, world, timeout=300)):
        assert set(res) == {str(d) for d in LAYOUTS[world]}
        for layout, errs in res.items():
            for i, err in enumerate(errs):
                assert err <= 1e-5, f"rank {rank} {layout} call {i} (extract, cached, uncached): rel L2 {err:.2e}"


# ------------------------------------------------------------------ QwenImage21Pipeline end to end

PIPELINE_LAYOUTS = [dict(ulysses=2), dict(ring=2), dict(tp=2), dict(cfg=2)]


def _requests() -> list:
    """Text to image, and a condition image (encoded at ~1024² pixels: 41×25 tokens beside the 4×6 target), both
    under true CFG: two transformer calls per step, each with its own prefix cache, of different lengths."""
    import numpy as np
    from PIL import Image

    from engine import GenerateRequest

    condition = Image.fromarray(np.random.default_rng(7).integers(0, 256, (48, 80, 3), dtype=np.uint8))
    common = dict(prompt="a small red circle", negative_prompt="blue", true_cfg_scale=4.0, height=64, width=96,
                  steps=2, seed=5)
    return [GenerateRequest(**common), GenerateRequest(image=condition, **{**common, "prompt": "make it red"})]


def _kept(engine) -> int:
    processors = (getattr(m, "processor", None) for m in engine.denoiser.modules())
    return sum(len(p.kept) for p in processors if hasattr(p, "kept"))


def _pipeline_runs(world: int, directory: str) -> dict:
    from engine import Engine, EngineConfig

    out = {}
    for degrees in [{}] if world == 1 else PIPELINE_LAYOUTS:
        engine = Engine(EngineConfig(model=directory, **degrees))
        for i, req in enumerate(_requests()):
            result = engine.generate(req, output_type="latent")
            assert result.params["pipeline"] == "QwenImage21Pipeline"
            assert _kept(engine) == 0, "a request's prefix K/V outlived it"
            out[(str(degrees), i)] = result.latents.clone()
        engine.close()
    return out


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    from engine.models import get_preset

    return str(get_preset("qwen-image-2.1-tiny").save(tmp_path_factory.mktemp("qwen-image-2.1") / "tiny"))


@pytest.fixture(scope="module")
def single(directory):
    return _pipeline_runs(1, directory)


def test_pipeline_single_process_equals_diffusers(directory, single):
    import diffusers

    from engine.loading import processors

    extra = {}
    if processors.needs_stand_in("Qwen3VLProcessor"):
        extra["processor"] = processors.load("Qwen3VLProcessor", f"{directory}/processor")
    pipe = diffusers.QwenImage21Pipeline.from_pretrained(directory, dtype=torch.float32, local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    for i, req in enumerate(_requests()):
        kw = dict(prompt=req.prompt, negative_prompt=req.negative_prompt, true_cfg_scale=req.true_cfg_scale,
                  height=req.height, width=req.width, num_inference_steps=req.steps, output_type="latent",
                  generator=torch.Generator("cpu").manual_seed(req.seed))
        if req.image is not None:
            kw["image"] = req.image
        ref, got = pipe(**kw).images, single[("{}", i)]
        assert torch.isfinite(ref).all() and got.shape == ref.shape == (1, 4 * 6, 8)
        assert rel_l2(got, ref) <= 1e-5, f"request {i}: differs from diffusers by {rel_l2(got, ref):.2e}"


def test_pipeline_layouts_equal_single_process(directory, single):
    for rank, res in enumerate(run_distributed(_pipeline_runs, 2, 2, directory, timeout=600)):
        assert {k[1] for k in res} == {0, 1} and len(res) == 2 * len(PIPELINE_LAYOUTS)
        for (layout, i), lat in res.items():
            err = rel_l2(lat, single[("{}", i)])
            assert err <= 1e-5, f"rank {rank} {layout} request {i}: latents rel L2 {err:.2e}"


def test_pipeline_requests_and_family():
    from PIL import Image
    from shardiff_parallel.config import ParallelConfig

    from engine import GenerateRequest
    from engine.loading import inspect_model
    from engine.models import family
    from engine.request_check import check_request

    fam, info = family("qwen-image-2.1"), inspect_model("qwen-image-2.1")
    assert (info.num_heads, info.joint_attention_dim, info.spatial_multiple, info.mlp_width) == (32, 4096, 32, 12288)
    tiny = inspect_model("qwen-image-2.1-tiny")
    wide = Image.new("RGB", (160, 96))
    # Without a size: ~1024² pixels at the last condition image's aspect.
    checked = check_request(GenerateRequest(prompt="a", image=[Image.new("RGB", (64, 64)), wide]), tiny, fam,
                            ParallelConfig())
    assert (checked.width, checked.height) == (1312, 800)
    for kw, layout, msg in [
        (dict(image=[wide] * 11), {}, "QwenImage21Pipeline takes at most 10 input images, got 11"),
        (dict(max_sequence_length=64), {}, "--max-sequence-length: QwenImage21Pipeline takes none"),
        (dict(height=80), {}, "--height 80 is not a multiple of 32"),
        ({}, dict(cfg=2), r"guidance off \(needs true CFG"),
    ]:
        with pytest.raises(ValueError, match=msg):
            check_request(GenerateRequest(prompt="a", **kw), tiny, fam, ParallelConfig(**layout))
    with pytest.raises(ValueError, match="--tp 5 does not divide the model's 32 attention heads"):
        fam.check_tp(info, 5)
