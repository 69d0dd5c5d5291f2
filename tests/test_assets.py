"""The offline assets' fetch (kd/assets): several processes fetching at once build each asset once."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import pytest

import kd.assets as assets
from kd.errors import KDError
from kd.paths import COMPLETE


def test_fetches_at_once_build_an_asset_once_and_both_get_it(tmp_path, monkeypatch):
    # two ranks of one launch (or two test workers) on a machine without the asset: without the lock both built it
    # and the second's publish removed the folder the first had just returned
    monkeypatch.setenv("KD_ASSETS_DIR", str(tmp_path))
    builds = []

    def slow_asset(root: Path) -> Path:  # the shape of every fetcher: complete -> return, else stage and publish
        out = root / "slow"
        if (out / COMPLETE).exists():
            return out
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            staging = Path(tmp) / "slow"
            staging.mkdir()
            time.sleep(0.5)  # a download: long enough for the other fetch to arrive
            (staging / "data.txt").write_text(f"build {len(builds)}")
            builds.append(threading.get_ident())
            assets._publish(staging, out)
        return out

    monkeypatch.setitem(assets.FETCHERS, "slow", slow_asset)
    got, errors = [], []

    def fetch():
        try:
            got.append(assets.fetch(["slow"])["slow"])
        except Exception as e:  # noqa: BLE001  (reported by the assertion below)
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors and len(builds) == 1
    assert got == [tmp_path / "slow"] * 2 and (tmp_path / "slow" / "data.txt").read_text() == "build 0"


def test_an_unknown_asset_is_refused_before_anything_is_fetched(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_ASSETS_DIR", str(tmp_path))
    with pytest.raises(KDError, match="unknown asset 'nope'; known: smollm2-135m-instruct"):
        assets.fetch(["shakespeare", "nope"])
    assert not (tmp_path / "shakespeare").exists()


def test_assets_where_the_lock_cannot_be_written_are_used_without_it(tmp_path, monkeypatch):
    # assets installed once on storage users cannot write: fetching what is there still answers. The lock file is
    # made unopenable with a folder in its place (a read-only mode would not stop root, who runs CI here)
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / COMPLETE).touch()
    (tmp_path / ".fetch.lock").mkdir()
    monkeypatch.setenv("KD_ASSETS_DIR", str(tmp_path))
    monkeypatch.setitem(assets.FETCHERS, "slow", lambda root: root / "slow")
    assert assets.fetch(["slow"]) == {"slow": tmp_path / "slow"}
