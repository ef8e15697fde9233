#!/usr/bin/env bash
# Prints what the tests run with: toolchains, the Debian packages of requirements/debian.txt
# (installed version against the tested one, '!' where they differ), the JDK, and whether
# .venv matches requirements/test.lock. scripts/test.sh prints it first. Changes nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
first() { "$@" 2>&1 | head -1; }
echo "== lumos test environment ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(uname -srm), $(nproc) cores)"
[ -r /etc/debian_version ] && echo "os:      $(. /etc/os-release 2>/dev/null; echo "${PRETTY_NAME:-?}") (debian_version $(cat /etc/debian_version))"
echo "rustc:   $(first rustc --version)"
echo "cargo:   $(first cargo --version)"
echo "nightly: $(first rustup run nightly rustc --version) (the fuzzing step)"
echo "gcc:     $(first gcc --version)"
echo "python3: $(first python3 --version) ($(command -v python3))"
echo "java:    $(first java -version) ($(readlink -f "$(command -v java)" 2>/dev/null))"
echo "javac:   $(first javac -version)"
if command -v dpkg-query >/dev/null 2>&1; then
    printf '%-2s %-26s %-28s %s\n' "" "debian package" "installed" "tested (requirements/debian.txt)"
    pkgs=()
    while read -r pkg tested _; do
        case "$pkg" in ''|'#'*) continue ;; esac
        pkgs+=("$pkg:$tested")
    done <requirements/debian.txt
    # the JDK: the package that provides javac, whichever it is
    jdk=$(dpkg -S "$(readlink -f "$(command -v javac)" 2>/dev/null)" 2>/dev/null | head -1 | cut -d: -f1)
    if [ -n "$jdk" ] && ! printf '%s\n' "${pkgs[@]}" | grep -q "^$jdk:"; then pkgs+=("$jdk:(another JDK)"); fi
    for entry in "${pkgs[@]}"; do
        pkg=${entry%%:*} tested=${entry#*:}
        have=$(dpkg-query -W -f='${Version}' "$pkg" 2>/dev/null) || have=""
        [ -n "$have" ] || have="(not installed)"
        mark=" "
        [ "$have" = "$tested" ] || mark="!"
        printf '%-2s %-26s %-28s %s\n' "$mark" "$pkg" "$have" "$tested"
    done
fi
if [ -x .venv/bin/python ]; then
    echo "venv:    $(.venv/bin/python --version 2>&1); $(.venv/bin/python scripts/pylock.py check requirements/test.lock 2>&1 | tail -1)"
fi
if [ -f .libtorch/torch/version.py ]; then
    echo "libtorch: $(sed -n "s/^__version__ = '\(.*\)'/\1/p" .libtorch/torch/version.py) in .libtorch"
fi
echo "=="
