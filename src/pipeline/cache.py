"""Writing the caches so that a full or read-only disk costs only the cache.

Everything under $PIPELINE_CACHE_DIR can be computed again (the tokenizer folder, the dequantized model, the
packed weights, calibrations, null scores): a write that fails leaves no partial file, says once what it could
not write and how to fix that, and the run goes on from memory. Only what cannot go on without its files (a
peer engine converting the model on disk) stops, with `CacheWriteError`, a PipelineError naming the fix.
No torch here: run.py's checks import this.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path

from pipeline.errors import PipelineError

FIX = "free disk space there (or make it writable), or set PIPELINE_CACHE_DIR (model.cache_dir) to a disk with room"


def is_write_error(error: BaseException) -> bool:
    """An error that says the disk would not take the bytes: an OSError, or one a writer in Rust wraps as its
    own exception type with the OS's error in its text (safetensors: 'I/O error: No space left on device (os
    error 28)'; tokenizers: 'File too large (os error 27)')."""
    return isinstance(error, OSError) or re.search(r"\(os error \d+\)|I/O error", str(error)) is not None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


class CacheWriteError(PipelineError):
    """A cache entry that could not be written; the message names where and the fix."""

    def __init__(self, target: Path, error: BaseException):
        self.target = target
        super().__init__(f"could not write the cache entry {target} ({_first_line(error)}): {FIX}")


def warn(error: CacheWriteError | str, consequence: str = "running on from memory") -> None:
    """One line on stderr: what was not cached, and the fix."""
    print(f"warning: {error}; {consequence}", file=sys.stderr)


def write_text(file: Path, text: str, quiet: bool = False) -> bool:
    """Write `file` atomically (a temporary sibling, renamed); False when the disk refuses, with one warning
    unless `quiet`."""
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        tmp.replace(file)
    except OSError as error:
        return refused(file, tmp, error, quiet)
    return True


def refused(file: Path, tmp: Path, error: BaseException, quiet: bool = False) -> bool:
    """After the disk refused `file`, written through `tmp`: the partial file removed, one warning unless
    `quiet`; False, for the writer to return."""
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)
    if not quiet:
        warn(CacheWriteError(file, error), "the next run computes it again")
    return False
