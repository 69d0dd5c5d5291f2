"""Path resolution: `asset:NAME/...` names in configs expand to folders under the user's assets directory.

Small on purpose and off the training path's heavy imports: loaders import this, never the asset fetcher
(kd/assets/), which builds the folders named here.
"""

from __future__ import annotations

import os
from pathlib import Path

from kd.errors import KDError

ASSET_PREFIX = "asset:"
# Marker written last into an asset's folder, so a folder interrupted half-way is never taken as complete.
COMPLETE = ".complete"


def assets_dir() -> Path:
    if os.environ.get("KD_ASSETS_DIR"):
        return Path(os.environ["KD_ASSETS_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "kd" / "assets"


def resolve_path(value: str) -> str:
    """Expand `asset:NAME/...` to a path under `assets_dir()`, and `~`. Other strings pass through unchanged."""
    if value.startswith(ASSET_PREFIX):
        rel = value[len(ASSET_PREFIX) :]
        name = rel.split("/", 1)[0]
        root = assets_dir() / name
        if not (root / COMPLETE).exists():
            raise KDError(f"asset '{name}' is not installed (looked in {root}); run `python -m kd.assets fetch` first")
        return str(assets_dir() / rel)
    return os.path.expanduser(value)
