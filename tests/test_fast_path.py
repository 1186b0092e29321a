"""The fast path (--quantize fp8, --quantize-qkv fp8, --cache): opt-in, refused with one line where it cannot
run, and the split image is the one-process image made with the same options — every rank takes the same
cache decisions, row-split FP8 layers quantize with whole-row scales, Q/K/V rows are rounded where they are
computed — on CPU with gloo processes (the FP8 product emulated exactly). The trained `shapes` model still draws what it is asked under each option at
its default, and the cache reuses steps there.
"""

from __future__ import annotations

import pytest
import torch

from tests.harness import rel_l2, run_distributed

FAST = dict(quantize="fp8", cache="first-block:0.5")
"""FP8 and a first-block threshold that reuses steps even on random tiny weights."""
EVERY = dict(FAST, quantize_qkv="fp8")
"""…and attention's Q, K, V in FP8 (sent so through the Ulysses exchange)."""
CASES = {
    # (model, options, degrees) per world size; the one-process reference runs each (model, options) once.
    # "flux-tiny-cfg": Flux with true CFG (two transformer calls per step, one per cfg rank).
    2: [("flux-tiny", FAST, dict(ulysses=2)), ("flux-tiny", FAST, dict(ring=2)), ("flux-tiny", FAST, dict(tp=2)),
        ("flux-tiny-cfg", FAST, dict(cfg=2)), ("flux-tiny-cfg", dict(cache="taylorseer"), dict(ulysses=2)),
        ("pixart-tiny", FAST, dict(cfg=2)), ("flux-tiny", EVERY, dict(ulysses=2))],
    4: [("flux-tiny", FAST, dict(tp=2, ulysses=2)), ("pixart-tiny", FAST, dict(cfg=2, ulysses=2)),
        ("flux-tiny", EVERY, dict(ulysses=2, ring=2)), ("pixart-tiny", EVERY, dict(cfg=2, ulysses=2)),
        ("flux-tiny-cfg", dict(cache="taylorseer"), dict(cfg=2, ring=2))],
}
# Why TP runs Flux without true CFG here: an FP8 input is a step function of the layer before it, and TP
# orders that layer's fp32 sums differently (attention over its heads, the reductions), so a value lying
# on an e4m3 rounding boundary can land one step apart; true CFG's ×4 amplifies such a step on this
# 64-wide model to 3.7e-4 after 8 steps (1e-6 without it). That is the FP8 path's own sensitivity, not a
# different computation: the rows' and tokens' scales are the one-process scales exactly
# (tests/test_fp8.py), and the row-split products are reduced in fp64 before their one rounding.


def _request(model: str):
    from engine import GenerateRequest

    common = dict(prompt="a small red circle top left", negative_prompt="blue stripes", steps=8, seed=3,
                  max_sequence_length=24)
    if model.startswith("flux-tiny"):
        return GenerateRequest(height=48, width=80, guidance=3.5, true_cfg_scale=4.0 if model.endswith("cfg") else 1.0,
                               **common)
    return GenerateRequest(height=80, width=48, guidance=4.5, **common)


def _runs(world: int) -> dict:
    from engine import Engine, EngineConfig

    cases = CASES[world] if world > 1 else sorted({(m, tuple(o.items()), ()) for w in CASES.values() for m, o, _ in w})
    out = {}
    for model, options, degrees in cases:
        options, degrees = dict(options), dict(degrees)
        engine = Engine(EngineConfig(model=model.removesuffix("-cfg"), **options, **degrees))
        result = engine.generate(_request(model), output_type="latent")
        out[(model, tuple(options.items()), tuple(degrees.items()))] = (result.latents.clone(), result.params["cache"],
                                                                          result.params["quantize"])
        engine.close()
    return out


@pytest.fixture(scope="module")
def one_process():
    return _runs(1)


@pytest.mark.parametrize("world", [2, 4])
def test_fast_path_on_every_axis_equals_one_process(one_process, world):
    for rank, runs in enumerate(run_distributed(_runs, world, world, timeout=600)):
        for (model, options, degrees), (latents, cache, quantize) in runs.items():
            ref_latents, ref_cache, ref_quantize = one_process[(model, options, ())]
            what = f"{model} {dict(options)} on {dict(degrees)}, rank {rank}"
            assert quantize == ref_quantize
            # The same decisions, step by step, per branch (each cfg rank logs the branch it computes).
            for branch, log in cache.items():
                if branch != "method":
                    assert log == ref_cache[branch], f"{what}: cache decisions {log} != {ref_cache[branch]}"
            err = rel_l2(latents, ref_latents)
            assert err <= 1e-4, f"{what}: {err:.2e} from the one-process result with the same options"
    # The reference itself skipped work, or the test would prove nothing about the decisions.
    for (model, options, _), (_, cache, _) in one_process.items():
        assert any(log["reused"] for b, log in cache.items() if b != "method"), f"{model} {options}: nothing reused"


