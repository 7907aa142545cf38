"""What a user sees at a terminal: our own log lines, one progress line per job and the result.

Ray's own output (its Python logging, the lines its C++ core writes to stderr, deprecation warnings, worker
output forwarded to the driver) goes to a log file instead, `$TMPDIR/anomaly-<command>.log`, unless -v.
Under `ray job submit` (stderr not a terminal) the progress line becomes a plain log line now and then.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)

# loggers whose records are the user's business; every other logger (ray, urllib3, ...) is engine chatter
OUR_LOGGERS = ("jobs", "anomaly_core")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# seconds between two progress log lines when stderr is not a terminal (job logs, CI)
LOG_EVERY_S = 30.0

# the user's terminal while a session() runs (stderr as it was before the engine's output was sent to the
# log file); None outside one: sys.stderr
terminal = None


def log_path(command: str) -> Path:
    """The file that receives the engine's output of `anomaly <command>` (overwritten by each run)."""
    return Path(tempfile.gettempdir()) / f"anomaly-{command}.log"


class _Terminal(logging.StreamHandler):
    """Log lines through tqdm.write, which lifts a progress bar on the same stream above each line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


class _Ours(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".", 1)[0] in OUR_LOGGERS


def _fd2_is_stderr() -> bool:
    """True when sys.stderr writes to file descriptor 2 (a real process, not click's CliRunner or pytest's
    capture, whose descriptor 2 is not ours to move)."""
    try:
        return sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False


@contextlib.contextmanager
def session(command: str, *, verbose: bool, engine: bool):
    """Logging for one command, undone on exit. verbose: DEBUG lines of our loggers and all of the engine's
    output at the terminal. Otherwise our INFO lines reach the terminal and everything else the log file;
    engine: the command starts Ray, whose loggers are imported and re-pointed here (Ray gives its loggers
    console handlers of their own)."""
    global terminal
    root = logging.getLogger()
    saved_terminal = terminal
    saved_levels = {name: logging.getLogger(name).level for name in ("", *OUR_LOGGERS)}
    added: list[tuple[logging.Logger, logging.Handler]] = []
    removed: list[tuple[logging.Logger, logging.Handler]] = []
    moved_fd, log_file = None, None
    terminal = sys.stderr
    if not verbose:
        log_file = open(log_path(command), "w", encoding="utf-8", buffering=1)
        if _fd2_is_stderr():
            # the C++ core and Ray's own processes write straight to descriptor 2: the log file takes it,
            # and our lines go to a copy of the terminal's descriptor
            sys.stderr.flush()
            moved_fd = os.dup(2)
            terminal = os.fdopen(os.dup(moved_fd), "w", buffering=1, encoding=sys.stderr.encoding,
                                 errors="backslashreplace")
            os.dup2(log_file.fileno(), 2)
    to_terminal = _Terminal(terminal)
    to_terminal.setFormatter(logging.Formatter(FORMAT))
    root.setLevel(logging.INFO)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    if verbose:
        added.append((root, to_terminal))
    else:
        to_terminal.addFilter(_Ours())
        to_file = logging.StreamHandler(log_file)
        to_file.setLevel(logging.INFO)                   # ray.data logs its whole DataContext at DEBUG
        to_file.setFormatter(logging.Formatter(FORMAT))
        added += [(root, to_terminal), (root, to_file)]
        logging.captureWarnings(True)                    # warnings.warn -> "py.warnings" -> the file
        if engine:
            import ray.data  # noqa: F401  (configures the "ray" and "ray.data" loggers on import)
            for name in ("ray", "ray.data"):
                logger = logging.getLogger(name)
                for h in list(logger.handlers):
                    if type(h) is not logging.FileHandler and isinstance(h, logging.StreamHandler):
                        logger.removeHandler(h)
                        removed.append((logger, h))
                added.append((logger, to_file))
    for logger, h in added:
        logger.addHandler(h)
    if engine and not verbose:
        log.info("Ray's own output: %s (-v shows it here)", log_path(command))
    try:
        yield
    finally:
        for logger, h in added:
            logger.removeHandler(h)
        for logger, h in removed:
            logger.addHandler(h)
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
        logging.captureWarnings(False)
        if moved_fd is not None:
            sys.stderr.flush()
            os.dup2(moved_fd, 2)
            os.close(moved_fd)
            terminal.close()
        terminal = saved_terminal
        if log_file is not None:
            log_file.close()


class Progress:
    """One progress line for a job, in images: done/total, images/s and ETA. A tqdm bar on a terminal;
    elsewhere (job logs) a log line every LOG_EVERY_S seconds and one at the end, never a bar."""

    def __init__(self, *, total: int, label: str):
        self.total, self.label, self.done = total, label, 0
        self.t0 = self.last_log = time.monotonic()
        stream = terminal or sys.stderr
        self.bar = tqdm(total=total, desc=label, unit="img", file=stream, dynamic_ncols=True,
                        smoothing=0.1) if stream.isatty() else None

    def update(self, done: int) -> None:
        """Set the number of images done so far."""
        done = min(done, self.total)
        if done <= self.done:
            return
        if self.bar is not None:
            self.bar.update(done - self.done)
        self.done = done
        if self.bar is None and time.monotonic() - self.last_log >= LOG_EVERY_S:
            self._log()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            self._log()

    def _log(self) -> None:
        self.last_log = time.monotonic()
        rate = self.done / max(self.last_log - self.t0, 1e-9)
        eta = f", ETA {(self.total - self.done) / rate:.0f} s" if rate and self.done < self.total else ""
        log.info("%s: %d/%d images, %.2f images/s%s", self.label, self.done, self.total, rate, eta)
