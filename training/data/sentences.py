"""The one sentence sampler of training: each object row shows one of its expressions per epoch (the official random
sentence per object), chosen as a pure function of (seed, epoch, row index), so the choice is the same whatever the
process count, the number of DataLoader workers or an interruption and resume.
"""

import torch
from torch.utils.data import Dataset, Sampler


def sentence_index(num_sentences: int, seed: int, epoch: int, index: int) -> int:
    """Which of a row's `num_sentences` expressions epoch `epoch` shows for row `index`."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 10_000_019 + int(index))
    return int(torch.randint(num_sentences, (1,), generator=generator).item())


class OneSentencePerObject(Dataset):
    """Object rows (with `sentences`) -> rows with one `sentence` each, chosen by `sentence_index`."""

    def __init__(self, rows, seed: int):
        self.rows = rows
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        row = dict(self.rows[int(index)])
        sentences = row.pop("sentences")
        row.pop("sent_ids", None)
        if not sentences:
            raise ValueError(f"ref_id={row.get('ref_id')} has no expression; expected at least one")
        row["sentence"] = sentences[sentence_index(len(sentences), self.seed, self.epoch, index)]
        return row


class EpochShuffleSampler(Sampler):
    """A fresh permutation per epoch from (seed, epoch), so a resumed run sees the same order."""

    def __init__(self, length: int, seed: int):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())
