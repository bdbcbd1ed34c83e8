"""An on-disk cache for expensive results (trained models, retraining ground truths).

A result is stored under a key made of

* the name of the computation,
* its parameters (anything JSON-like, plus tensors and numpy arrays, hashed by content),
* a hash of the ``helpers`` source code (every ``.py`` file of this package),
* the environment that computed it: the torch version, the default device and the default dtype (a tensor
  parameter's own dtype and device are part of its rendering),

so that changing a parameter, the code that computes the result or the machinery under it is a miss, and nothing
else is.
Files are written to a temporary name and moved into place with :func:`os.replace` (atomic on POSIX),
so an interrupted build never leaves a half-written entry behind.

Where (:func:`cache_dir`): ``$BOOK_CACHE_DIR`` if set; else ``<checkout>/_build/cache`` when ``helpers`` runs from
the book's checkout; else a per-user cache folder (``$XDG_CACHE_HOME/influence-on-trial``, default
``~/.cache/influence-on-trial``) — an installed package never writes inside its environment. Every lookup appends one line
(``hit`` / ``miss``) to ``log.jsonl`` in that folder, which is how the tests prove a rebuild reuses
everything; :data:`stats` counts the same events in the current process.

Example::

    from helpers import cache
    result = cache.memoize("warm_start", {"model": "mlp", "epochs": 7500, "seed": 3},
                           lambda: expensive(...))
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch

T = TypeVar("T")

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent

#: Events of this process: ``stats["hit"]``, ``stats["miss"]``.
stats: Counter[str] = Counter()


def checkout_root() -> Path | None:
    """The book's checkout this package runs from (the folder holding ``_toc.yml`` beside ``helpers/``), or None
    for an installed copy (``pip install .``), whose parent folder is ``site-packages``."""
    return REPO_ROOT if (REPO_ROOT / "_toc.yml").is_file() else None


def user_cache_root() -> Path:
    """The per-user cache folder of an installed package: ``$XDG_CACHE_HOME`` or ``~/.cache``, then
    ``influence-on-trial``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "influence-on-trial"


def cache_dir() -> Path:
    """The cache folder: ``$BOOK_CACHE_DIR``, else ``<checkout>/_build/cache``, else :func:`user_cache_root`."""
    if os.environ.get("BOOK_CACHE_DIR"):
        return Path(os.environ["BOOK_CACHE_DIR"])
    root = checkout_root()
    return root / "_build" / "cache" if root is not None else user_cache_root() / "cache"


def environment() -> dict[str, str]:
    """What the key holds besides name, parameters and code: torch version, default device and dtype."""
    return {"torch": torch.__version__, "device": str(torch.get_default_device()),
            "dtype": str(torch.get_default_dtype())}


def source_hash(package_dir: Path = PACKAGE_DIR) -> str:
    """SHA-256 over the path and content of every ``.py`` file of the package (sorted): changes with any edit."""
    h = hashlib.sha256()
    for path in sorted(package_dir.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        h.update(path.relative_to(package_dir).as_posix().encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def _canonical(obj: Any) -> Any:
    """A JSON-able, order-independent rendering of ``obj``; arrays and tensors by dtype, shape and content hash."""
    if isinstance(obj, torch.Tensor):
        device = str(obj.device)
        obj = obj.detach().cpu()
        return {"tensor": str(obj.dtype), "device": device, "shape": list(obj.shape),
                "sha256": hashlib.sha256(obj.contiguous().numpy().tobytes()).hexdigest()}
    if isinstance(obj, np.ndarray):
        return {"ndarray": str(obj.dtype), "shape": list(obj.shape),
                "sha256": hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"dataclass": type(obj).__name__, "fields": _canonical(dataclasses.asdict(obj))}
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, float):
        return repr(obj)  # exact: 0.1 and 0.1000000000000001 are different keys
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if isinstance(obj, torch.nn.Module):  # architecture and current values (parameters and buffers)
        return {"module": repr(obj), "state": _canonical({k: v for k, v in obj.state_dict().items()})}
    if isinstance(obj, (torch.dtype, Path)):
        return str(obj)
    raise TypeError(
        f"cannot build a cache key from a {type(obj).__name__}: pass plain numbers, strings, lists, dicts, "
        "dataclasses, tensors or arrays as parameters"
    )


def make_key(name: str, params: dict[str, Any], code_hash: str | None = None) -> str:
    """The cache key: SHA-256 of the name, the canonical parameters, the ``helpers`` source hash and
    :func:`environment`."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"cache name {name!r} must be a non-empty plain name (no '/' or leading '.')")
    payload = json.dumps({"name": name, "params": _canonical(params), "code": code_hash or source_hash(),
                          "environment": environment()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _log(event: str, name: str, key: str, seconds: float | None = None) -> None:
    stats[event] += 1
    record = {"event": event, "name": name, "key": key, "chapter": os.environ.get("BOOK_CHAPTER"),
              "time": time.time()}
    if seconds is not None:
        record["seconds"] = round(seconds, 3)
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    # One short line per event, appended in one write: concurrent writers don't interleave within a line.
    with open(folder / "log.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def memoize(name: str, params: dict[str, Any], compute: Callable[[], T]) -> T:
    """Return the cached result of ``compute()`` for ``(name, params, helpers source)``, computing it on a miss.

    The result must be picklable by :func:`torch.save` (tensors, arrays, dataclasses, dicts...). It is
    loaded with ``weights_only=False``: the cache only ever reads files this package wrote.
    Set ``BOOK_CACHE=off`` to bypass the cache entirely (always compute, never store).
    """
    if os.environ.get("BOOK_CACHE", "on").lower() in ("off", "0", "false", "no"):
        return compute()
    key = make_key(name, params)
    path = cache_dir() / name / f"{key}.pt"
    if path.exists():
        try:
            result = torch.load(path, weights_only=False)
        except Exception:  # a corrupt or foreign file is a miss, never a crash; it is overwritten below
            pass
        else:
            _log("hit", name, key)
            return result
    start = time.perf_counter()
    result = compute()
    _atomic_save(result, path)
    _log("miss", name, key, time.perf_counter() - start)
    return result


def cached(name: str | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator form of :func:`memoize`: the key is built from the call's keyword and positional arguments.

    Only use it on functions whose arguments are all cache-key material (see :func:`make_key`).
    """
    import functools
    import inspect

    def wrap(fn: Callable[..., T]) -> Callable[..., T]:
        sig = inspect.signature(fn)
        label = name or fn.__qualname__

        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> T:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            return memoize(label, dict(bound.arguments), lambda: fn(*args, **kwargs))

        return inner

    return wrap


def read_log(folder: Path | None = None) -> list[dict[str, Any]]:
    """All events in ``log.jsonl`` (empty list if there is none)."""
    path = (folder or cache_dir()) / "log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
