"""Evaluation samples over whole documents: every predicted token of the chosen documents exactly once.

Training's validation loader packs a shuffled stream of documents into samples, so a window often
starts in the middle of one document and ends in another. An evaluation restricted to some
documents (e.g. only the long ones) needs each chosen document read from its start instead:

* the documents are those of the given sources at least ``min_length`` tokens long (the EOS
  included), in a fixed seeded order; ``max_tokens`` (0: no limit) keeps the first documents of
  that order until that many tokens are predicted, cutting the last one;
* a document of n tokens has n - 1 predictions (its first token has no context inside it); they
  are cut into windows of ``seq_length`` from the document's start: window k predicts tokens
  [kS + 1, (k+1)S] from inputs [kS, (k+1)S - 1], so each token sees the part of its document that
  lies in its own window, never another document;
* a full window is one sample; the last, shorter window of each document is packed with other
  such tails into shared samples (first fit, longest first). A tail of m predictions occupies
  m + 1 positions (its last token is only a label); the loader's ``cu_seqlens`` start a new
  sequence at every tail, the position that would predict the next tail's first token is masked,
  and so is the padding at the end of a sample.

Samples are served by ``EvaluationLoader``, the pretraining loader with these samples: the same
micro-batch format, data-parallel split and ``cu_seqlens``. Samples past the end (the last global
batch rarely fills every DP rank) are padding with no loss. See docs/training.md, "Evaluation".
"""

from __future__ import annotations

import numpy as np

from data.loader import PretrainingLoader, collate
from data.packing import DocumentCorpus

ORDER_SEED = 0  # the documents' order: the same for every checkpoint and arm
PAD_ID = 0  # padding input: its positions carry no loss and its own cu_seqlens segment


class DocumentWindows:
    """The evaluation samples (see the module docstring); ``samples[i]`` lists its pieces as
    (source, document, first token, tokens), a piece predicting ``tokens - 1`` of them."""

    def __init__(self, sources: list[tuple[DocumentCorpus, np.ndarray]], seq_length: int,
                 min_length: int = 0, max_tokens: int = 0):
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        self.sources = sources
        self.seq_length = seq_length
        self.min_length = min_length
        candidates = [(s, int(d)) for s, (corpus, ids) in enumerate(sources) for d in ids
                      if corpus.doc_length[d] >= max(min_length, 2)]
        self.longest = max((int(corpus.doc_length[ids].max()) for corpus, ids in sources if len(ids)), default=0)
        order = np.random.default_rng(ORDER_SEED).permutation(len(candidates))
        full, tails = [], []
        self.documents = self.predicted = 0
        for index in order:
            source, doc = candidates[index]
            predictions = int(sources[source][0].doc_length[doc]) - 1
            if max_tokens:
                predictions = min(predictions, max_tokens - self.predicted)
                if predictions <= 0:
                    break
            self.documents += 1
            self.predicted += predictions
            for start in range(0, predictions, seq_length):
                piece = (source, doc, start, min(seq_length, predictions - start) + 1)
                (full if piece[3] == seq_length + 1 else tails).append(piece)
        self.samples = [[piece] for piece in full] + _first_fit(tails, seq_length + 1)

    def __len__(self) -> int:
        return len(self.samples)

    def predictions(self, start: int, stop: int) -> int:
        """Tokens predicted by samples [start, stop)."""
        return sum(piece[3] - 1 for sample in self.samples[start:stop] for piece in sample)

    def __getitem__(self, index: int) -> tuple[np.ndarray, list[int], int]:
        """(seq_length + 1 tokens, the offsets after each piece, the offset where padding starts)."""
        span = np.full(self.seq_length + 1, PAD_ID, dtype=np.int64)
        ends, used = [], 0
        for source, doc, start, count in self.samples[index] if index < len(self.samples) else []:
            span[used:used + count] = self.sources[source][0].read(doc, start, count)
            used += count
            ends.append(used)
        return span, ends, used

    def fingerprint(self) -> dict:
        return {"documents": self.documents, "predicted": self.predicted, "seq_length": self.seq_length,
                "min_length": self.min_length}


def _first_fit(pieces: list[tuple], capacity: int) -> list[list[tuple]]:
    """Pack pieces (their size is the last field) into bins of ``capacity``, longest first."""
    bins: list[list[tuple]] = []
    room: list[int] = []
    for piece in sorted(pieces, key=lambda p: -p[3]):
        for i, free in enumerate(room):
            if free >= piece[3]:
                bins[i].append(piece)
                room[i] -= piece[3]
                break
        else:
            bins.append([piece])
            room.append(capacity - piece[3])
    return bins


class EvaluationLoader(PretrainingLoader):
    """Micro-batches of ``DocumentWindows`` for one DP rank: one micro-batch per rank and global
    batch, from global batch ``first_batch`` on (``reset`` goes back there)."""

    def __init__(self, windows: DocumentWindows, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 first_batch: int = 0):
        super().__init__(windows, windows.seq_length, micro_batch_size, micro_batch_size * dp_size, dp_rank,
                         dp_size, reset_at_document_boundaries=True, mask_cross_document_loss=True)
        self.first_batch = self.global_batch = first_batch

    @property
    def num_global_batches(self) -> int:
        return -(-len(self.samples) // self.global_batch_size)

    def reset(self) -> None:
        self.global_batch, self.micro_batch = self.first_batch, 0

    def collate(self, samples: list) -> dict:
        batch = collate([(span, ends) for span, ends, _ in samples], self.seq_length,
                        reset_at_document_boundaries=True, mask_cross_document_loss=True)
        for row, (_, _, used) in enumerate(samples):
            batch["loss_mask"][row, max(used - 1, 0):] = 0.0  # padding, and the input that predicts it
        return batch
