"""Safe, atomic file I/O for tensors.

Two rules: never unpickle a user file (safetensors, or ``torch.load(weights_only=True)`` for ``.pt``), and never
leave a partial output behind (write to a temporary file in the destination directory, then ``os.replace``).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import FileFormatError

__all__ = ["atomic_path", "read_tensors", "write_tensors", "METADATA_KEY"]

#: safetensors metadata is a flat ``str -> str`` map; onlynorm stores one JSON document under this key.
METADATA_KEY = "onlynorm"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it into place only if the block succeeds.

    >>> import pathlib, tempfile
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
    >>> with atomic_path(target) as tmp:
    ...     _ = tmp.write_bytes(b"data")         # a crash here would leave no x.bin behind
    >>> target.read_bytes()
    b'data'
    """
    final = Path(path)
    if final.parent and not final.parent.exists():
        raise FileFormatError(
            f"cannot write {str(final)!r}: directory {str(final.parent)!r} does not exist; create it first")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent or ".")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Write ``tensors`` (and a JSON ``metadata`` document) to a safetensors file, atomically."""
    from safetensors.torch import save_file

    meta = None if metadata is None else {METADATA_KEY: json.dumps(metadata, sort_keys=True)}
    # safetensors refuses non-contiguous or shared-storage tensors; clone to be safe (they are small).
    payload = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(payload, str(tmp), metadata=meta)


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Read a tensor file without executing any code from it.

    ``.safetensors`` (the native format) returns its tensors and the onlynorm JSON metadata (or ``None``).
    ``.pt``/``.pth``/``.bin`` are read with ``torch.load(weights_only=True)`` and must hold a flat ``str -> Tensor``
    dict (a ``state_dict``); they carry no metadata.
    """
    p = Path(path)
    if not p.is_file():
        raise FileFormatError(f"file {str(p)!r} not found; expected a .safetensors (or .pt state_dict) file")
    suffix = p.suffix.lower()
    if suffix in {".pt", ".pth", ".bin"}:
        return _read_torch_state_dict(p), None
    return _read_safetensors(p)


def _read_safetensors(p: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    from safetensors import safe_open

    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(p), framework="pt") as f:
            raw_meta = f.metadata() or {}
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as exc:  # safetensors raises several unrelated types for corrupt headers
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FileFormatError(
            f"{str(p)!r} is not a readable safetensors file ({first}); expected a file written by "
            "safetensors.torch.save_file or onlynorm") from None
    meta = None
    if METADATA_KEY in raw_meta:
        try:
            meta = json.loads(raw_meta[METADATA_KEY])
        except json.JSONDecodeError:
            raise FileFormatError(f"{str(p)!r} has corrupt onlynorm metadata (not JSON); re-create the file") from None
        if not isinstance(meta, dict):
            raise FileFormatError(f"{str(p)!r} has onlynorm metadata of type {type(meta).__name__}, expected an object")
    return tensors, meta


def _read_torch_state_dict(p: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FileFormatError(
            f"{str(p)!r} is not a loadable weights-only torch file ({first[:200]}); expected a state_dict saved "
            "with torch.save(model.state_dict(), path)") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise FileFormatError(
            f"{str(p)!r} holds a {type(obj).__name__}, expected a state_dict (a dict of name -> tensor)")
    return dict(obj)
