"""Memory bank: FAISS indexes over L2-normalised patch features, searched by cosine distance.

The bank is a list of shards of at most `shard_size` vectors each (one file each in the model), so no
single file or device has to hold it whole; a query's nearest neighbour is the best over all shards,
which for exact ("flat") shards is exactly the nearest neighbour of the whole bank.

Where it is searched is a property of the process, not of the model: `MemoryBank.place` puts a bank
whose vectors are stored whole (flat, HNSW and IVF, whose graph or lists sit beside its vectors) on the scorer's device
and searches it exactly there. On a GPU that is FAISS's GPU index where the installed FAISS has one, else
`TorchFlatSearch` (chunked matrix products, the bank resident in GPU memory); on the CPU it is FAISS with
the bank's own index. `search_path` says which, and placing logs it. An approximate index searched by FAISS
can miss a query's nearest entry; `exact_above` (the model's cover radius) bounds what a miss can do: rows
whose distance comes back above it are searched again over every stored entry.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import faiss
import numpy as np
import torch

log = logging.getLogger(__name__)

# kind -> what it is; approximate kinds trade recall for speed (docs/benchmarks.md: measured cost)
INDEX_KINDS = {
    "flat": "exact inner-product search",
    "hnsw": "HNSW graph, M=32, vectors stored as float16 (approximate)",
    "ivf": "inverted lists, 4*sqrt(n) lists, exact vectors (approximate)",
    "ivfpq": "inverted lists + product quantisation, 8 bits per 8 dimensions (approximate, 16x smaller)",
}
# What a config may ask for: a kind, or "auto" (fit picks one from the bank size: choose_index).
INDEX_CHOICES = {"auto": "flat up to AUTO_FLAT_MAX vectors on the target device, hnsw beyond", **INDEX_KINDS}

# Largest bank that index="auto" searches exactly, per device type of the scorer: up to there exact search
# costs at most about 20% of the backbone forward at the default 392 px (28 x 28 patches, 768-d), beyond it
# HNSW, whose cost hardly grows with the bank and which kept image AUROC on magnetic_tile.
# cpu: measured by bench/banksize.py (docs/benchmarks.md, "Bank size"): FAISS flat on 2 cores costs 0.34x
#   of the forward at 10k vectors (0.32x at 12.5k in bench/throughput.py's bank), about linear in the bank
#   there, so 20% is reached near 6k; HNSW cost 0.19x at 10k and 0.30x at 100k, against flat's 2.4x.
# cuda: exact search runs as an fp16 matrix product on the GPU (TorchFlatSearch): 784 x M x 768 x 2 flop
#   per image against a forward of about 3.5 ms (283 images/s on an H100, docs/benchmarks.md, "GPU"); at an
#   assumed 400 Tflop/s a 1M bank costs 3 ms per image, so 20% of the forward is reached near 250k vectors.
#   An estimate until bench/banksize.py runs on a GPU.
AUTO_FLAT_MAX = {"cpu": 6_000, "cuda": 250_000}

SEARCH_ENGINES = ("auto", "faiss", "torch")
# Share of the free GPU memory an exact bank may take when placed (the backbone's activations need the rest).
DEVICE_MEMORY_SHARE = 0.5
# Bytes of one block of similarities [query chunk, bank chunk] of the chunked exact search.
WORKSPACE_BYTES = 256 << 20


def choose_index(bank_size: int, *, device: str) -> str:
    """The index kind `index="auto"` gives a bank of `bank_size` vectors scored on `device` ("cpu",
    "cuda" or "cuda:N"): "flat" up to AUTO_FLAT_MAX of that device type, "hnsw" beyond."""
    kind = torch.device(device).type
    if kind not in AUTO_FLAT_MAX:
        raise ValueError(f"device={device!r}: index='auto' knows the devices {sorted(AUTO_FLAT_MAX)}")
    return "flat" if bank_size <= AUTO_FLAT_MAX[kind] else "hnsw"


def _build_shard(f: np.ndarray, *, kind: str, seed: int) -> faiss.Index:
    n, d = f.shape
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        # float16 storage: the graph walk is bound by reading vectors, and half the bytes made it 1.7x
        # faster on the 12.5k bank of bench/throughput.py (22.9 -> 13.2 ms per 784-patch image at ef 32)
        # with the same answers; rounding moves a cosine distance by about 1e-5 in 768-d, at most 2^-11
        # for unit rows (docs/benchmarks.md, "Approximate indexes"). Banks fitted before keep float32
        # (IndexHNSWFlat) and are searched as they are.
        index = faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_fp16, 32, ip)
        index.hnsw.efConstruction = 80
        index.train(f)                                            # float16 needs no statistics; sets is_trained
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


# Search defaults of a bank built or loaded without a config (ModelConfig.nprobe / ef_search use them too).
# ef_search 32: no ef_search is safe alone (at 128 one cable_gland bank still left a test patch 0.60 above
# its exact neighbour), and the model's exhaustive re-search beyond its cover radius (exact_above, set by
# Model) made every patch of both measured cable_gland banks exact from ef 32 up, at 2.8x ef 128's speed
# without it (docs/benchmarks.md, "Approximate indexes"). Without that bound, 32 misses more often than 128.
NPROBE = 8
EF_SEARCH = 32

# Kinds that store every vector whole (HNSW in float16, or float32 in banks fitted before), so that a device
# can search them exactly by brute force: an HNSW graph or IVF's lists only speed up a CPU search (on a GPU
# the matrix product is both exact and faster); IVF-PQ keeps codes, not vectors.
WHOLE_VECTOR_KINDS = (faiss.IndexFlat, faiss.IndexHNSWFlat, faiss.IndexHNSWSQ, faiss.IndexIVFFlat)


def reconstruct(index: faiss.Index) -> np.ndarray:
    """[n, D] float32 rows of a shard in id order: its stored vectors, or for IVF-PQ their reconstruction
    from the codes. An IVF shard is copied to get the id map; the shard is left as it is."""
    if isinstance(index, faiss.IndexIVF):
        index = faiss.clone_index(index)
        index.make_direct_map()
    return index.reconstruct_n(0, index.ntotal)


def flat_vectors(index: faiss.Index) -> np.ndarray | None:
    """[n, D] float32 vectors of a shard that stores them whole (flat, HNSW at float16, IVF), in id order;
    None for IVF-PQ, whose codes are not the vectors it was built from."""
    return reconstruct(index) if isinstance(index, WHOLE_VECTOR_KINDS) else None


def as_flat(index: faiss.Index) -> faiss.Index:
    """The shard itself when flat, else an exact inner-product index over its stored vectors."""
    if isinstance(index, faiss.IndexFlat):
        return index
    flat = faiss.IndexFlatIP(index.d)
    flat.add(flat_vectors(index))
    return flat


class TorchFlatSearch:
    """Exact cosine 1-NN as chunked matrix products on a torch device, the bank resident there.

    Each query chunk is multiplied with each bank chunk of each shard ([q, c] similarities, at most
    `workspace_bytes`), so a bank of any number of shards needs no allocation larger than one shard. In a
    reduced precision (float16 on a GPU) the chunk's best entry is chosen in that precision and its
    similarity recomputed in float32 from the float32 query, so a distance differs from FAISS's only by the
    bank's rounding, or where two entries tie within the reduced precision.
    """

    def __init__(self, shards: list[np.ndarray], *, device: str | torch.device, dtype: torch.dtype,
                 workspace_bytes: int = WORKSPACE_BYTES, bank_chunk: int = 65536):
        """shards: [n_i, D] float32 unit rows each."""
        self.device, self.dtype = torch.device(device), dtype
        self.shards = [torch.from_numpy(np.ascontiguousarray(s)).to(self.device, dtype) for s in shards]
        self.offsets = np.cumsum([0] + [len(s) for s in shards])[:-1].tolist()
        self.bank_chunk = max(1, min(bank_chunk, max(len(s) for s in shards)))
        self.query_chunk = max(1, workspace_bytes // (self.bank_chunk * self.shards[0].element_size()))

    @staticmethod
    def bytes_needed(n: int, d: int, *, dtype: torch.dtype, workspace_bytes: int = WORKSPACE_BYTES) -> int:
        """Device memory of a bank of n x d vectors in `dtype` plus the search's workspace."""
        return n * d * torch.empty(0, dtype=dtype).element_size() + 2 * workspace_bytes

    @torch.inference_mode()
    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """queries: [N, D] float32 unit rows -> ([N] float32 cosine distance, [N] int64 index into the
        bank, shards in order) of each query's nearest entry."""
        q32 = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)   # [N, D]
        best = torch.full((len(q32),), -math.inf, device=self.device)                           # [N] float32
        index = torch.full((len(q32),), -1, dtype=torch.int64, device=self.device)             # [N]
        for qs in range(0, len(q32), self.query_chunk):
            q = q32[qs:qs + self.query_chunk]                                                   # [q, D]
            qc = q.to(self.dtype)
            b, ix = best[qs:qs + len(q)], index[qs:qs + len(q)]                                  # views
            for shard, offset in zip(self.shards, self.offsets, strict=True):
                for cs in range(0, len(shard), self.bank_chunk):
                    chunk = shard[cs:cs + self.bank_chunk]                                      # [c, D]
                    j = (qc @ chunk.T).argmax(dim=1)                                            # [q]
                    sim = (q * chunk[j].float()).sum(dim=1)                                     # [q] float32
                    better = sim > b
                    b.copy_(torch.where(better, sim, b))
                    ix.copy_(torch.where(better, j + (offset + cs), ix))
        # 1 - <x, x> can round slightly below 0 for an exact match
        return (1.0 - best).clamp_(0.0, 2.0).cpu().numpy(), index.cpu().numpy()


