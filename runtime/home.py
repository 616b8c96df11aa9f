"""Where dscompile keeps what it builds or downloads once per machine: $DSCOMPILE_HOME, or ~/.cache/dscompile."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """$DSCOMPILE_HOME, or ~/.cache/dscompile (the bench's checkpoint and engines, the TensorRT provider's
    engine cache, the native kernel library)."""
    return Path(os.environ.get("DSCOMPILE_HOME", Path.home() / ".cache" / "dscompile"))
