"""Files written whole or not at all."""

import contextlib
import os
from typing import Union


def atomic_write(path: str, data: Union[str, bytes]) -> None:
    """Write `data` (text or bytes) to `path` whole or not at all: into a temporary file next to it, then os.replace
    (a crash or a full disk leaves the previous file, never half of one). An OSError names `path`."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise OSError(e.errno, e.strerror, path) from e