class FaissGpuSearch:
    """Exact search with FAISS's GPU flat index (a faiss-gpu build), vectors stored as float16."""

    def __init__(self, shards: list[faiss.Index], *, device: torch.device):
        self.resources = faiss.StandardGpuResources()
        options = faiss.GpuClonerOptions()
        options.useFloat16 = True
        self.shards = [faiss.index_cpu_to_gpu(self.resources, device.index or 0, s, options) for s in shards]

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return faiss_search(self.shards, queries)


def faiss_has_gpu() -> bool:
    """Whether the installed FAISS is a GPU build that sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def shard_search(shard: faiss.Index, queries: np.ndarray, *, exhaustive: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """queries: [n, D] float32 -> ([n, 1] float32 inner product, [n, 1] int64 id in the shard) of the best
    entry the shard's search finds. exhaustive: compare with every entry the shard stores instead (an HNSW
    shard's storage, float16 or float32, an IVF shard with every list probed): exact over the stored vectors
    for flat, HNSW and IVF shards, over the codes for IVF-PQ; no copy of the vectors is made."""
    if not exhaustive or isinstance(shard, faiss.IndexFlat):
        return shard.search(queries, 1)
    if isinstance(shard, faiss.IndexHNSW):
        return faiss.downcast_index(shard.storage).search(queries, 1)
    if isinstance(shard, faiss.IndexIVF):
        return shard.search(queries, 1, params=faiss.SearchParametersIVF(nprobe=shard.nlist))
    raise TypeError(f"bank shard of unknown type {type(shard).__name__}")


def faiss_search(shards: list[faiss.Index], queries: np.ndarray, *, batch_size: int = 65536,
                 exhaustive: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """queries: [N, D] float32 unit rows -> ([N] float32 cosine distance, [N] int64 bank index, -1 where an
    approximate index found nothing) of the best entry over all shards (exhaustive: see shard_search)."""
    n = len(queries)
    best = np.full(n, -np.inf, dtype=np.float32)                                   # [N] best similarity
    index = np.full(n, -1, dtype=np.int64)
    offset = 0
    for shard in shards:
        for start in range(0, n, batch_size):
            sim, label = shard_search(shard, queries[start:start + batch_size], exhaustive=exhaustive)  # [n, 1]
            better = sim[:, 0] > best[start:start + batch_size]
            best[start:start + batch_size][better] = sim[better, 0]
            index[start:start + batch_size][better] = label[better, 0] + offset
        offset += shard.ntotal
    # rounding can make 1 - <x, x> slightly negative for an exact match; an IVF probe that finds
    # nothing returns -inf similarity, i.e. the largest distance
    return np.clip(1.0 - best, 0.0, 2.0), index


class MemoryBank:
    """Sharded index; distance = 1 - cosine similarity, in [0, 2].

    exact_above: cosine distance above which FAISS's answer on the CPU is checked exhaustively (None: never).
    An approximate index (HNSW, IVF) only ever misses, so its distance is never below the exact one over the
    vectors it stores (HNSW: float16, see _build_shard); a query whose distance exceeds the bound is
    searched again over every stored entry (shard_search). With the fit's cover radius as the bound (every
    training patch lies within it of the bank) a normal patch is rarely above it, so few rows are searched
    twice, and every distance above the bound, the ones that make a verdict anomalous, is exact; a miss can
    only leave a distance at or below the bound. The re-search is linear in the bank (docs/benchmarks.md,
    "Bank size").
    """

    def __init__(self, shards: list[faiss.Index], *, nprobe: int = NPROBE, ef_search: int = EF_SEARCH,
                 exact_above: float | None = None):
        if not shards:
            raise ValueError("a memory bank needs at least one shard")
        if exact_above is not None and not 0 <= exact_above <= 2:
            raise ValueError(f"exact_above={exact_above} is a cosine distance: give one in [0, 2], or None to "
                             f"trust the index's search everywhere")
        self.shards, self.exact_above = shards, exact_above
        for s in shards:                                          # search-time knobs of approximate kinds
            if isinstance(s, faiss.IndexIVF):
                s.nprobe = nprobe
            if isinstance(s, faiss.IndexHNSW):
                s.hnsw.efSearch = ef_search
        self._engine: TorchFlatSearch | FaissGpuSearch | None = None      # None: FAISS on the CPU
        self._engine_path = ""                                             # what _engine is, for search_path

    @property
    def search_path(self) -> str:
        """How this process searches the bank (place decides), e.g. "faiss cpu hnsw float16, exhaustive above
        0.3120" (the stored vectors' type is named where it is not float32) or "torch cuda:0 float16 flat"."""
        if self._engine is not None:
            return self._engine_path
        guarded = self.exact_above is not None and self.kind != "flat"
        stored = " float16" if isinstance(self.shards[0], faiss.IndexHNSWSQ) else ""
        return (f"faiss cpu {self.kind}{stored}"
                + (f", exhaustive above {self.exact_above:.4f}" if guarded else ""))

    @classmethod
    def build(cls, features: np.ndarray, *, kind: str = "flat", shard_size: int = 1 << 20, seed: int = 0,
              nprobe: int = NPROBE, ef_search: int = EF_SEARCH, exact_above: float | None = None) -> MemoryBank:
        """features: [M, D] float32, rows L2-normalised; split into shards of at most shard_size rows."""
        f = np.ascontiguousarray(features, dtype=np.float32)
        if f.ndim != 2 or f.shape[0] == 0:
            raise ValueError(f"bank features must be a non-empty [M, D] array, got {f.shape}")
        if shard_size < 1:
            raise ValueError(f"shard_size={shard_size} must be >= 1")
        shards = [_build_shard(f[s:s + shard_size], kind=kind, seed=seed) for s in range(0, f.shape[0], shard_size)]
        return cls(shards, nprobe=nprobe, ef_search=ef_search, exact_above=exact_above)

    @property
    def size(self) -> int:
        return int(sum(s.ntotal for s in self.shards))

    @property
    def dim(self) -> int:
        return int(self.shards[0].d)

    @property
    def kind(self) -> str:
        """The INDEX_KINDS name of the shards (all shards of a bank are built alike)."""
        shard = self.shards[0]
        for kind, cls in (("flat", faiss.IndexFlat), ("hnsw", faiss.IndexHNSW), ("ivfpq", faiss.IndexIVFPQ),
                          ("ivf", faiss.IndexIVF)):
            if isinstance(shard, cls):
                return kind
        raise TypeError(f"bank shard of unknown type {type(shard).__name__}")

    def place(self, device: str | torch.device, *, engine: str = "auto", dtype: torch.dtype | None = None,
              memory_budget: int | None = None) -> MemoryBank:
        """Choose where this process searches the bank; returns self. Logs the choice (`search_path`).

        engine "auto": FAISS on a CPU device; on a GPU, an exact bank goes to FAISS's GPU index when the
        installed FAISS has one, else to TorchFlatSearch. "torch": TorchFlatSearch on any device (the
        GPU code path, testable on the CPU). "faiss": FAISS on the CPU. dtype: of the resident bank
        (default float16 on a GPU, float32 on the CPU). memory_budget: bytes the resident bank and its
        workspace may take (default DEVICE_MEMORY_SHARE of the GPU's free memory; unbounded on the CPU).
        A flat, HNSW or IVF bank within the budget is searched exactly on the device (the stored vectors, the
        graph or lists unused: calibration at fit used them, and their distances are never below the exact
        ones, so the threshold stays on the safe side). An IVF-PQ bank, or one over the budget, is searched
        by FAISS on the CPU, with a warning.
        """
        if engine not in SEARCH_ENGINES:
            raise ValueError(f"engine={engine!r} is unknown; choose one of {list(SEARCH_ENGINES)}")
        dev = torch.device(device)
        self._engine = None
        if engine == "faiss" or (engine == "auto" and dev.type == "cpu"):
            log.info("bank: %d x %d vectors, index %s, searched by %s", self.size, self.dim, self.kind,
                     self.search_path)
            return self
        if not all(isinstance(s, WHOLE_VECTOR_KINDS) for s in self.shards):
            log.warning("bank: index %s does not store its vectors whole, so %s cannot search it exactly; FAISS "
                        "searches it on the CPU (fit with --index auto, flat, hnsw or ivf to search on the device)",
                        self.kind, dev)
            return self
        dtype = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
        need = TorchFlatSearch.bytes_needed(self.size, self.dim, dtype=dtype)
        if memory_budget is None and dev.type == "cuda":
            memory_budget = int(torch.cuda.mem_get_info(dev)[0] * DEVICE_MEMORY_SHARE)
        if memory_budget is not None and need > memory_budget:
            log.warning("bank: %d x %d vectors need %.2f GiB on %s but %.2f GiB are available to it; FAISS "
                        "searches it on the CPU instead (slower; an hnsw bank keeps the search cost flat)",
                        self.size, self.dim, need / 2 ** 30, dev, memory_budget / 2 ** 30)
            return self
        if engine == "auto" and faiss_has_gpu():
            self._engine = FaissGpuSearch([as_flat(s) for s in self.shards], device=dev)
            self._engine_path = f"faiss gpu {dev} float16 flat"
        else:
            self._engine = TorchFlatSearch([flat_vectors(s) for s in self.shards], device=dev, dtype=dtype)
            self._engine_path = f"torch {dev} {str(dtype).removeprefix('torch.')} flat"
        log.info("bank: %d x %d vectors, index %s, searched exactly by %s", self.size, self.dim, self.kind,
                 self.search_path)
        return self

    def vectors(self) -> np.ndarray:
        """[M, D] float32 vectors of the bank, shards in order: the stored vectors of flat, hnsw and ivf shards
        (reconstruct), the reconstruction from the codes for ivfpq (what its search compares against).
        The shards are not modified."""
        return np.concatenate([reconstruct(s) for s in self.shards])

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """queries: [N, D] float32 L2-normalised -> ([N] float32 cosine distance to the nearest entry,
        [N] int64 its index in the bank, shards in order), by this process's search path (place); on
        FAISS, rows beyond exact_above searched again exhaustively."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [N, {self.dim}], got {q.shape}")
        if self._engine is not None:
            return self._engine.search(q)
        dist, index = faiss_search(self.shards, q)
        if self.exact_above is not None and self.kind != "flat":
            far = np.flatnonzero(dist > self.exact_above)                  # [n] rows a miss may have left there
            if len(far):
                dist[far], index[far] = faiss_search(self.shards, q[far], exhaustive=True)
        return dist, index

    def nearest(self, queries: np.ndarray) -> np.ndarray:
        """queries: [N, D] float32 L2-normalised -> [N] float32 cosine distance to the nearest entry."""
        return self.search(queries)[0]

    def serialize(self) -> list[np.ndarray]:
        """The shards as [bytes] uint8 arrays (to ship to workers; deserialize inverts)."""
        return [faiss.serialize_index(s) for s in self.shards]

    @classmethod
    def deserialize(cls, blobs: list[np.ndarray], *, nprobe: int = NPROBE, ef_search: int = EF_SEARCH,
                    exact_above: float | None = None) -> MemoryBank:
        return cls([faiss.deserialize_index(b) for b in blobs], nprobe=nprobe, ef_search=ef_search,
                   exact_above=exact_above)

    def save(self, directory: str | Path) -> list[str]:
        """Write one file per shard into `directory`; returns their names in order."""
        names = []
        for i, shard in enumerate(self.shards):
            name = f"bank-{i:05d}.faiss"
            faiss.write_index(shard, str(Path(directory) / name))
            names.append(name)
        return names

    @classmethod
    def load(cls, directory: str | Path, names: list[str], *, nprobe: int = NPROBE, ef_search: int = EF_SEARCH,
             exact_above: float | None = None) -> MemoryBank:
        return cls([faiss.read_index(str(Path(directory) / n)) for n in names], nprobe=nprobe, ef_search=ef_search,
                   exact_above=exact_above)
