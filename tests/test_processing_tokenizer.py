"""DetrisTokenizer: official CLIP BPE ids (tokenizer_golden.json), offline vocabulary, save/load."""

import json
from pathlib import Path

import pytest

from processing_detris import DetrisTokenizer, clean_text


FIXTURES = Path(__file__).parent / "fixtures" / "processing"
GOLDEN = json.loads((FIXTURES / "tokenizer_golden.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer():
    return DetrisTokenizer()


@pytest.mark.parametrize("word_len", [17, 22])
def test_ids_match_official_golden(tokenizer, word_len):
    expected = GOLDEN["input_ids"][str(word_len)]
    assert len(GOLDEN["sentences"]) == len(expected) == 25
    ids = tokenizer(GOLDEN["sentences"], padding="max_length", truncation=True, max_length=word_len)["input_ids"]
    for sentence, got, want in zip(GOLDEN["sentences"], ids, expected):
        assert got == want, f"{sentence!r}: {got} != {want}"


def test_special_ids_and_vocabulary(tokenizer):
    assert len(tokenizer) == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 0)
    assert tokenizer.convert_ids_to_tokens(0) == "!"
    # "!" as a word piece must stay the BPE token "!</w>" (256), not the pad id
    ids = tokenizer("wow!")["input_ids"]
    assert ids[-2] == 256 and 0 not in ids


def test_truncation_keeps_eot_last(tokenizer):
    ids = tokenizer(" ".join(["dog"] * 50), padding="max_length", truncation=True, max_length=17)["input_ids"]
    assert len(ids) == 17 and ids[0] == 49406 and ids[-1] == 49407 and 0 not in ids


def test_cleaning_matches_official_rules():
    assert clean_text("  Guy   in\tRED\nshirt  ") == "guy in red shirt"
    assert clean_text("woman&amp;#39;s") == "woman's"  # double HTML unescape
    assert clean_text("") == ""


def test_non_string_text_is_rejected(tokenizer):
    with pytest.raises(TypeError, match="must be a `str`"):
        tokenizer.tokenize(None)
    with pytest.raises((TypeError, ValueError)):
        tokenizer([1, 2], padding="max_length", truncation=True, max_length=17)


def test_save_and_reload_gives_same_ids(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = DetrisTokenizer.from_pretrained(tmp_path)
    sentences = GOLDEN["sentences"]
    kwargs = dict(padding="max_length", truncation=True, max_length=22)
    assert reloaded(sentences, **kwargs)["input_ids"] == GOLDEN["input_ids"]["22"]
    assert reloaded.pad_token_id == 0


def random_expressions(count: int, seed: int) -> list[str]:
    """Expressions no fixture has: RefCOCO-like words with typos, plus raw character soup (accents, CJK, emoji,
    HTML entities, odd whitespace, contractions, digits, mojibake)."""
    import random

    rng = random.Random(seed)
    words = ("the man on left right red blue shirt girl's umbrella 2nd third woman holding zebra giraffe far near "
             "top bottom can't guy we'll").split()
    characters = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ,.;:'\"!?-_/()[]{}&#@$%*+=<>|\\~`^\t\n")
    characters += list("éèêëàâäôöûüçñßæøåÉÀÇÑΩλπ中文左边的猫日本語한국어😀👍🏽🇫🇷\u00a0\u2003\u200b\u0301ﬁ①²½₂")
    characters += ["&amp;", "&#39;", "&lt;", "&gt;", "&quot;", "&nbsp;", "'s", "'ll", "'re", "n't", "&amp;amp;", "â€™"]
    expressions = []
    for _ in range(count):
        if rng.random() < 0.4:
            text = " ".join(rng.choice(words) for _ in range(rng.randint(0, 25)))
            text = "".join(c if rng.random() > 0.1 else rng.choice(characters) for c in text)
        else:
            text = "".join(rng.choice(characters) for _ in range(rng.randint(0, 40)))
        expressions.append(text)
    return expressions


@pytest.mark.parametrize("word_len", [17, 22, 40])
def test_ids_match_an_independent_bpe_on_random_expressions(tokenizer, word_len):
    from processing_detris.tokenization_detris import VOCAB_ARCHIVE
    from clip_bpe_reference import ReferenceClipBpe

    reference = ReferenceClipBpe(VOCAB_ARCHIVE)
    expressions = random_expressions(400, seed=word_len)
    ours = tokenizer(expressions, padding="max_length", truncation=True, max_length=word_len)["input_ids"]
    mismatches = [(text, a, reference(text, word_len)) for text, a in zip(expressions, ours) if a != reference(text, word_len)]
    assert not mismatches, f"{len(mismatches)} of {len(expressions)} differ, first: {mismatches[0]}"
