"""Path resolution: `asset:NAME/...` names in configs expand to folders under the user's assets directory, and a
config named on the command line is a file or the name of a config shipped with kd (`shipped_configs`).

Small on purpose and off the training path's heavy imports: loaders import this, never the asset fetcher
(kd/assets/), which builds the folders named here.
"""

from __future__ import annotations

import glob
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


def absolute_path(value: str) -> str:
    """A local path as a run records it: absolute, symlinks resolved, `asset:` and `~` expanded (a glob: its folder
    resolved). Anything else (a hub id, an inline template, an asset not installed) is returned as it is."""
    try:
        expanded = resolve_path(value)
    except KDError:
        return value
    if os.path.exists(expanded):
        return os.path.realpath(expanded)
    folder, pattern = os.path.split(expanded)
    if glob.has_magic(pattern) and not glob.has_magic(folder) and os.path.isdir(folder or "."):
        return os.path.join(os.path.realpath(folder or "."), pattern)
    return value


def shipped_configs_dir() -> Path:
    """The configs shipped with kd: package data in an installed wheel (kd/configs, setup.py maps configs/ there),
    the repository's configs/ in a clone or an editable install."""
    here = Path(__file__).resolve().parent
    return here / "configs" if (here / "configs").is_dir() else here.parent / "configs"


def shipped_configs() -> list[str]:
    """The shipped configs' names (`train_shakespeare`, `accelerate/fsdp2`, ...), as `--config` takes them."""
    root = shipped_configs_dir()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def resolve_config(value: str) -> Path:
    """`--config VALUE`: a YAML file if one exists at that path, else the shipped config of that name (with or without
    `.yaml`, with or without a leading `configs/`, so the README's commands work outside a clone too)."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    name = value.removeprefix("./").removeprefix("configs/").removesuffix(".yaml").removesuffix(".yml")
    shipped = shipped_configs_dir() / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    raise KDError(
        f"config file {value} does not exist, and no config shipped with kd has that name "
        f"(shipped: {', '.join(shipped_configs())}; `kd configs` lists them with what each does)"
    )