# ------------------------------------------------------------------ the trained model under each default


@pytest.mark.parametrize("options", [dict(quantize="fp8"), dict(cache="first-block"), dict(cache="taylorseer"),
                                     dict(quantize="fp8", cache="first-block"),
                                     dict(quantize="fp8", quantize_qkv="fp8", cache="first-block")],
                         ids=["fp8", "first-block", "taylorseer", "fp8+first-block", "fp8+qkv+first-block"])
def test_shapes_model_draws_the_prompt_on_the_fast_path(options):
    from engine import Engine, EngineConfig, GenerateRequest
    from engine.toy import data, train

    engine = Engine(EngineConfig(model="shapes", **options))
    try:
        for prompt in train.REPORT_PROMPTS[::2]:
            result = engine.generate(GenerateRequest(prompt=prompt, steps=20, seed=0, height=64, width=64),
                                     output_type="np")
            image = (result.image * 255).round().clip(0, 255).astype("uint8")
            assert data.check_image(image, prompt) == [], f"{options} {prompt!r}: {data.analyse(image, data.parse_prompt(prompt)['background'])}"
            cache = result.params["cache"]
            if "cache" in options:
                assert sum(len(log["reused"]) for b, log in cache.items() if b != "method") >= 1, cache
            else:
                assert cache is None
            assert result.params["quantize"] == ("fp8 (emulated)" if "quantize" in options else "off")
            assert result.params["quantize_qkv"] == options.get("quantize_qkv", "off")
    finally:
        engine.close()


# ------------------------------------------------------------------ refusals, before any collective


@pytest.mark.parametrize("config, message", [
    (dict(cache="fbc"), "unknown method 'fbc'"),
    (dict(cache="first-block:2"), "the threshold is a relative change in (0, 1]"),
    (dict(cache="first-block:x"), "takes a number"),
    (dict(cache="taylorseer:1"), "the interval is 2 … 16"),
    (dict(quantize="int4"), "--quantize must be off or fp8"),
])
def test_bad_fast_options_are_refused_when_configured(config, message):
    from engine import EngineConfig

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("…", ".")):
        EngineConfig(**config)


@pytest.mark.parametrize("config, message", [
    (dict(model="sd1.5-tiny", quantize="fp8"), "convolutions, which FP8 linears do not speed up"),
    (dict(model="lumina2-tiny", cache="first-block"), "would mix the branches' states"),
    (dict(model="z-image-tiny", cache="first-block"), "run --cache taylorseer only"),
    (dict(model="flux-tiny", cache="first-block", cuda_graphs=True), "a CUDA graph replays one branch"),
])
def test_fast_path_refusals_in_the_preflight(config, message):
    from engine import EngineConfig
    from engine.preflight import preflight

    assert message in (preflight(EngineConfig(**config)).error or "")


def test_lora_switch_is_refused_once_the_weights_are_fp8(tmp_path):
    from engine import Engine, EngineConfig

    engine = Engine(EngineConfig(model="flux-tiny", quantize="fp8"))
    try:
        assert engine.set_loras([]) == []  # the same (empty) set: nothing to re-fuse
        with pytest.raises(ValueError, match="needs the bf16 weights, which are gone"):
            engine.set_loras([str(tmp_path / "missing.safetensors")])
    finally:
        engine.close()


def test_fp8_weights_count_one_byte_in_the_layout_rules():
    from engine.loading import resolve_model

    model = resolve_model("flux-dev")
    bf16 = model.weight_bytes(1, torch.bfloat16, text_bytes=0)
    fp8 = model.weight_bytes(1, torch.bfloat16, text_bytes=0, quantize="fp8")
    # Flux.1-dev's 11.9 B transformer: ~22.2 GiB in bf16; its blocks' linears (~11.2 B) at 1 byte.
    assert 0.45 < fp8 / bf16 < 0.6, (bf16 / 2**30, fp8 / 2**30)
    assert model.weight_bytes(2, torch.bfloat16, text_bytes=0, quantize="fp8") < fp8


def test_the_server_answer_names_the_fast_path():
    from engine.serve.admission import JobResult
    from engine.serve.api import encode_response
    from engine.serve.protocol import Encoded

    params = dict(prompt="p", seed=3, width=64, height=64, quantize="fp8 (emulated)",
                  cache={"method": "first-block:0.08", "image": {"computed": [0, 2], "reused": [1]}})
    answer = encode_response(JobResult("img-1", [Encoded("AAAA", params, 0.1)], 0.0, 0.1, 0.1))
    assert answer["parameters"]["quantize"] == "fp8 (emulated)"
    assert answer["data"][0]["cache"]["image"]["reused"] == [1]
    exact = encode_response(JobResult("img-2", [Encoded("AAAA", {**params, "quantize": "off", "cache": None}, 0.1)],
                                      0.0, 0.1, 0.1))
    assert "cache" not in exact["data"][0] and exact["parameters"]["quantize"] == "off"
