"""What a newcomer sees: one loading bar and one denoising bar, from the first rank only.

transformers prints a "Loading weights" bar per text encoder inside diffusers' "Loading pipeline
components" bar, on every rank; and, without torchvision, one warning per image-processor class that
the pipeline modules import (the engine never loads image processors: feature extractors are left
out). The first is switched off while a pipeline loads (and restored after, since a service may load
other models in the same process); the second is dropped by a filter on exactly that message.
"""

from __future__ import annotations

import contextlib
import logging

_TORCHVISION_FALLBACK = "requires torchvision (not installed); falling back to"


class _DropTorchvisionFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _TORCHVISION_FALLBACK not in record.getMessage()


def drop_known_warnings() -> None:
    """Install the filter (idempotent) on the logger that emits the image-processor fallback warning."""
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _DropTorchvisionFallback) for f in logger.filters):
        logger.addFilter(_DropTorchvisionFallback())


@contextlib.contextmanager
def loading_bars(show: bool):
    """Inside: transformers' per-component bars off; diffusers' component bar only if `show`."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    before = tlog.is_progress_bar_enabled(), dlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    if not show:
        dlog.disable_progress_bar()
    try:
        yield
    finally:
        for enabled, lib in zip(before, (tlog, dlog)):
            (lib.enable_progress_bar if enabled else lib.disable_progress_bar)()
