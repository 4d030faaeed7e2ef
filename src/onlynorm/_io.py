"""Safe, atomic file I/O for tensors.

Two rules: never unpickle a user file (safetensors, or ``torch.load(weights_only=True)`` for ``.pt``), and never
leave a partial output behind (write to a temporary file in the destination directory, then ``os.replace``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import FileFormatError

__all__ = [
    "atomic_path",
    "read_tensors",
    "write_tensors",
    "check_output_path",
    "check_output_dir",
    "as_path",
    "plain_text",
    "METADATA_KEY",
]

#: safetensors metadata is a flat ``str -> str`` map; onlynorm stores one JSON document under this key.
METADATA_KEY = "onlynorm"

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]")


def plain_text(text: str) -> str:
    """``text`` without ANSI escape sequences (torch's messages embed bold markers), on one line.

    >>> plain_text("do this \x1b[1monly if\x1b[0m you trust\\nit")
    'do this only if you trust it'
    """
    return " ".join(_ANSI.sub("", text).split())


def as_path(path: object, what: str = "path") -> Path:
    """``path`` as a :class:`~pathlib.Path`, refusing what is not a file name (``NormNet.load(123)``) and names no
    file system can hold (a component over 255 bytes: ``ENAMETOOLONG``) with :class:`FileFormatError`.

    >>> as_path(123)
    Traceback (most recent call last):
    ...
    onlynorm.errors.FileFormatError: path: expected a file name (str or os.PathLike), found 123 (int)
    """
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise FileFormatError(
            f"{what}: expected a file name (str or os.PathLike), found {path!r:.80} ({type(path).__name__})"
        )
    try:
        p = Path(path)
    except TypeError:  # an os.PathLike whose __fspath__ returns bytes or something else
        raise FileFormatError(f"{what}: expected a file name (str or os.PathLike), found {path!r:.80}") from None
    limit = _name_max(p)
    for part in p.parts:
        if len(os.fsencode(part)) > limit:
            raise FileFormatError(
                f"{what}: file name component {part[:40]!r}… is {len(os.fsencode(part))} bytes long, expected at most "
                f"{limit} (the file system's limit); choose a shorter name"
            )
    return p


def _name_max(p: Path) -> int:
    """The longest file name component the file system holding ``p`` accepts (255 where it cannot be asked)."""
    probe = p.parent
    while True:
        try:
            return int(os.pathconf(probe if str(probe) else ".", "PC_NAME_MAX"))
        except (OSError, ValueError):
            if probe == probe.parent:
                return 255
            probe = probe.parent


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_path(path: str | os.PathLike, *, inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Refuse, before any work, an output path that cannot or must not be written: an empty name, a directory, a
    missing or unwritable parent, a special file (FIFO, device, socket — only regular files are ever replaced),
    a read-only file, or one of the run's own ``inputs``.

    >>> check_output_path("")
    Traceback (most recent call last):
    ...
    onlynorm.errors.FileFormatError: output path: expected a file name, found an empty string
    """
    if isinstance(path, (str, os.PathLike)) and str(path) in ("", "."):
        raise FileFormatError("output path: expected a file name, found an empty string")
    final = as_path(path, "output path")
    if final.is_dir():
        raise FileFormatError(
            f"output path {str(final)!r} is a directory; expected a file name such as "
            f"{str(final / 'net.safetensors')!r}"
        )
    if final.exists() and not final.is_file():
        raise FileFormatError(
            f"output path {str(final)!r} exists and is not a regular file (a FIFO, device or "
            "socket); onlynorm only replaces regular files — choose another name"
        )
    # by its mode bits, not os.access: root may write anything, but a file nobody may write was protected on purpose
    if final.is_file() and not (final.stat().st_mode & 0o222 and os.access(final, os.W_OK)):
        raise FileFormatError(
            f"output path {str(final)!r} exists and is read-only; onlynorm does not replace a file you protected — "
            "choose another name or make it writable"
        )
    parent = final.parent
    if not parent.is_dir():
        raise FileFormatError(f"cannot write {str(final)!r}: directory {str(parent)!r} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FileFormatError(f"cannot write {str(final)!r}: directory {str(parent)!r} is not writable")
    for source in inputs:
        if final.exists() and Path(source).exists() and os.path.samefile(final, source):
            raise FileFormatError(
                f"output path {str(final)!r} is the input file {str(source)!r}; refusing to "
                "overwrite an input — write to another file"
            )
    return final


def check_output_dir(path: str | os.PathLike) -> Path:
    """An output *directory*: existing or creatable, and not a file (checked before the work, not after)."""
    if isinstance(path, (str, os.PathLike)) and str(path) == "":
        raise FileFormatError("output directory: expected a directory name, found an empty string")
    out = as_path(path, "output directory")
    if out.exists() and not out.is_dir():
        raise FileFormatError(f"output directory {str(out)!r} exists and is not a directory; choose another --out")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise FileFormatError(
            f"cannot create output directory {str(out)!r}: {str(existing)!r} is not a writable directory"
        )
    return out


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
    final = check_output_path(path)
    # the temporary name is longer than the final one: shorten it so a final name near the limit still fits
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name[:64]}.", suffix=".tmp", dir=final.parent or ".")
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp makes 0600: a new output file gets the usual permissions, a replaced one keeps its own
    os.chmod(tmp, final.stat().st_mode & 0o7777 if final.is_file() else 0o666 & ~_umask())
    try:
        yield tmp
        if final.exists() and not final.is_file():  # became special while we worked: never replace it
            raise FileFormatError(f"output path {str(final)!r} is no longer a regular file; not replaced")
        os.replace(tmp, final)
    finally:  # also on KeyboardInterrupt and on SIGTERM (the CLI turns it into SystemExit): no partial file
        if tmp.exists():
            tmp.unlink()


def write_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Write ``tensors`` (and a JSON ``metadata`` document) to a safetensors file, atomically."""

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
    p = as_path(path)
    if not p.is_file():
        raise FileFormatError(f"file {str(p)!r} not found; expected a .safetensors (or .pt state_dict) file")
    suffix = p.suffix.lower()
    tensors, meta = (_read_torch_state_dict(p), None) if suffix in {".pt", ".pth", ".bin"} else _read_safetensors(p)
    for name, t in tensors.items():
        if t.layout != torch.strided or t.device.type != "cpu" or t.is_quantized:
            raise FileFormatError(
                f"{str(p)!r}: tensor {name!r} is {t.layout} on device {t.device.type}; expected "
                "dense CPU tensors (save with tensor.to_dense().cpu())"
            )
        if t.is_complex():
            raise FileFormatError(f"{str(p)!r}: tensor {name!r} has complex dtype {t.dtype}; expected real values")
    return tensors, meta


def _read_safetensors(p: Path) -> tuple[dict[str, torch.Tensor], dict | None]:

    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(p), framework="pt") as f:
            raw_meta = f.metadata() or {}
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as exc:  # safetensors raises several unrelated types for corrupt headers
        first = plain_text(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__
        raise FileFormatError(
            f"{str(p)!r} is not a readable safetensors file ({first}); expected a file written by "
            "safetensors.torch.save_file or onlynorm"
        ) from None
    meta = None
    if METADATA_KEY in raw_meta:
        try:
            meta = json.loads(raw_meta[METADATA_KEY])
        except (json.JSONDecodeError, RecursionError):
            raise FileFormatError(
                f"{str(p)!r} has corrupt onlynorm metadata (not JSON, or nested too deeply); re-create the file"
            ) from None
        if not isinstance(meta, dict):
            raise FileFormatError(f"{str(p)!r} has onlynorm metadata of type {type(meta).__name__}, expected an object")
    return tensors, meta


def _read_torch_state_dict(p: Path) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing: the refusal says it
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = plain_text(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__
        raise FileFormatError(
            f"{str(p)!r} is not a loadable weights-only torch file ({first[:200]}); expected a state_dict saved "
            "with torch.save(model.state_dict(), path)"
        ) from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise FileFormatError(
            f"{str(p)!r} holds a {type(obj).__name__}, expected a state_dict (a dict of name -> tensor)"
        )
    return dict(obj)
