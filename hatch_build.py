"""Hatchling build hook: wirehub's optional compiled accelerator.

Compiles ``src/wirehub/transport/_connection.py`` with Cython, typed by ``_connection.pxd``,
into the extension module ``wirehub.transport._connection_c`` (in place in ``src/`` for an
editable install; in the wheel otherwise), with a digest of both sources compiled in so that
``wirehub.transport.connection`` never uses a build older than the code beside it.

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

PACKAGE = ("wirehub", "transport")
SOURCE = "_connection"
COMPILED = "_connection_c"
DIRECTIVES = {
    "language_level": 3,
    "annotation_typing": False,  # the .pxd alone gives C types; annotations stay Python's
    "boundscheck": False,
    "wraparound": True,
}


def sources_digest(folder: Path) -> str:
    """The same digest as ``wirehub.transport.connection.sources_digest``."""
    digest = hashlib.sha256()
    for name in (SOURCE + ".py", SOURCE + ".pxd"):
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def build_accelerator(src: Path) -> Path:
    """Compile ``src/_connection.py`` into ``src/_connection_c<suffix>``; return its path."""
    from Cython.Build import cythonize
    from setuptools import Distribution, Extension
    from setuptools.command.build_ext import build_ext

    digest = sources_digest(src)
    with tempfile.TemporaryDirectory(prefix="wirehub-accel-") as tmp:
        root = Path(tmp)
        pkg = root.joinpath(*PACKAGE)
        pkg.mkdir(parents=True)
        for level in (root / PACKAGE[0], pkg):  # so that Cython sees the package path
            (level / "__init__.py").write_text("")
        code = (src / (SOURCE + ".py")).read_text(encoding="utf-8")
        (pkg / (COMPILED + ".py")).write_text(code + f'\n_SOURCE_DIGEST = "{digest}"\n', encoding="utf-8")
        shutil.copyfile(src / (SOURCE + ".pxd"), pkg / (COMPILED + ".pxd"))
        name = ".".join((*PACKAGE, COMPILED))
        extension = Extension(name, [str(pkg / (COMPILED + ".py"))])
        modules = cythonize([extension], compiler_directives=DIRECTIVES, quiet=True)
        cmd = build_ext(Distribution({"name": "wirehub-accelerator", "ext_modules": modules}))
        cmd.build_lib = str(root / "lib")
        cmd.build_temp = str(root / "temp")
        cmd.ensure_finalized()
        cmd.run()
        built = Path(cmd.get_ext_fullpath(name))
        for old in src.glob(COMPILED + ".*"):
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
        src = Path(self.root, "src", *PACKAGE)
        try:
            built = build_accelerator(src)
        except Exception as exc:  # noqa: BLE001 - optional: any failure means pure Python
            self.app.display_warning(
                f"wirehub: the compiled accelerator was not built ({type(exc).__name__}: {exc}); "
                "wirehub will run its pure-Python code (slower, same behaviour)"
            )
            return
        self.app.display_info(f"wirehub: built the compiled accelerator {built.name}")
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        build_data["artifacts"].append(built.relative_to(self.root).as_posix())
