"""The command line declared once: flags made from the dataclasses' fields (engine/cli_flags.py), their
defaults the fields', docs/CLI.md generated from the same declarations, and engine.config import-light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Every flag the two commands had before they were generated from the declarations (README, docs/).
GENERATE = {
    "--prompt", "--negative-prompt", "--height", "--width", "--steps", "--guidance", "--true-cfg-scale", "--seed",
    "--max-sequence-length", "--output", "--overwrite", "--prompts-file", "--num-images", "--image", "--mask-image",
    "--max-prompt-chars",
    "--control-image", "--controlnet-scale", "--control-mode", "--strength", "--pag-scale", "--keep-image-size",
}
ENGINE = {
    "--model", "--ulysses", "--ring", "--tp", "--tp-comm", "--cfg", "--dp", "--text-encoders", "--dtype", "--device",
    "--attention-backend", "--compile", "--cuda-graphs", "--vae-parallel", "--timeout", "--parallel", "--lora",
    "--controlnet",
    # The fast path (docs/FAST_PATH.md).
    "--quantize", "--quantize-qkv", "--cache",
}
SERVE = {
    "--gpus", "--procs", "--host", "--port", "--max-queue", "--request-timeout", "--warmup-sizes", "--max-restarts",
    "--restart-backoff", "--stop-grace", "--drain-timeout", "--max-images",
    # Bounds and access (the server against careless and hostile clients).
    "--max-steps", "--max-prompt-chars", "--max-body-mb", "--max-input-pixels", "--api-key", "--cors-origin",
    "--heartbeat-timeout",
    # Several model groups behind one queue, and the LoRA dispatch bound.
    "--replicas", "--max-passes",
}


def _options(parser) -> dict[str, object]:
    return {s: a for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}


def test_every_flag_kept_with_the_dataclasses_defaults():
    from engine.batch_cli import DEFAULT_PROMPT, requests_from_args
    from engine.config import EngineConfig, GenerateRequest
    from engine.generate import build_parser, engine_config
    from engine.serve.cli import build_parser as serve_parser
    from engine.serve.options import ServeOptions

    generate, serve = build_parser(), serve_parser()
    assert set(_options(generate)) == GENERATE | ENGINE
    assert set(_options(serve)) == SERVE | ENGINE
    # No flag given: exactly the dataclasses' defaults.
    args = generate.parse_args([])
    assert engine_config(args) == EngineConfig()
    assert requests_from_args(args) == [GenerateRequest(prompt=DEFAULT_PROMPT)]
    served = serve.parse_args([])
    assert engine_config(served) == EngineConfig()
    from engine.serve.cli import option_flags
    from engine.cli_flags import values

    assert ServeOptions(world_size=1, **values(served, option_flags())) == ServeOptions(world_size=1)
    # Spellings that differ from the field names, repeatable flags, `auto`, choices.
    args = generate.parse_args(["--timeout", "5", "--lora", "a.safetensors:0.5", "--lora", "b.safetensors",
                                "--controlnet", "cn", "--tp", "auto", "--ulysses", "2", "--tp-comm", "overlap",
                                "--controlnet-scale", "0.7,0.5", "--keep-image-size", "--image", "x.png"])
    config = engine_config(args)
    assert config.timeout_s == 5.0 and config.tp is None and config.ulysses == 2 and config.tp_comm == "overlap"
    assert [(lo.path, lo.scale) for lo in config.loras] == [("a.safetensors", 0.5), ("b.safetensors", 1.0)]
    assert config.controlnets == ("cn",)
    request = requests_from_args(args)[0]
    assert request.controlnet_scale == (0.7, 0.5) and request.keep_image_size and request.image == "x.png"
    assert _options(generate)["--tp-comm"].choices == ("allreduce", "sequence", "overlap")
    assert _options(generate)["--text-encoders"].choices == ("auto", "replicated", "first", "sharded")
    assert _options(generate)["--vae-parallel"].choices == ("auto", "on", "off")
    assert _options(generate)["--parallel"].choices == ("auto", "cfg", "dp")


def test_help_is_grouped_and_every_flag_has_its_text():
    from engine.generate import build_parser, flags

    text = build_parser().format_help()
    sections = ["prompts and output:", "the image:", "input images and guidance", "model:", "parallel layout:",
                "kernels, compilation, timeouts:"]
    assert [text.index(s) for s in sections] == sorted(text.index(s) for s in sections)
    assert text.index("\n  --ulysses ULYSSES") > text.index("parallel layout:") > text.index("\n  --model MODEL")
    assert all(f.help for f in flags()), [f.flag for f in flags() if not f.help]
    # The degrees' text comes from Degrees (parallel/config.py), shared with the resolved ParallelConfig.
    assert "Ulysses degree: all-to-all" in text and "(default: auto)" in text


def test_cli_md_is_what_the_declarations_say():
    from engine.cli_doc import markdown

    assert (REPO / "docs" / "CLI.md").read_text(encoding="utf-8") == markdown(), (
        "docs/CLI.md is out of date: python -m engine.cli_doc > docs/CLI.md")


def test_the_dataclasses_import_nothing_heavy():
    # engine.config (and building its dataclasses) stays off the engine: no torch.distributed-using module of
    # ours, no diffusers / transformers / PIL, no model families, loaders or kernels.
    code = ("import sys; import engine.config as c; c.EngineConfig(ulysses=2); c.GenerateRequest(prompt='x');"
            "print(' '.join(sorted(sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    loaded = set(r.stdout.split())
    ours = {m for m in loaded if m.split(".")[0] in ("engine", "shardiff_parallel", "shardiff_kernels", "launch")}
    assert ours <= {"engine", "engine.config", "engine.cli_flags", "engine.validation", "engine.lora",
                    "engine.runtime", "engine.runtime.quiet", "engine.text_encoders", "engine.text_encoders.names",
                    "shardiff_parallel", "shardiff_parallel.config",
                    "shardiff_parallel.cache_config"}, sorted(ours)  # --cache's parser: math and a dataclass
    heavy = {m for m in loaded if m.split(".")[0] in ("diffusers", "transformers", "accelerate", "PIL", "safetensors")}
    assert not heavy, sorted(heavy)[:10]


def test_cli_bounds_prompts_and_text_tokens_as_the_server_does():
    import pytest

    from engine.batch_cli import requests_from_args
    from engine.generate import build_parser

    args = build_parser().parse_args(["--prompt", "a" * 20, "--max-prompt-chars", "10"])
    with pytest.raises(ValueError, match="20 characters, more than --max-prompt-chars 10"):
        requests_from_args(args, "shapes")
    args = build_parser().parse_args(["--max-sequence-length", "100000"])
    with pytest.raises(ValueError, match="--max-sequence-length 100000 is more than shapes's tokenizers take"):
        requests_from_args(args, "shapes")
    assert len(requests_from_args(build_parser().parse_args(["--prompt", "a" * 10, "--max-prompt-chars", "10"]),
                                  "shapes")) == 1
