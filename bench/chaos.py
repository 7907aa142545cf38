"""Chaos at scale: an audit of generated images and a fuzz corpus of malformed files, through the local S3
server, while the run is attacked; then re-run until it completes. Every file must end with exactly one row.

    python bench/chaos.py [--images 10000] [--fuzz 2000] [--outage-s 30] [--seed 0]

What it does, in one process that drives `python -m jobs score` subprocesses (each with Ray in-process):

1. Starts moto_server and the TCP relay of tests/s3server.py; uploads `--images` generated parts (PNG,
   JPEG, TIFF) and `--fuzz` malformed files: truncated, bit-flipped and spliced PNG/JPEG/TIFF, empty
   files, non-images with image extensions, decompression bombs, directories named like images (each
   holding one image), and valid or broken files under odd names (unicode, '#', '%', spaces).
2. Fits a small, fast model (56 px, one tile, block 3) in this process and saves it to the bucket.
3. Attempt 1: SIGKILLs a scoring actor once 10% of the rows are staged, then cuts the relay for
   `--outage-s` seconds once 25% are (the job is expected to stop, naming an object).
4. Attempt 2: SIGKILLs the driver once a further 25% of the rows are staged (its Ray processes are
   killed a few seconds later, as a node's supervisor would).
5. Attempt 3 runs to the end; attempt 4 re-runs the finished audit, which must change nothing.

It prints images, rows, missing, duplicated, error rows and the time to finish, and exits 1 on any
missing or duplicated row. Not part of `make test` (minutes, and most of a machine).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomaly_core import storage  # noqa: E402
from anomaly_core.config import ModelConfig  # noqa: E402
from anomaly_core.images import resize_square  # noqa: E402
from anomaly_core.model import Model  # noqa: E402
from anomaly_core.storage import StorageOptions  # noqa: E402
from jobs import output  # noqa: E402
from tests.helpers import make_bucket  # noqa: E402
from tests.s3server import MotoServer, Relay  # noqa: E402

DATE = "2026-11-30"
ARCHIVE, MODEL, OUT = "s3://chaos-archive/night", "s3://chaos-models/small", "s3://chaos-audits/small"
CONFIG = ModelConfig(image_size=56, tiles=1, blocks=(3,))
FORMATS = ("PNG", "JPEG", "TIFF")
EXT = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif"}


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """[size, size, 3] uint8: smooth noise (a 8 x 8 grid upsampled), so that files stay small."""
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A 1-bit PNG of width x height zeros: a few kB that decompress to width * height / 8 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))
    row = b"\x00" * (1 + (width + 7) // 8)
    raw = zlib.compressobj(9)
    body = b"".join(raw.compress(row) for _ in range(height)) + raw.flush()
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def fuzz_corpus(rng: np.random.Generator, n: int) -> tuple[dict[str, bytes], list[str]]:
    """({relative key: bytes} of n malformed or oddly named files, [directory markers named like
    images]). Directories hold one image each, so each is one expected row, as every file is."""
    valid = [encode(texture(rng, int(rng.integers(24, 96))), FORMATS[i % 3]) for i in range(60)]
    # over PIL's hard pixel limit, and between its warning and hard limits
    bombs = [png_bomb(20000, 20000), png_bomb(12000, 12000)]
    kinds = ["truncated", "bitflip", "spliced", "empty", "nonimage", "bomb", "directory", "oddname"]
    odd = ["été 日本 {i}", "hash#{i}", "percent%2F{i}", "pct%{i}%", "space {i} ", "plus+{i}", "emoji-🔧-{i}",
           "semi;{i}", "quote'{i}"]
    files, dirs = {}, []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        src = valid[int(rng.integers(len(valid)))]
        ext = [".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"][int(rng.integers(7))]
        if kind == "truncated":
            data = src[:int(rng.integers(0, len(src)))]
        elif kind == "bitflip":
            arr = bytearray(src)
            for pos in rng.integers(0, len(arr), int(rng.integers(1, 9))):
                arr[pos] ^= 1 << int(rng.integers(8))
            data = bytes(arr)
        elif kind == "spliced":
            other = valid[int(rng.integers(len(valid)))]
            data = src[:int(rng.integers(1, len(src)))] + other[int(rng.integers(0, len(other))):]
        elif kind == "empty":
            data = b""
        elif kind == "nonimage":
            data = [b"<html><body>not an image</body></html>", b"PK\x03\x04" + rng.bytes(200),
                    rng.bytes(int(rng.integers(1, 4096))), "ünïcödé text\n".encode() * 20][i % 4]
        elif kind == "bomb":
            data = bombs[i % len(bombs)]
            ext = ".png"
        elif kind == "directory":
            dirs.append(f"fuzz/directory/d{i:05d}{ext}/")
            files[f"fuzz/directory/d{i:05d}{ext}/inside.png"] = valid[i % len(valid)]
            continue
        else:
            data = src if i % 2 else src[:len(src) // 2]
            files[f"fuzz/odd/{odd[i % len(odd)].format(i=i)}{ext}"] = data
            continue
        files[f"fuzz/{kind}/f{i:05d}{ext}"] = data
    return files, dirs


def upload(items: dict[str, bytes], root: str, options: StorageOptions) -> None:
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: storage.write_bytes(storage.join(root, kv[0]), kv[1], options), items.items()))


def staged(options: StorageOptions) -> int:
    """Rows staged so far (files x rows per file is an upper bound; the count of files is what we watch)."""
    return len(storage.list_files(storage.join(OUT, "_staging"), options, suffixes=(".parquet",)))


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process below `pid`, from /proc (Linux)."""
    parent, cmd = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            cmd[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, pp in parent.items() if pp in frontier]
        found += children
        frontier = children
    return [(p, cmd[p]) for p in found]


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Attempt:
    """One `python -m jobs score` process (its own session: it and its Ray can be killed together)."""

    def __init__(self, n: int, argv: list[str], env: dict, logs: Path):
        self.n, self.t0 = n, time.time()
        self.log = logs / f"attempt{n}.log"
        self.stdout = logs / f"attempt{n}.out"
        self.proc = subprocess.Popen(argv, env=env, start_new_session=True,
                                     stdout=open(self.stdout, "w"), stderr=open(self.log, "w"))

    def wait_until(self, predicate, what: str, timeout: float = 3600) -> bool:
        """True once predicate() holds; False if the process ended first."""
        deadline = time.time() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                return False
            if time.time() > deadline:
                raise TimeoutError(f"attempt {self.n}: waited {timeout:.0f} s for {what}")
            time.sleep(0.5)
        return True

    def kill_actor(self) -> int | None:
        """SIGKILL one scoring actor of this job; its pid, or None when none runs."""
        for pid, cmd in descendants(self.proc.pid):
            if "MapBatches(Scorer)" in cmd:
                kill(pid)
                return pid
        return None

    def kill_driver(self) -> None:
        """SIGKILL the driver alone; a few seconds later its orphaned Ray processes, as a supervisor would."""
        family = descendants(self.proc.pid)
        kill(self.proc.pid)
        self.proc.wait()
        time.sleep(5)
        for pid, _ in family:
            kill(pid)

    def finish(self, timeout: float = 7200) -> int:
        rc = self.proc.wait(timeout)
        # the exception's own line (the URI it names), else the CLI's Error: line
        lines = self.log.read_text(errors="replace").splitlines()
        last = ([x for x in lines if re.match(r"\w*Error: .*s3://", x)] or [x for x in lines if x.startswith("Error:")])
        print(f"  attempt {self.n}: exit {rc} after {time.time() - self.t0:.0f} s"
              + (f": {last[-1][:300]}" if last else ""), flush=True)
        return rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=10000, help="generated parts")
    ap.add_argument("--fuzz", type=int, default=2000, help="malformed or oddly named files")
    ap.add_argument("--outage-s", type=float, default=30.0, help="how long the relay is cut")
    ap.add_argument("--rows-per-file", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    work = Path(tempfile.mkdtemp(prefix="chaos-"))
    os.environ.update(AWS_ACCESS_KEY_ID="chaos", AWS_SECRET_ACCESS_KEY="chaos", AWS_EC2_METADATA_DISABLED="true",
                      ANOMALY_CACHE=str(work / "cache"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    server = MotoServer()
    relay = Relay(server.port)
    direct = StorageOptions(endpoint_url=server.url)
    try:
        t = time.time()
        for bucket in ("chaos-archive", "chaos-models", "chaos-audits"):
            make_bucket(server.url, bucket)
        parts = {f"parts/line={i % 4}/p{i:05d}{EXT[FORMATS[i % 7 % 3]]}":
                 encode(texture(rng, 64), FORMATS[i % 7 % 3]) for i in range(args.images)}
        fuzz, dirs = fuzz_corpus(rng, args.fuzz)
        upload({**parts, **fuzz}, ARCHIVE, direct)
        fs, root = storage.filesystem(ARCHIVE, direct)
        for d in dirs:                                              # directory markers named like images
            fs.create_dir(f"{root}/{d}")
        expected = {storage.join(ARCHIVE, k) for k in (*parts, *fuzz)}
        print(f"uploaded {len(parts)} parts and {len(fuzz)} fuzz files ({len(dirs)} inside directories named "
              f"like images) in {time.time() - t:.0f} s", flush=True)

        good = np.stack([resize_square(texture(rng, 64), CONFIG.input_size) for _ in range(40)])
        model = Model.fit(good, config=CONFIG)
        model.save(MODEL, options=direct)
        print(f"model {model.model_id}: bank {model.bank.size}, threshold {model.calibration.threshold:.4f}",
              flush=True)

        argv = [sys.executable, "-m", "jobs", "score", ARCHIVE, MODEL, OUT, "--endpoint-url", relay.url,
                "--model-id", model.model_id, "--batch-size", str(args.batch_size), "--rows-per-file",
                str(args.rows_per_file), "--run-date", DATE, "--connect-timeout", "2", "--request-timeout", "10"]
        files_total = -(-len(expected) // args.rows_per_file)
        t_start = time.time()

        first = Attempt(1, argv, env, work)
        if first.wait_until(lambda: staged(direct) >= 0.10 * files_total, "10% of the rows"):
            print(f"  attempt 1: SIGKILL scoring actor {first.kill_actor()} at {staged(direct)} staged files",
                  flush=True)
        if first.wait_until(lambda: staged(direct) >= 0.25 * files_total, "25% of the rows"):
            print(f"  attempt 1: relay cut for {args.outage_s:.0f} s at {staged(direct)} staged files", flush=True)
            relay.cut()
            time.sleep(args.outage_s)
            relay.restore()
        first.finish()

        before = staged(direct)
        second = Attempt(2, argv, env, work)
        if second.wait_until(lambda: staged(direct) >= before + 0.25 * files_total, "25% more rows"):
            print(f"  attempt 2: SIGKILL driver at {staged(direct)} staged files", flush=True)
            second.kill_driver()
        second.finish()

        third = Attempt(3, argv, env, work)
        rc = third.finish()
        t_finish = time.time() - t_start
        summary = json.loads(third.stdout.read_text().splitlines()[-1]) if rc == 0 else {}
        again = Attempt(4, argv, env, work)
        again.finish()
        unchanged = rc == 0 and json.loads(again.stdout.read_text().splitlines()[-1]) == summary

        rows = output.scores_dataset(OUT, direct).to_table(columns=["uri", "status"])
        uris = rows["uri"].to_pylist()
        missing = expected - set(uris)
        duplicated = len(uris) - len(set(uris))
        errors = sum(s == "error" for s in rows["status"].to_pylist())
        fuzz_rows = [(u, s) for u, s in zip(uris, rows["status"].to_pylist(), strict=True) if "/fuzz/" in u]
        result = {"images": len(expected), "parts": len(parts), "fuzz_files": len(fuzz), "rows": len(uris),
                  "missing": len(missing), "duplicated": duplicated, "unexpected": len(set(uris) - expected),
                  "error_rows": errors, "fuzz_rows": len(fuzz_rows),
                  "fuzz_error_rows": sum(s == "error" for _, s in fuzz_rows),
                  "seconds_to_finish": round(t_finish, 1), "last_attempt_seconds": summary.get("seconds"),
                  "last_attempt": {k: summary.get(k) for k in ("scored_now", "resumed_from", "images_per_second")},
                  "rerun_unchanged": unchanged}
        print(json.dumps(result))
        if missing:
            print("missing, e.g.:", sorted(missing)[:5])
        return 0 if rc == 0 and not missing and not duplicated and not result["unexpected"] and unchanged else 1
    finally:
        relay.cut()
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
