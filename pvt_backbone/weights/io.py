"""File I/O for weights and every other file the project writes: the one atomic writer."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None], *, mode: int = 0o644) -> Path:
    """Call ``write(temp)`` for a temp file beside ``path``, fsync it, then rename it onto ``path``.

    If ``write`` raises (or the process dies), ``path`` keeps its previous content and the temp file is removed (or
    left as a hidden ``.<name>.*.tmp`` after a kill). The temp file keeps ``path``'s suffix, for writers that choose
    the format by it (ONNX, torch.export).

    Raises:
        FileNotFoundError: ``path``'s directory does not exist.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "note.txt"
        >>> atomic_write(target, lambda temp: temp.write_text("done")).read_text()
        'done'
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"output directory {target.parent} does not exist (writing {target.name})")
    handle, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=f".tmp{target.suffix}")
    os.close(handle)
    temp = Path(temp_name)
    try:
        write(temp)
        with open(temp, "rb") as stream:
            os.fsync(stream.fileno())
        os.chmod(temp, mode)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return target
