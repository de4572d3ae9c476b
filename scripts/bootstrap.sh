#!/usr/bin/env bash
# Shared set-up for scripts/demo and scripts/test: a local virtual environment
# in .venv with svcrules installed (editable) and, with --dev, the test tools.
# Sourced, not run: it exports VENV and PY.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SVCRULES_VENV:-$ROOT/.venv}"

need_apt=()
python_ok() {
    command -v python3 >/dev/null 2>&1 &&
        python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}
python_ok || need_apt+=(python3 python3-venv)
if [[ "${1:-}" == "--dev" ]]; then
    # Kernel tests need these; CI runs as root on a fresh Debian/Ubuntu.
    command -v nft >/dev/null 2>&1 || need_apt+=(nftables)
    command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
    command -v conntrack >/dev/null 2>&1 || need_apt+=(conntrack)
    # The iptables backend is tested on both variants; Debian's iptables package has both.
    command -v iptables-nft-restore >/dev/null 2>&1 &&
        command -v iptables-legacy-restore >/dev/null 2>&1 || need_apt+=(iptables)
fi
[[ -e /usr/lib/x86_64-linux-gnu/libnftables.so.1 || -e /usr/lib/aarch64-linux-gnu/libnftables.so.1 ]] ||
    ldconfig -p 2>/dev/null | grep -q libnftables.so.1 || need_apt+=(libnftables1)
if ((${#need_apt[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "svcrules: installing OS packages: ${need_apt[*]}" >&2
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >&2
    else
        echo "svcrules: missing OS packages: ${need_apt[*]} (install them, or run as root)" >&2
        python_ok || exit 1
    fi
fi

extra=""
[[ "${1:-}" == "--dev" ]] && extra="[dev]"
stamp="$VENV/.svcrules-installed$extra"
want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV" >&2
fi
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT$extra" >&2
    echo "$want" >"$stamp"
fi
export VENV
PY="$VENV/bin/python"
export PY
