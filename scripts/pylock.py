#!/usr/bin/env python3
"""Reads the project's Python lock files (requirements/*.lock, written by scripts/lock.sh).

  pylock.py check LOCK [--ignore NAME ...]
      Run by the environment's own interpreter: compares the installed distributions with
      LOCK (editable installs of local projects are left out; --ignore leaves out others). Prints every package that is missing, at another version, or installed but not
      in LOCK, and exits 1 if there is any; exits 0 when the environment matches.
  pylock.py extract LOCK NAME ...
      Writes the entries of LOCK for NAME ... (version and hashes) to standard output, as a
      requirements file for pip's hash-checking mode. Fails if a name is not in LOCK.
  pylock.py version LOCK NAME
      Prints the version that LOCK pins for NAME.
  pylock.py python LOCK
      Prints the Python version (major.minor) that LOCK was resolved for.

Only the standard library is used, so any Python 3.8+ can run it.
"""
from __future__ import annotations

import os
import re
import sys

_ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\\=]+)")
_PYTHON = re.compile(r"--python-version[ =](\d+\.\d+)")


def canonical(name: str) -> str:
    """PEP 503 normalized name: 'PyQt5_sip' and 'pyqt5-sip' are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: str) -> dict[str, tuple[str, list[str]]]:
    """canonical name -> (version, the entry's lines without comments)."""
    entries: dict[str, tuple[str, list[str]]] = {}
    current: list[str] | None = None
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.rstrip("\n")
            m = _ENTRY.match(line)
            if m:
                if ";" in line:
                    sys.exit(f"pylock: {path}: '{line.strip()}' has an environment marker; the locks are "
                             "resolved for one platform and have none (scripts/lock.sh)")
                name = canonical(m.group(1))
                if name in entries:
                    sys.exit(f"pylock: {path} pins {name} twice")
                current = [line]
                entries[name] = (m.group(3), current)
            elif current is not None and line.startswith("    --hash="):
                current.append(line)
            elif line.strip() == "" or line.lstrip().startswith("#"):
                current = None
            else:
                sys.exit(f"pylock: {path}: cannot read the line '{line.strip()}' (expected 'name==version', "
                         "'--hash=' or a comment, as scripts/lock.sh writes)")
    if not entries:
        sys.exit(f"pylock: {path} pins no package (expected lines 'name==version', as scripts/lock.sh writes)")
    return entries


def lock_python(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("#"):
                break
            m = _PYTHON.search(line)
            if m:
                return m.group(1)
    sys.exit(f"pylock: {path} does not say which Python it was resolved for (--python-version in its header)")


def _editable(dist) -> bool:
    """An editable install of a local project (PEP 660: direct_url.json says so), such as
    this checkout's binding and plugin: never in a lock, never an extra."""
    import json

    try:
        info = json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        return False
    return bool(info.get("dir_info", {}).get("editable"))


def check(path: str, ignore: list[str]) -> int:
    from importlib import metadata

    locked = read_lock(path)
    skip = {canonical(n) for n in ignore} | {"pip"}
    installed: dict[str, str] = {}
    dists = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and not _editable(dist):
            installed[canonical(name)] = dist.version
            dists[canonical(name)] = dist
    want_py = lock_python(path)
    have_py = "%d.%d" % sys.version_info[:2]
    problems = []
    if have_py != want_py:
        problems.append(f"Python {have_py}: {path} was resolved for Python {want_py}")
    for name, (version, _) in sorted(locked.items()):
        have = installed.get(name)
        if have is None:
            problems.append(f"missing: {name}=={version}")
        elif have != version:
            problems.append(f"version: {name} {have} installed, {version} locked")
        else:
            # a package whose files were removed (by another package's uninstall that
            # shared its paths, or by hand) is broken even at the right version
            lost = [f for f in (dists[name].files or []) if not os.path.exists(dists[name].locate_file(f))]
            if lost:
                problems.append(f"broken: {name}=={version} ({len(lost)} of its files missing, e.g. {lost[0]})")
    extra = sorted(n for n in installed if n not in locked and n not in skip)
    for name in extra:
        problems.append(f"not in the lock: {name}=={installed[name]}")
    for p in problems:
        print(p)
    if not problems:
        print(f"{sys.prefix} matches {path} ({len(locked)} packages)")
    return 1 if problems else 0


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        sys.exit(__doc__)
    cmd, path, rest = argv[0], argv[1], argv[2:]
    if cmd == "check":
        ignore = []
        while rest:
            if rest[0] != "--ignore" or len(rest) < 2:
                sys.exit("pylock: check LOCK [--ignore NAME ...]")
            ignore.append(rest[1])
            rest = rest[2:]
        return check(path, ignore)
    if cmd in ("extract", "version"):
        if not rest or (cmd == "version" and len(rest) != 1):
            sys.exit(f"pylock: {cmd} LOCK NAME{' ...' if cmd == 'extract' else ''}")
        locked = read_lock(path)
        for name in rest:
            entry = locked.get(canonical(name))
            if entry is None:
                sys.exit(f"pylock: {path} does not pin {name}")
            if cmd == "version":
                print(entry[0])
            else:
                print("\n".join(entry[1]).rstrip(" \\"))
        return 0
    if cmd == "python":
        print(lock_python(path))
        return 0
    sys.exit(f"pylock: unknown command '{cmd}' (check, extract, version or python)")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
