"""Response time of the review page's queries (jobs.review.ReviewData) on a large generated output.

    python bench/review.py [--rows 100000] [--nights 4] [--label-files 0 1000] [--repeat 5]

Writes a scored output of `--rows` rows over `--nights` nights (tests/scored_output.py: the layout the
score job commits, 4 x 4 grids), then for each count of label files (one label per file, as the page
writes them) times the page's requests: a page of rows with and without filters, the last page, a uri
search, the filter choices and the drift. Prints the median of `--repeat` calls per request, in ms.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.labels import append_labels  # noqa: E402
from jobs.review import Filters, ReviewData  # noqa: E402
from tests.scored_output import write_output  # noqa: E402


def timed(fn, repeat: int) -> float:
    """Median wall time of `repeat` calls of fn(), ms."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--nights", type=int, default=4)
    ap.add_argument("--label-files", type=int, nargs="+", default=[0, 1000])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="bench-review-")) / "scores"
    first = dt.date(2026, 11, 1)
    nights = {str(first + dt.timedelta(days=i)): args.rows // args.nights for i in range(args.nights)}
    rows = write_output(out, nights, seed=0)
    data = ReviewData(str(out), reviewer="bench")
    last = sorted(nights)
    requests = {
        "page 1, no filter": lambda: data.rows(Filters()),
        "page 3, verdict + product + line + score + dates": lambda: data.rows(Filters(
            verdict="normal", product="tile", line="L1", score_min=0.1, score_max=0.3,
            date_from=dt.date.fromisoformat(last[0]), date_to=dt.date.fromisoformat(last[-1]), offset=100)),
        "last page, sorted by uri": lambda: data.rows(Filters(sort="uri", offset=rows.num_rows - 50)),
        "uri search": lambda: data.rows(Filters(q="img_01234")),
        "unlabelled only": lambda: data.rows(Filters(label="unlabelled")),
        "filter choices": data.facets,
        "drift (with its figure)": data.drift,
    }
    print(f"{rows.num_rows:,} rows over {args.nights} nights in {out}")
    labelled = 0
    for files in sorted(args.label_files):
        batch = rows.slice(labelled, files - labelled).to_pylist()
        for r in batch:
            append_labels(str(out), [{**r, "label": "normal"}], reviewer="bench")
        labelled = files
        data.rows(Filters())                                        # connect outside the timings
        print(f"\n{files} label files")
        for name, fn in requests.items():
            print(f"  {name:<50} {timed(fn, args.repeat):8.0f} ms")


if __name__ == "__main__":
    main()
