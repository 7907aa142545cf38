"""Memory bank: a FAISS index over L2-normalised patch features, searched by cosine distance."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np


class MemoryBank:
    """Exact inner-product index; distance = 1 - cosine similarity, in [0, 2]."""

    def __init__(self, index: faiss.Index):
        self.index = index

    @classmethod
    def build(cls, features: np.ndarray) -> "MemoryBank":
        """features: [M, D] float32, rows L2-normalised."""
        f = np.ascontiguousarray(features, dtype=np.float32)
        if f.ndim != 2 or f.shape[0] == 0:
            raise ValueError(f"bank features must be a non-empty [M, D] array, got {f.shape}")
        index = faiss.IndexFlatIP(f.shape[1])
        index.add(f)
        return cls(index)

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def nearest(self, queries: np.ndarray, *, batch_size: int = 65536) -> np.ndarray:
        """queries: [N, D] float32 L2-normalised -> [N] float32 cosine distance to the nearest entry."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [N, {self.dim}], got {q.shape}")
        out = np.empty(q.shape[0], dtype=np.float32)
        for start in range(0, q.shape[0], batch_size):
            sim, _ = self.index.search(q[start:start + batch_size], 1)          # [n, 1]
            out[start:start + batch_size] = 1.0 - sim[:, 0]
        # rounding can make 1 - <x, x> slightly negative for an exact match
        return np.maximum(out, 0.0)

    def save(self, path: str | Path) -> None:
        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: str | Path) -> "MemoryBank":
        return cls(faiss.read_index(str(path)))
