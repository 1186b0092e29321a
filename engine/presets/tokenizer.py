"""A fixed word-level tokenizer for the random-weight presets.

Real CLIP/T5 tokenizer files cannot be downloaded here, and random text encoders
do not care which ids words get, only that the mapping is stable: every rank and
every run must turn the same prompt into the same ids. So we build one small,
deterministic vocabulary in code and wrap it as a `PreTrainedTokenizerFast`,
which diffusers pipelines accept and which `save_pretrained` writes as plain
`tokenizer.json` (no custom code needed to load it back).
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
# Ids follow list order. EOS must not be 2: transformers' CLIP text model treats
# eos_token_id == 2 as "legacy" and pools at argmax(input_ids) instead of at <eos>.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512

# The "chat" kind (Z-Image's Qwen3 prompt): the role markers of Qwen's chat template are single
# special tokens, ids right after the vocabulary (the other kinds' ids are unchanged).
CHAT_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")
# Qwen3's chat template, reduced to what a text-to-image prompt uses: one user turn, the assistant
# turn opened, and the empty thinking block when thinking is switched off.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

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


def _backend(*, add_bos: bool, add_eos: bool = True) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(vocab=vocabulary(), unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    # Numbers become single digits so that every number is in the vocabulary.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)]
    )
    # CLIP wraps prompts in <bos> ... <eos>; T5 only appends </s> (our <eos>); Qwen's adds nothing.
    if add_bos or add_eos:
        single = f"{BOS} $A {EOS}" if add_bos else f"$A {EOS}"
        special = [(BOS, BOS_ID), (EOS, EOS_ID)] if add_bos else [(EOS, EOS_ID)]
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=special)
    return tok


def make_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """`kind` is "clip" (77 tokens, <bos>..<eos>), "t5" (512 tokens, ..<eos>) or "chat" (512 tokens,
    nothing added, Qwen's chat template and role tokens: what ZImagePipeline asks of its tokenizer)."""
    if kind not in ("clip", "t5", "chat"):
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'clip', 't5' or 'chat'")
    if kind == "chat":
        backend = _backend(add_bos=False, add_eos=False)
        backend.add_special_tokens(list(CHAT_SPECIAL_TOKENS))
        extra = dict(chat_template=CHAT_TEMPLATE)
    else:
        backend, extra = _backend(add_bos=kind == "clip"), {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=CLIP_MAX_LENGTH if kind == "clip" else T5_MAX_LENGTH,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        padding_side="right",
        **extra,
    )
