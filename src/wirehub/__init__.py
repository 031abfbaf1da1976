"""wirehub: a socket server for Python.

The framework: write an :class:`App` (connect / frame / disconnect handlers), serve it with
``wirehub run module:app`` or :func:`run`. Everything importable from here is public API.
"""

from __future__ import annotations

from typing import Any

from ._version import __version__
from .app import App
from .config import Config, ConfigError, load as load_config
from .protocol.framing import FrameError
from .server.listeners import BindError
from .server.server import Server
from .transport.connection import Connection, broadcast

__all__ = [
    "App",
    "BindError",
    "Config",
    "ConfigError",
    "Connection",
    "FrameError",
    "Server",
    "__version__",
    "broadcast",
    "load_config",
    "run",
]


def run(app: App, config: Config | None = None, **options: Any) -> int:
    """Serve ``app`` in this process until SIGTERM/SIGINT; return the exit code.

    ``options`` are configuration keys (``tcp=["127.0.0.1:9000"]``, ``max_frame="1MiB"``...),
    validated like flags; as on the command line they win over ``WIREHUB_*`` environment
    variables and the file ``WIREHUB_CONFIG`` names.
    """
    from .server.supervisor import run as _run

    if config is None:
        config = load_config(flags=options)
    elif options:
        config = config.replace(**options)
    return _run(app, config)
