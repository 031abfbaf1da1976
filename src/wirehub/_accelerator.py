"""The optional compiled accelerator: how a module picks its compiled copy.

Five modules hold the code that runs for every frame: ``wirehub/transport/_connection.py``
(connections, the send buffer, the stream read path), ``wirehub/protocol/_framing.py`` (the
frame decoders), ``wirehub/hub/_frames.py`` (the hub's ``ping`` and ``pub``, and their acks,
on a local and on a remote broker), ``wirehub/hub/broker/_memory.py`` (the memory broker,
whose publish every local ``pub`` calls) and ``wirehub/hub/broker/_publishing.py`` (the Redis
broker's publish path). At
install time ``hatch_build.py`` compiles each with Cython, typed by the ``.pxd`` file beside
it, into ``<module>_c`` (``_connection_c``, ...), with a digest of the two source files
compiled in. The public modules (``wirehub.transport.connection``,
``wirehub.protocol.framing``, ``wirehub.hub.frames``, ``wirehub.hub.broker.memory``,
``wirehub.hub.broker.publishing``) load their implementation
through :func:`load`, which takes:

- the compiled copy, when it was built and was built from the ``.py`` and ``.pxd`` files that
  are there now, so an edited source is never shadowed by a stale build;
- the Python source itself otherwise: when no C compiler or Cython was at hand at install
  time, when the build is out of date (a warning says to reinstall), or when the
  environment variable ``WIREHUB_PURE_PYTHON=1`` asks for it.

Behaviour is the same either way; the tests run on both (tests/test_accelerator.py).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import warnings
from pathlib import Path
from types import ModuleType

COMPILED = "compiled"
#: each accelerated package's state: "compiled" or why the Python code is used (for one of its
#: modules, when they differ)
STATUS: dict[str, str] = {}


def sources_digest(folder: Path, source: str) -> str:
    """SHA-256 of a module's ``.py`` and ``.pxd`` sources, as compiled into its build
    (``hatch_build.py`` computes the same)."""
    digest = hashlib.sha256()
    for suffix in (".py", ".pxd"):
        digest.update((folder / (source + suffix)).read_bytes())
    return digest.hexdigest()


def load(package: str, source: str) -> tuple[ModuleType, str]:
    """Import ``package.source`` or its compiled copy ``package.source_c``; return the module
    and what was taken (``"compiled"`` or why not)."""
    pure = f"{package}.{source}"
    if os.environ.get("WIREHUB_PURE_PYTHON", "") not in ("", "0"):
        return _record(package, importlib.import_module(pure), "off (WIREHUB_PURE_PYTHON is set)")
    try:
        compiled = importlib.import_module(pure + "_c")
    except ImportError:
        return _record(package, importlib.import_module(pure), "not built (pure Python)")
    folder = Path(compiled.__file__).parent
    if getattr(compiled, "_SOURCE_DIGEST", None) != sources_digest(folder, source):
        warnings.warn(
            f"wirehub's compiled accelerator was built from other sources than "
            f"{pure.replace('.', '/')}.py and .pxd as they are now; using the Python code. "
            "Reinstall wirehub (pip install -e .) to rebuild it.",
            RuntimeWarning,
            stacklevel=3,
        )
        return _record(package, importlib.import_module(pure), "out of date (pure Python)")
    return _record(package, compiled, COMPILED)


def _record(package: str, module: ModuleType, status: str) -> tuple[ModuleType, str]:
    if STATUS.get(package, COMPILED) == COMPILED:  # a package with two modules: compiled when both are
        STATUS[package] = status
    return module, status


def summary() -> str:
    """``"compiled"`` when every accelerated module runs compiled (or the one reason when
    none does), else each one's state."""
    states = set(STATUS.values())
    if len(states) == 1:  # the same for all: "compiled", or why none is
        return states.pop()
    return ", ".join(f"{package.rsplit('.', 1)[-1]} {status}" for package, status in sorted(STATUS.items()))
