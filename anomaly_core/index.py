"""Memory bank: FAISS indexes over L2-normalised patch features, searched by cosine distance.

The bank is a list of shards of at most `shard_size` vectors each (one file each in the model), so no
single file or device has to hold it whole; a query's nearest neighbour is the best over all shards,
which for exact ("flat") shards is exactly the nearest neighbour of the whole bank.
"""

from __future__ import annotations

import math
from pathlib import Path

import faiss
import numpy as np

# kind -> what it is; approximate kinds trade recall for speed (docs/benchmarks.md: measured cost)
INDEX_KINDS = {
    "flat": "exact inner-product search",
    "hnsw": "HNSW graph, M=32 (approximate)",
    "ivf": "inverted lists, 4*sqrt(n) lists, exact vectors (approximate)",
    "ivfpq": "inverted lists + product quantisation, 8 bits per 8 dimensions (approximate, 16x smaller)",
}


def _build_shard(f: np.ndarray, *, kind: str, seed: int) -> faiss.Index:
    n, d = f.shape
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, ip)
        index.hnsw.efConstruction = 80
    elif kind in ("ivf", "ivfpq"):
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))       # FAISS wants >= 39 points per list
        quantizer = faiss.IndexFlatIP(d)
        index = (faiss.IndexIVFFlat(quantizer, d, nlist, ip) if kind == "ivf"
                 else faiss.IndexIVFPQ(quantizer, d, nlist, d // 8, 8, ip))
        index.cp.seed = seed
        index.train(f)
        index.own_fields = True
        quantizer.this.disown()                                   # the IVF index now owns it
    else:
        raise ValueError(f"index kind {kind!r} is unknown; choose one of {sorted(INDEX_KINDS)}")
    index.add(f)
    return index


def set_search_threads(n: int) -> None:
    """Threads FAISS searches with in this process. FAISS's OpenMP runtime reads OMP_NUM_THREADS, which
    Ray sets to an actor's num_cpus (1 for the score actors), whatever torch was given."""
    if n < 1:
        raise ValueError(f"search threads must be >= 1, got {n}")
    faiss.omp_set_num_threads(n)


class MemoryBank:
    """Sharded index; distance = 1 - cosine similarity, in [0, 2]."""

    def __init__(self, shards: list[faiss.Index], *, nprobe: int = 8, ef_search: int = 64):
        if not shards:
            raise ValueError("a memory bank needs at least one shard")
        self.shards = shards
        for s in shards:                                          # search-time knobs of approximate kinds
            if isinstance(s, faiss.IndexIVF):
                s.nprobe = nprobe
            if isinstance(s, faiss.IndexHNSW):
                s.hnsw.efSearch = ef_search

    @classmethod
    def build(cls, features: np.ndarray, *, kind: str = "flat", shard_size: int = 1 << 20, seed: int = 0,
              nprobe: int = 8, ef_search: int = 64) -> MemoryBank:
        """features: [M, D] float32, rows L2-normalised; split into shards of at most shard_size rows."""
        f = np.ascontiguousarray(features, dtype=np.float32)
        if f.ndim != 2 or f.shape[0] == 0:
            raise ValueError(f"bank features must be a non-empty [M, D] array, got {f.shape}")
        if shard_size < 1:
            raise ValueError(f"shard_size={shard_size} must be >= 1")
        shards = [_build_shard(f[s:s + shard_size], kind=kind, seed=seed) for s in range(0, f.shape[0], shard_size)]
        return cls(shards, nprobe=nprobe, ef_search=ef_search)

    @property
    def size(self) -> int:
        return int(sum(s.ntotal for s in self.shards))

    @property
    def dim(self) -> int:
        return int(self.shards[0].d)

    def nearest(self, queries: np.ndarray, *, batch_size: int = 65536) -> np.ndarray:
        """queries: [N, D] float32 L2-normalised -> [N] float32 cosine distance to the nearest entry."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [N, {self.dim}], got {q.shape}")
        best = np.full(q.shape[0], -np.inf, dtype=np.float32)                   # [N] best similarity
        for shard in self.shards:
            for start in range(0, q.shape[0], batch_size):
                sim, _ = shard.search(q[start:start + batch_size], 1)            # [n, 1]
                np.maximum(best[start:start + batch_size], sim[:, 0], out=best[start:start + batch_size])
        # rounding can make 1 - <x, x> slightly negative for an exact match; an IVF probe that finds
        # nothing returns -inf similarity, i.e. the largest distance
        return np.clip(1.0 - best, 0.0, 2.0)

    def serialize(self) -> list[np.ndarray]:
        """The shards as [bytes] uint8 arrays (to ship to workers; deserialize inverts)."""
        return [faiss.serialize_index(s) for s in self.shards]

    @classmethod
    def deserialize(cls, blobs: list[np.ndarray], *, nprobe: int = 8, ef_search: int = 64) -> MemoryBank:
        return cls([faiss.deserialize_index(b) for b in blobs], nprobe=nprobe, ef_search=ef_search)

    def save(self, directory: str | Path) -> list[str]:
        """Write one file per shard into `directory`; returns their names in order."""
        names = []
        for i, shard in enumerate(self.shards):
            name = f"bank-{i:05d}.faiss"
            faiss.write_index(shard, str(Path(directory) / name))
            names.append(name)
        return names

    @classmethod
    def load(cls, directory: str | Path, names: list[str], *, nprobe: int = 8, ef_search: int = 64) -> MemoryBank:
        return cls([faiss.read_index(str(Path(directory) / n)) for n in names], nprobe=nprobe, ef_search=ef_search)
