"""The ``lumos`` command of the wheel: runs the engine's CLI binary, which the wheel carries
in ``lumos/bin/``, after the checks that ``import lumos`` makes (torch present, at the
version the engine was built against), so that a broken installation gives a message
that says what to install rather than a loader error."""

from __future__ import annotations

import os
import pathlib
import sys


def _binary() -> pathlib.Path:
    import lumos
    here = pathlib.Path(lumos.__file__).resolve().parent
    name = "lumos.exe" if sys.platform == "win32" else "lumos"
    packaged = here / "bin" / name
    if lumos._build_info() is not None:
        if not packaged.is_file():
            raise lumos.LumosLibraryError(f"{packaged} is missing from this lumos installation: reinstall it "
                                          f"(`pip install --force-reinstall lumos-*.whl`)")
        lumos._check_torch(lumos._build_info())
        return packaged
    # a source checkout (the editable install of bindings/python): the CLI beside the
    # library that LUMOS_LIBRARY names, else the cargo build's
    env = os.environ.get("LUMOS_LIBRARY")
    if env and (pathlib.Path(env).parent / name).is_file():
        return pathlib.Path(env).parent / name
    for up in here.parents:
        for profile in ("release", "debug"):
            c = up / "target" / profile / name
            if c.is_file():
                return c
    raise lumos.LumosLibraryError("the lumos CLI is not built in this source checkout: "
                                  "cargo build --release --bin lumos")


def main() -> None:
    import lumos
    try:
        exe = _binary()
    except lumos.LumosLibraryError as e:
        print(f"lumos: {e}", file=sys.stderr)
        sys.exit(127)
    args = [str(exe), *sys.argv[1:]]
    if sys.platform == "win32":
        import subprocess
        sys.exit(subprocess.call(args))
    os.execv(exe, args)
