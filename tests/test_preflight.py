"""One preflight and one request check: the model is resolved once per engine, each request checked once
per rank (its input images read once), and a preflight mistake is kept for the first collective."""

from __future__ import annotations

import numpy as np
import pytest


def test_preflight_keeps_the_first_mistake_and_stops_there():
    from engine import EngineConfig
    from engine.preflight import preflight

    p = preflight(EngineConfig(model="flux-tiny", ulysses=2))  # one process: Ulysses 2 cannot be
    assert "--ulysses 2 does not divide the 1 sequence-parallel processes" in p.error
    assert p.model.info.family == "flux" and p.parallel is None and p.text_encoders is None
    ok = preflight(EngineConfig(model="flux-tiny"))
    assert ok.error is None and ok.parallel.describe() == "single" and ok.text_encoders.plan.placement == "replicated"


def test_the_engine_resolves_its_model_once(monkeypatch):
    import engine.loading.model as model
    from engine import Engine, EngineConfig

    calls = []
    resolve = model._directory
    monkeypatch.setattr(model, "_directory", lambda m: calls.append(m) or resolve(m))
    engine = Engine(EngineConfig(model="shapes"))
    engine.generate(_request(), output_type="latent")
    engine.close()
    assert calls == ["shapes"]


def _request(**kw):
    from engine import GenerateRequest

    return GenerateRequest(prompt="a red circle top left on a white background", steps=2, **kw)


def test_a_cli_request_is_checked_once_and_its_input_image_read_once(tmp_path, monkeypatch):
    import PIL.Image

    import engine.driver as driver
    from engine.generate import main
    from engine.image_io import read_png_params

    png = tmp_path / "in.png"
    PIL.Image.fromarray(np.full((64, 64, 3), 200, dtype=np.uint8)).save(png)
    checks, opens = [], []
    check, open_ = driver.check_request, PIL.Image.open
    monkeypatch.setattr(driver, "check_request", lambda r, *a, **kw: checks.append(r.seed) or check(r, *a, **kw))
    monkeypatch.setattr(PIL.Image, "open", lambda f, *a, **kw: opens.append(str(f)) or open_(f, *a, **kw))
    out = tmp_path / "out.png"
    main(["--model", "shapes", "--steps", "3", "--num-images", "2", "--seed", "5", "--image", str(png),
          "--output", str(out)])
    assert sorted(checks) == [5, 6]  # each request once (before: the first four times, the others three)
    assert opens.count(str(png)) == 2  # read once per request, in its check
    params = read_png_params(tmp_path / "out-001.png")
    assert params["seed"] == 6 and params["pipeline"] == "FluxImg2ImgPipeline"
    assert params["inputs"]["image"]["path"] == str(png)


def test_a_checked_batch_is_not_checked_again(monkeypatch):
    import engine.driver as driver
    from engine import Engine, EngineConfig

    engine = Engine(EngineConfig(model="shapes"))
    batch = engine.check_batch([_request(seed=1), _request(seed=2)])
    monkeypatch.setattr(driver, "check_request", lambda *a, **kw: pytest.fail("checked again"))
    results = engine.generate_batch(batch, output_type="latent")
    engine.close()
    assert [r.params["seed"] for r in results] == [1, 2]
