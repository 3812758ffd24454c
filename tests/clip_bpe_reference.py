"""A plain-Python CLIP BPE written from the published algorithm (OpenAI `simple_tokenizer`), for tests only.

It shares nothing with `processing_detris` but the merge-list file: its own byte table, its own pre-tokenising
regex (the `regex` module with Unicode classes), its own greedy lowest-rank merge loop. `DetrisTokenizer` (a Rust
`CLIPTokenizer` with the official cleaning in front) must give the same ids on any expression.
"""

import gzip
import html

import ftfy
import regex

SOT, EOT, PAD = 49406, 49407, 0
NUM_MERGES = 49152 - 256 - 2
PRETOKENIZE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
)


def byte_symbols() -> dict[int, str]:
    kept = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {b: chr(b) for b in kept}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class ReferenceClipBpe:
    def __init__(self, merges_path: str):
        self.byte_symbol = byte_symbols()
        with gzip.open(merges_path, "rt", encoding="utf-8") as handle:
            merges = [tuple(line.split()) for line in handle.read().split("\n")[1 : NUM_MERGES + 1]]
        symbols = list(self.byte_symbol.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.ids = {token: index for index, token in enumerate(vocab)}
        self.rank = {pair: index for index, pair in enumerate(merges)}
        self.cache = {"<|startoftext|>": ["<|startoftext|>"], "<|endoftext|>": ["<|endoftext|>"]}

    def merge(self, word: str) -> list[str]:
        if word in self.cache:
            return self.cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda pair: self.rank.get(pair, float("inf")))
            if best not in self.rank:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self.cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        text = regex.sub(r"\s+", " ", text).strip().lower()
        out = []
        for piece in PRETOKENIZE.findall(text):
            word = "".join(self.byte_symbol[b] for b in piece.encode("utf-8"))
            out.extend(self.ids[token] for token in self.merge(word))
        return out

    def __call__(self, text: str, word_len: int) -> list[int]:
        ids = [SOT, *self.encode(text), EOT]
        if len(ids) > word_len:
            ids = ids[:word_len]
            ids[-1] = EOT
        return ids + [PAD] * (word_len - len(ids))
