"""The on-disk model cache: one directory per prepared model, written so no reader sees half of it.

A model is built into a private partial directory, described by a manifest (recipe plus the size
and sha256 of every file), and only then renamed into place. A directory without a manifest, or
whose manifest names another recipe, is never returned: it is rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

CACHE_ENV = "UNIPREFILL_CACHE"
MANIFEST = "uniprefill-manifest.json"


def cache_root() -> Path:
    """Root of the model cache: `$UNIPREFILL_CACHE`, else `~/.cache/uniprefill`."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "uniprefill"
    return Path(root)


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(path: Path) -> dict | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def is_complete(path: Path, recipe: str) -> bool:
    """Cheap check (sizes only) that `path` holds a finished build of `recipe`."""
    manifest = read_manifest(path)
    if manifest is None or manifest.get("recipe") != recipe:
        return False
    for rel, meta in manifest["files"].items():
        f = path / rel
        if not f.is_file() or f.stat().st_size != meta["size"]:
            return False
    return True


def verify(path: Path) -> None:
    """Full integrity check: every file's sha256 against the manifest. Raises on mismatch."""
    manifest = read_manifest(path)
    if manifest is None:
        raise FileNotFoundError(f"{path} has no {MANIFEST}: it was never fully prepared")
    for rel, meta in manifest["files"].items():
        actual = sha256_file(path / rel)
        if actual != meta["sha256"]:
            raise ValueError(
                f"{path / rel} is corrupted (sha256 {actual}, expected {meta['sha256']}); "
                f"delete {path} and prepare the model again"
            )


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    lock_path = cache_root() / "models" / f".{name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_manifest(path: Path, recipe: str) -> None:
    files = {
        str(f.relative_to(path)): {"size": f.stat().st_size, "sha256": sha256_file(f)}
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }
    (path / MANIFEST).write_text(json.dumps({"recipe": recipe, "files": files}, indent=1))


def materialize(name: str, recipe: str, build: Callable[[Path], None]) -> Path:
    """Return the finished directory of model `name`, calling `build(empty_dir)` at most once.

    `recipe` names what `build` produces; changing it (new source hash, new generator version)
    makes older caches stale. Safe against interruption and against concurrent callers.
    """
    final = model_dir(name)
    if is_complete(final, recipe):
        return final
    with _lock(name):
        if is_complete(final, recipe):  # another process finished it while we waited
            return final
        for stale in final.parent.glob(f".{name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        partial = final.parent / f".{name}.partial-{os.getpid()}"
        partial.mkdir(parents=True)
        try:
            build(partial)
            _write_manifest(partial, recipe)
            if final.exists():
                shutil.rmtree(final)
            os.rename(partial, final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return final
