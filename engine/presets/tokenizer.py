"""A fixed word-level tokenizer for the random-weight presets.

Real CLIP/T5 tokenizer files cannot be downloaded here, and random text encoders
do not care which ids words get, only that the mapping is stable: every rank and
every run must turn the same prompt into the same ids. So we build one small,
deterministic vocabulary in code and wrap it as a `PreTrainedTokenizerFast`,
which diffusers pipelines accept and which `save_pretrained` writes as plain
`tokenizer.json` (no custom code needed to load it back).

The chat kinds ("qwen2.5-vl", "qwen3", "mistral3") stand in for the tokenizers of the LLM text
encoders (Qwen-Image, FLUX.2-klein, FLUX.2-dev): they add the real chat-format special tokens and a
newline token (byte-level BPEs keep newlines, and prompt templates count on them: Qwen-Image drops
the first 34 tokens of its template, exactly its system prefix in our tokenizer too) and carry a
chat template in the real format, which FLUX.2's pipelines apply (`apply_chat_template`, batched,
with content given as a string or as a list of {"type": "text"} parts). No token is added
automatically: the templates write what the real ones write.
"""

from __future__ import annotations

import string

from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
# Ids follow list order. EOS must not be 2: transformers' CLIP text model treats
# eos_token_id == 2 as "legacy" and pools at argmax(input_ids) instead of at <eos>.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512

_WORDS = """
a an the this that these those some any each every all no one two three four five six seven eight nine ten
of in on at by to from with without into onto over under above below behind beside between near far inside
outside around through across along left right top bottom middle center front back up down next
and or but not is are was were be been being has have had do does did will would can could should
it its he she they them their his her we our you your i my me
red orange yellow green blue purple violet pink brown black white gray grey gold silver cyan magenta
dark light bright pale colorful colourful
circle square triangle rectangle star heart cube sphere cone cylinder pyramid line dot stripe stripes
grid pattern shape shapes
big small large tiny huge little tall short long wide narrow thick thin round flat sharp soft
cat dog bird fish horse cow lion tiger bear mouse rabbit fox wolf owl duck
man woman boy girl child person people face hand eye hair
tree flower grass forest mountain river lake sea ocean beach sky cloud clouds sun moon rain snow
house city street road bridge car bus train boat ship plane castle room window door table chair
photo photograph painting drawing picture image sketch portrait landscape illustration render
style art oil watercolor pencil digital realistic detailed cinematic abstract vintage modern
morning evening night day sunset sunrise light shadow
standing sitting running walking flying swimming sleeping holding wearing looking
very quite highly extremely beautiful old new happy sad
""".split()


def vocabulary() -> dict[str, int]:
    """The fixed token -> id map: specials, words, letters, digits, punctuation."""
    tokens: list[str] = list(SPECIAL_TOKENS)
    for tok in _WORDS + list(string.ascii_lowercase) + list(string.digits) + list(string.punctuation):
        if tok not in tokens:  # a few words repeat in the list above; first one wins
            tokens.append(tok)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert (vocab[PAD], vocab[UNK], vocab[BOS], vocab[EOS]) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID)
    return vocab


VOCAB_SIZE = len(vocabulary())


def _backend(*, add_bos: bool) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(vocab=vocabulary(), unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    # Numbers become single digits so that every number is in the vocabulary.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)]
    )
    # CLIP wraps prompts in <bos> ... <eos>; T5 only appends </s> (our <eos>).
    single = f"{BOS} $A {EOS}" if add_bos else f"$A {EOS}"
    special = [(BOS, BOS_ID), (EOS, EOS_ID)] if add_bos else [(EOS, EOS_ID)]
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=special)
    return tok


# A message's text, whether given as a string or as a list of {"type": "text", "text": ...} parts
# (FLUX.2's format_input), as the real templates accept both.
_CONTENT = ("{% if m.content is string %}{{ m.content }}{% else %}{% for p in m.content %}"
            "{% if p.type == 'text' %}{{ p.text }}{% endif %}{% endfor %}{% endif %}")
# Qwen2.5 / Qwen3 ChatML; Qwen3's generation prompt with enable_thinking=False adds an empty think block.
_CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n" + _CONTENT + "<|im_end|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not "
           "enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
# Mistral-Small-3.x: <s>[SYSTEM_PROMPT]…[/SYSTEM_PROMPT][INST]…[/INST].
_MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}[SYSTEM_PROMPT]" + _CONTENT +
            "[/SYSTEM_PROMPT]{% elif m.role == 'user' %}[INST]" + _CONTENT + "[/INST]{% else %}" + _CONTENT +
            "{{ eos_token }}{% endif %}{% endfor %}")
NEWLINE = "\n"
VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")
"""Qwen2.5-VL's image markers, in this order: a tokenizer's ids of them are its text encoder's
`vision_start_token_id`, `image_token_id`, `vision_end_token_id`, `video_token_id`."""
CHAT_KINDS: dict[str, tuple[tuple[str, ...], str]] = {
    # With Qwen2.5-VL's vision tokens: the edit pipelines' prompts hold one <|vision_start|><|image_pad|>
    # <|vision_end|> per input image, which its processor expands to the image's tokens.
    "qwen2.5-vl": (("<|im_start|>", "<|im_end|>", *VISION_TOKENS), _CHATML),
    "qwen3": (("<|im_start|>", "<|im_end|>", "<think>", "</think>"), _CHATML),
    "mistral3": (("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]"), _MISTRAL),
}
"""Chat tokenizer kind → (its chat-format special tokens, its chat template)."""
CHAT_MAX_LENGTH = 4096
KINDS = ("clip", "t5", "byt5", *CHAT_KINDS)
CHAT_VOCAB_SIZE = VOCAB_SIZE + 1 + max(len(t) for t, _ in CHAT_KINDS.values())
"""Ids a chat tokenizer can produce: the words, the newline token and its special tokens."""


def _chat_backend(specials: tuple[str, ...]) -> Tokenizer:
    tok = _backend(add_bos=False)
    tok.post_processor = None  # the chat template writes every token itself
    # Matched in the raw text before normalisation and splitting, so they survive as single tokens.
    tok.add_tokens([AddedToken(NEWLINE, normalized=False)])
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in specials])
    return tok


def chat_token_id(kind: str, token: str) -> int:
    """The id a chat tokenizer of `kind` gives one of its special tokens (after the words and the newline),
    without building it: what a text encoder's config names (Qwen2.5-VL's `image_token_id`)."""
    return VOCAB_SIZE + 1 + CHAT_KINDS[kind][0].index(token)


def make_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """`kind` is "clip" (77 tokens, <bos>..<eos>), "t5" (512 tokens, ..<eos>), "byt5" (bytes, ..<eos>) or
    a chat kind (`CHAT_KINDS`)."""
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind == "byt5":
        # Bytes are its vocabulary: transformers' own tokenizer, no file needed (ids < 384).
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer()
    common = dict(pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS, padding_side="right")
    if kind in CHAT_KINDS:
        specials, template = CHAT_KINDS[kind]
        made = PreTrainedTokenizerFast(tokenizer_object=_chat_backend(specials), model_max_length=CHAT_MAX_LENGTH,
                                       chat_template=template, **common)
        assert made.convert_tokens_to_ids(list(specials)) == [chat_token_id(kind, t) for t in specials]
        return made
    return PreTrainedTokenizerFast(
        tokenizer_object=_backend(add_bos=kind == "clip"),
        model_max_length=CLIP_MAX_LENGTH if kind == "clip" else T5_MAX_LENGTH,
        **common,
    )
