"""Hatchling build hook: wirehub's optional compiled accelerator.

Compiles each module of ``MODULES`` with Cython, typed by the ``.pxd`` beside it:
``src/wirehub/transport/_connection.py`` into the extension module
``wirehub.transport._connection_c``, ``src/wirehub/protocol/_framing.py`` into
``wirehub.protocol._framing_c``, ``src/wirehub/hub/_frames.py`` into ``wirehub.hub._frames_c``,
``src/wirehub/hub/broker/_memory.py`` into ``wirehub.hub.broker._memory_c`` and
``src/wirehub/hub/broker/_publishing.py`` into ``wirehub.hub.broker._publishing_c`` (in place in
``src/`` for an editable install; in the wheel otherwise), each with a digest of its two sources compiled in so that the module that loads it
(``wirehub._accelerator.load``) never uses a build older than the code beside it.

Optional: when Cython or a C compiler is missing, or compiling fails, the build says so and
goes on, and wirehub runs its pure-Python code. ``WIREHUB_PURE_PYTHON=1`` at install time
skips the compile (at run time it makes wirehub ignore a compiled copy).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

#: (package path, source module): each is compiled into ``<source>_c``
MODULES = (
    (("wirehub", "transport"), "_connection"),
    (("wirehub", "protocol"), "_framing"),
    (("wirehub", "hub"), "_frames"),
    (("wirehub", "hub", "broker"), "_memory"),
    (("wirehub", "hub", "broker"), "_publishing"),
)
DIRECTIVES = {
    "language_level": 3,
    "annotation_typing": False,  # the .pxd alone gives C types; annotations stay Python's
    "boundscheck": False,
    "wraparound": True,
}


def sources_digest(folder: Path, source: str) -> str:
    """The same digest as ``wirehub._accelerator.sources_digest``."""
    digest = hashlib.sha256()
    for name in (source + ".py", source + ".pxd"):
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def build_accelerator(src: Path, package: tuple[str, ...], source: str) -> Path:
    """Compile ``src/<source>.py`` into ``src/<source>_c<suffix>``; return its path."""
    from Cython.Build import cythonize
    from setuptools import Distribution, Extension
    from setuptools.command.build_ext import build_ext

    compiled = source + "_c"
    digest = sources_digest(src, source)
    with tempfile.TemporaryDirectory(prefix="wirehub-accel-") as tmp:
        root = Path(tmp)
        pkg = root.joinpath(*package)
        pkg.mkdir(parents=True)
        for depth in range(1, len(package) + 1):  # so that Cython sees the package path
            (root.joinpath(*package[:depth]) / "__init__.py").write_text("")
        code = (src / (source + ".py")).read_text(encoding="utf-8")
        (pkg / (compiled + ".py")).write_text(code + f'\n_SOURCE_DIGEST = "{digest}"\n', encoding="utf-8")
        shutil.copyfile(src / (source + ".pxd"), pkg / (compiled + ".pxd"))
        name = ".".join((*package, compiled))
        extension = Extension(name, [str(pkg / (compiled + ".py"))])
        modules = cythonize([extension], compiler_directives=DIRECTIVES, quiet=True)
        cmd = build_ext(Distribution({"name": "wirehub-accelerator", "ext_modules": modules}))
        cmd.build_lib = str(root / "lib")
        cmd.build_temp = str(root / "temp")
        cmd.ensure_finalized()
        cmd.run()
        built = Path(cmd.get_ext_fullpath(name))
        for old in src.glob(compiled + ".*"):
            if old.suffix in (".so", ".pyd"):
                old.unlink()
        target = src / built.name
        shutil.copyfile(built, target)
    return target


class AcceleratorHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        if os.environ.get("WIREHUB_PURE_PYTHON", "") not in ("", "0"):
            self.app.display_info("wirehub: WIREHUB_PURE_PYTHON is set: the compiled accelerator is not built")
            return
        for package, source in MODULES:
            src = Path(self.root, "src", *package)
            try:
                built = build_accelerator(src, package, source)
            except Exception as exc:  # noqa: BLE001 - optional: any failure means pure Python
                self.app.display_warning(
                    f"wirehub: the compiled accelerator for {'.'.join(package)} was not built "
                    f"({type(exc).__name__}: {exc}); wirehub will run its pure-Python code there "
                    "(slower, same behaviour)"
                )
                continue
            self.app.display_info(f"wirehub: built the compiled accelerator {built.name}")
            build_data["pure_python"] = False
            build_data["infer_tag"] = True
            build_data["artifacts"].append(built.relative_to(self.root).as_posix())
