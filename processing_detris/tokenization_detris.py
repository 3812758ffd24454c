# Copyright 2025 The detris-hf authors. Licensed under the MIT License.
"""Offline CLIP BPE tokenizer configured like the official DETRIS one.

The official DETRIS text pipeline (OpenAI's `simple_tokenizer`) does, for every expression:

1. clean the text: `ftfy.fix_text`, HTML-unescape twice, strip, collapse every run of whitespace into one space,
   lower-case;
2. byte-level BPE with OpenAI's `bpe_simple_vocab_16e6` merges (49,408 ids);
3. `[SOT=49406] + bpe ids + [EOT=49407]`;
4. truncate to `word_len` keeping EOT as the last id (SOT + `word_len - 2` content ids + EOT);
5. right-pad with id **0** (the token `"!"`) to exactly `word_len`.

[`DetrisTokenizer`] is a [`~transformers.CLIPTokenizer`] (Rust backend) built from the merge list that ships inside
this package (no download), with step 1 applied in Python before the Rust tokenizer runs, `pad_token="!"`
(id 0) and `model_max_length=word_len`. Call it with `padding="max_length", truncation=True` (the
[`DetrisProcessor`] does) to get the official ids.

The ids equal the official ones on any expression (tests/test_processing_tokenizer.py compares them with an
independent BPE on random text: accents, CJK, emoji, HTML entities, odd whitespace), with one deliberate exception:
the literal strings `<|startoftext|>` / `<|endoftext|>` typed inside an expression are tokenised as text here,
while the official tokenizer may turn them into the SOT / EOT ids.
"""

import gzip
import html
import os
import re
from functools import lru_cache

from transformers import CLIPTokenizer


try:
    import ftfy
except ImportError:  # pragma: no cover - ftfy is an install requirement
    ftfy = None


VOCAB_ARCHIVE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
# The OpenAI vocabulary: 256 byte symbols, the same with the end-of-word suffix, 48,894 merges, SOT and EOT.
NUM_MERGES = 49152 - 256 - 2
SOT_TOKEN, EOT_TOKEN, PAD_TOKEN = "<|startoftext|>", "<|endoftext|>", "!"
SOT_ID, EOT_ID, PAD_ID = 49406, 49407, 0

_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """The official text cleaning: `ftfy.fix_text`, HTML-unescape twice, strip, collapse whitespace, lower-case."""
    if not isinstance(text, str):
        raise TypeError(f"A referring expression must be a `str`, got {type(text).__name__}: {text!r}")
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    text = _WHITESPACE.sub(" ", text).strip()
    return text.lower()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-printable-character table, in the vocabulary's order: first the 188 printable Latin-1
    bytes (mapped to themselves), then the other 68 bytes in byte order (mapped to code points 256, 257, ...)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
    printable += list(range(ord("\u00ae"), ord("\u00ff") + 1))
    table = {byte: chr(byte) for byte in printable}
    others = [byte for byte in range(256) if byte not in table]
    table.update({byte: chr(256 + index) for index, byte in enumerate(others)})
    return table


@lru_cache(maxsize=1)
def load_clip_vocabulary(path: str = VOCAB_ARCHIVE) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Build the CLIP `(vocab, merges)` from the gzipped OpenAI merge list shipped in this package."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"The CLIP BPE merge list {path} is missing; it ships with the `processing_detris` package "
            "(reinstall detris-hf)."
        )
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(pair) != 2 for pair in merges):
        raise ValueError(f"{path} does not look like OpenAI's bpe_simple_vocab_16e6 merge list")
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [symbol + "</w>" for symbol in symbols] + ["".join(pair) for pair in merges]
    tokens += [SOT_TOKEN, EOT_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    return vocab, merges


class DetrisTokenizer(CLIPTokenizer):
    r"""
    CLIP BPE tokenizer with the official DETRIS text cleaning and padding.

    Built without arguments it loads OpenAI's CLIP vocabulary shipped inside `processing_detris`, so it works
    offline. Differences to a stock [`CLIPTokenizer`]:

    - inputs are cleaned like the official tokenizer (`ftfy.fix_text`, double HTML unescape, whitespace collapse,
      lower-case; see [`clean_text`]) before BPE;
    - the pad token is `"!"` (id 0), which is what the official code pads with (the DETRIS text adapters and the
      Dense Aligner see pad positions, so the pad id changes the outputs);
    - `model_max_length` defaults to `word_len` (17; 22 for G-Ref umd).

    Use `padding="max_length", truncation=True` for the official layout
    `[49406, ids..., 49407, 0, ..., 0]` of exactly `model_max_length` ids (EOT kept last on truncation).

    Args:
        vocab (`dict[str, int]`, *optional*): BPE vocabulary. Defaults to the packaged OpenAI CLIP vocabulary.
        merges (`list[tuple[str, str]]`, *optional*): BPE merges. Defaults to the packaged list.
        pad_token (`str`, *optional*, defaults to `"!"`): padding token (id 0 in the CLIP vocabulary).
        model_max_length (`int`, *optional*, defaults to 17): the DETRIS `word_len`.
    """

    def __init__(
        self,
        vocab: dict[str, int] | str | None = None,
        merges: list | str | None = None,
        unk_token: str = EOT_TOKEN,
        bos_token: str = SOT_TOKEN,
        eos_token: str = EOT_TOKEN,
        pad_token: str = PAD_TOKEN,
        model_max_length: int = 17,
        **kwargs,
    ):
        if vocab is None and merges is None:
            vocab, merges = load_clip_vocabulary()
        # "!" is both the pad token and an ordinary word piece ("!</w>" = 256 in "the big one!"): special tokens
        # must not be matched inside the text, or every "!" in an expression would become the pad id.
        kwargs.setdefault("split_special_tokens", True)
        super().__init__(
            vocab=vocab,
            merges=merges,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            model_max_length=model_max_length,
            **kwargs,
        )

    @staticmethod
    def clean_text(text: str) -> str:
        return clean_text(text)

    def _clean(self, text):
        if isinstance(text, str):
            return clean_text(text)
        if isinstance(text, (list, tuple)):
            return type(text)(self._clean(item) for item in text)
        return text  # let the parent class raise its own error for unsupported types

    def _encode_plus(self, text, text_pair=None, *args, **kwargs):
        if kwargs.get("is_split_into_words", False):
            raise ValueError("DetrisTokenizer expects raw referring expressions, not pre-split words.")
        return super()._encode_plus(self._clean(text), self._clean(text_pair), *args, **kwargs)

    def tokenize(self, text: str, pair: str | None = None, add_special_tokens: bool = False, **kwargs) -> list[str]:
        return super().tokenize(
            clean_text(text), None if pair is None else clean_text(pair), add_special_tokens, **kwargs
        )


DetrisTokenizer.register_for_auto_class("AutoTokenizer")

__all__ = ["DetrisTokenizer", "clean_text", "load_clip_vocabulary"]
