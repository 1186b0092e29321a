"""Vision-language processors for images and text without torchvision.

The editing pipelines' text encoders see the input images through a transformers processor: Qwen-Image
Edit's `Qwen2VLProcessor` (Qwen2.5-VL), FLUX.2-dev's `PixtralProcessor` (Mistral-3), Qwen3-VL's
`Qwen3VLProcessor`. In transformers 5 each is image processor + tokenizer + (Qwen) a video processor,
and the video processors are written with torchvision, which the package index has beside no CPU build
of torch that CI uses: building one of those processors fails without torchvision (the Qwen classes
type-check their video processor, PixtralProcessor is declared as needing torchvision outright), while
the images need none of it — transformers' `*ImageProcessorPil` classes do the same resizing and
normalisation with PIL and NumPy.

So where torchvision is absent, `build` (from parts: the presets) and `load` (a model directory's
component: engine/loading/pipeline.py) make the processor for images and text alone:
- the Qwen classes: a subclass of the real class whose constructor takes no video processor — every
  other line (placeholder expansion from `image_grid_thw`, tokenizing, chat templates) is the real class's;
- Pixtral: a processor of the same image processor and tokenizer with PixtralProcessor's image-token
  layout (rows of [IMG] closed by [IMG_BREAK], the last by [IMG_END]), written out below since the real
  class cannot be imported.
The image processor is the `*ImageProcessorPil` class (what transformers' auto classes fall back to),
read from the same preprocessor_config.json. Asking such a processor for video raises. `note` is the one
line the engine prints when it does this (engine/preflight.py; the server logs it). Saved, it writes the
real class's name, so a directory reads as the real model's. tests/test_processors.py compares each with
a reference made from the same image processor's outputs and tokenizer, and the text embeddings too.
"""

from __future__ import annotations

import functools
import importlib.util

VL_PROCESSORS = {
    "Qwen2VLProcessor": "Qwen2VLImageProcessorPil",
    "Qwen2_5_VLProcessor": "Qwen2VLImageProcessorPil",
    "Qwen3VLProcessor": "Qwen2VLImageProcessorPil",
    "PixtralProcessor": "PixtralImageProcessorPil",
}
"""Processor classes that need torchvision in transformers 5 → the PIL image processor they are built with
instead."""


def has_torchvision() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def needs_stand_in(cls_name: str) -> bool:
    """Whether a processor of class `cls_name` is built here (torchvision absent) instead of by transformers."""
    return cls_name in VL_PROCESSORS and not has_torchvision()


def note(components: dict[str, str]) -> str:
    """The one line saying which processors (component → class) are built for images and text only."""
    what = "; ".join(f"{name}: {cls} with {VL_PROCESSORS[cls]}" for name, cls in components.items())
    return f"torchvision is not installed: the vision-language processor is built for images and text alone ({what})"


@functools.cache
def image_text_class(cls_name: str) -> type:
    """The processor class of `cls_name` without a video processor (see the module doc)."""
    import transformers

    if cls_name == "PixtralProcessor":
        return _pixtral_class()
    real = getattr(transformers, cls_name)

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # The real constructor with no video processor: ProcessorMixin pairs positional arguments with
        # this class's attributes (image_processor, tokenizer), so the third is never looked at.
        real.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise ValueError(f"{cls_name} was built without torchvision, for images and text: it processes no video")
        return real.__call__(self, images=images, text=text, **kwargs)

    return type(cls_name.replace("Processor", "ImageTextProcessor"), (real,),
                {"__init__": __init__, "__call__": __call__, "to_dict": _saved_as(cls_name), "__module__": __name__})


def _saved_as(cls_name: str):
    """`to_dict` writing the real class's name into processor_config.json, so that a saved directory reads
    as the real model's (transformers' AutoProcessor, with torchvision, loads it as that class)."""
    def to_dict(self) -> dict:
        out = super(type(self), self).to_dict()
        out["processor_class"] = cls_name
        return out

    return to_dict


def _pixtral_class() -> type:
    from transformers.processing_utils import ProcessorMixin

    class PixtralImageTextProcessor(ProcessorMixin):
        """PixtralProcessor's images and text (transformers' processing_pixtral.py, whose class needs torchvision)."""

        to_dict = _saved_as("PixtralProcessor")

        def __init__(self, image_processor=None, tokenizer=None, patch_size: int = 16, spatial_merge_size: int = 1,
                     chat_template=None, image_token="[IMG]", image_break_token="[IMG_BREAK]",
                     image_end_token="[IMG_END]", **kwargs):
            super().__init__(image_processor, tokenizer, chat_template=chat_template)
            self.patch_size, self.spatial_merge_size = patch_size, spatial_merge_size
            self.image_token, self.image_break_token, self.image_end_token = image_token, image_break_token, image_end_token
            self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
            self.image_break_token_id = tokenizer.convert_tokens_to_ids(image_break_token)
            self.image_end_token_id = tokenizer.convert_tokens_to_ids(image_end_token)

        @property
        def image_token_ids(self) -> list[int]:
            return [self.image_token_id, self.image_break_token_id, self.image_end_token_id]

        def _process_images(self, images, **images_kwargs):
            images_kwargs["patch_size"] = self.patch_size * self.spatial_merge_size
            return super()._process_images(images, **images_kwargs)

        def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
            # One [IMG] per patch, each row closed by [IMG_BREAK], the last by [IMG_END].
            patch = self.patch_size * self.spatial_merge_size
            height, width = image_inputs["image_sizes"][image_idx]
            row = [self.image_token] * (width // patch) + [self.image_break_token]
            tokens = row * (height // patch)
            tokens[-1] = self.image_end_token
            return "".join(tokens)

    PixtralImageTextProcessor.__module__ = __name__
    return PixtralImageTextProcessor


def build(cls_name: str, image_processor, tokenizer, chat_template: str | None = None, **kwargs):
    """A processor of `cls_name` from its parts: transformers' own where torchvision is installed (with the
    class's video processor), else the image-and-text one."""
    if not needs_stand_in(cls_name):
        import transformers

        cls = getattr(transformers, cls_name)
        if "video_processor" in cls.get_attributes():
            video = getattr(transformers, cls_name.replace("Processor", "VideoProcessor"))()
            return cls(image_processor, tokenizer, video, chat_template=chat_template, **kwargs)
        return cls(image_processor, tokenizer, chat_template=chat_template, **kwargs)
    return image_text_class(cls_name)(image_processor, tokenizer, chat_template=chat_template, **kwargs)


def load(cls_name: str, folder):
    """The processor saved in `folder` (a model directory's component), without torchvision."""
    assert needs_stand_in(cls_name), cls_name
    return image_text_class(cls_name).from_pretrained(str(folder), local_files_only=True)


def image_processor(cls_name: str, **kwargs):
    """The image processor a processor of `cls_name` is built with: the PIL class without torchvision."""
    import transformers

    name = VL_PROCESSORS[cls_name]
    return getattr(transformers, name if not has_torchvision() else name.removesuffix("Pil"))(**kwargs)
