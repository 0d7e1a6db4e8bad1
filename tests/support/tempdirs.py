"""A throwaway directory others (a dyno's uid) may read."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def readable_temp_dir(prefix: str, parent: str) -> Iterator[Path]:
    """A new directory under `parent`, mode 0755, removed with all in it after."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
