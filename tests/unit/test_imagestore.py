"""The image store (deskgen/imagestore.py) on a real folder: atomic writes, retention, the size bound
shared by several writers, ids that cannot leave the folder."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from deskgen.errors import InvalidParameter
from deskgen.imagestore import ImageStore, ImageStoreSettings

pytestmark = pytest.mark.unit


def test_put_get_and_ids_that_cannot_leave_the_folder(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images", max_bytes=10_000, retention_s=3600)
    store.put("abcdef0123", b"png-bytes")
    assert store.get("abcdef0123") == b"png-bytes"
    assert store.get("never-stored") is None
    assert (tmp_path / "images" / "ab" / "abcdef0123.png").read_bytes() == b"png-bytes"
    assert not list((tmp_path / "images").rglob("*.partial"))
    for bad in ("..", "../x", "a/b", ".hidden", ""):
        with pytest.raises(InvalidParameter) as info:
            store.put(bad, b"x")
        assert info.value.field == "image_id"


def test_retention_and_the_size_bound_remove_the_oldest_first(tmp_path: Path) -> None:
    store = ImageStore(tmp_path, max_bytes=1000, retention_s=100, sweep_interval_s=3600)
    start = time.time()
    for k in range(8):  # 8 x 200 bytes, one second apart; every put of 200 bytes passes a tenth: a sweep
        store.put(f"image-{k}", bytes(200), now=start + k)
    # The bound holds after every put: the newest 5 (1000 bytes) stay.
    assert [store.get(f"image-{k}") is not None for k in range(8)] == [False] * 3 + [True] * 5
    report = store.sweep(now=start + 7)
    assert (report.kept, report.kept_bytes, report.expired, report.evicted) == (5, 1000, 0, 0)
    # At start + 105, the images written at start + 3 and + 4 are older than 100 s; + 5 is exactly 100 s old.
    report = store.sweep(now=start + 105)
    assert (report.kept, report.expired) == (3, 2)
    assert store.usage() == (3, 600)


def test_two_writers_on_one_folder_keep_one_bound(tmp_path: Path) -> None:
    """Two ingress replicas sharing the folder: each sweep counts what is on disk, not what it wrote."""
    a = ImageStore(tmp_path, max_bytes=1000, retention_s=3600, sweep_interval_s=3600)
    b = ImageStore(tmp_path, max_bytes=1000, retention_s=3600, sweep_interval_s=3600)
    start = time.time()
    for k in range(10):
        (a if k % 2 else b).put(f"img-{k:02d}", bytes(150), now=start + k)
    images, size = a.usage()
    assert size <= 1000 and images == 6  # the newest six of 150 bytes
    assert all(a.get(f"img-{k:02d}") is not None for k in range(4, 10))


def test_settings_come_from_serve_config_and_refuse_nonsense() -> None:
    from deskgen.serve_config import app_args, load_serve_config

    settings = ImageStoreSettings.model_validate(app_args(load_serve_config())["image_store"])
    assert (settings.dir, settings.max_mb, settings.retention_h) == ("build/images", 2048, 168)
    assert ImageStoreSettings(dir=None).build() is None
    with pytest.raises(ValueError, match="max_mb"):
        ImageStoreSettings(max_mb=0)
    with pytest.raises(ValueError, match="extra"):
        ImageStoreSettings.model_validate({"dir": "x", "max_gb": 1})
