#!/bin/sh
# Board installer: the edge-only environment (never torch), the systemd unit, the udev rule, the device root.
#   PREFIX=/ sh hw/install.sh            install on the board itself (as root)
#   PREFIX=/tmp/image sh hw/install.sh   lay out an image / scratch directory (tests)
# Knobs: NO_VENV=1 (files only), WHEELHOUSE=DIR (offline: install sottovoce[edge] only from these wheels),
#        VENV_ARGS, PIP_ARGS (extra arguments to `python3 -m venv` and `pip install`), PYTHON (default python3).
set -eu
PREFIX=${PREFIX:-/}
SRC=${SRC:-$(cd "$(dirname "$0")/.." && pwd)}
PYTHON=${PYTHON:-python3}
root() { printf '%s%s' "${PREFIX%/}" "$1"; }

install -d -m 0755 "$(root /opt/sottovoce)" "$(root /etc/systemd/system)" "$(root /etc/udev/rules.d)"
install -d -m 0750 "$(root /etc/sottovoce)" "$(root /var/lib/sottovoce)"
install -m 0644 "$SRC/hw/systemd/sottovoce-edge.service" "$(root /etc/systemd/system/sottovoce-edge.service)"
install -m 0644 "$SRC/hw/udev/90-sottovoce-gadget.rules" "$(root /etc/udev/rules.d/90-sottovoce-gadget.rules)"

ENVFILE=$(root /etc/sottovoce/edge.env)
if [ ! -f "$ENVFILE" ]; then
    cat > "$ENVFILE" <<'ENV'
# sottovoce edge daemon settings (read by sottovoce-edge.service)
SOTTOVOCE_SERIAL=/dev/sottovoce-gadget
SOTTOVOCE_TCP=0.0.0.0:7700
SOTTOVOCE_BOARD=rpi5
# e.g. --voice --trust /etc/sottovoce/release.pub
SOTTOVOCE_ARGS=--voice
ENV
fi
TOKEN=$(root /etc/sottovoce/token)
if [ ! -f "$TOKEN" ]; then
    (umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$TOKEN"; echo >> "$TOKEN")
    echo "device token written to $TOKEN (give it to \`sottovoce flash --token\`)"
fi
chmod 0600 "$TOKEN"

if [ -z "${NO_VENV:-}" ]; then
    VENV=$(root /opt/sottovoce/venv)
    # shellcheck disable=SC2086
    "$PYTHON" -m venv ${VENV_ARGS:-} "$VENV"
    if [ -n "${WHEELHOUSE:-}" ]; then
        # shellcheck disable=SC2086
        # an offline board: the host prepared the wheels (`pip wheel ".[edge]" -w WHEELHOUSE`)
        "$VENV/bin/pip" install --no-index --find-links "$WHEELHOUSE" ${PIP_ARGS:-} "sottovoce[edge]"
    else
        # shellcheck disable=SC2086
        "$VENV/bin/pip" install ${PIP_ARGS:-} "$SRC[edge]"
    fi
    if "$VENV/bin/python" -c "import torch" 2>/dev/null && [ -z "${VENV_ARGS:-}" ]; then
        echo "install.sh: torch ended up in the edge environment; refusing" >&2
        exit 1
    fi
fi

if [ "$PREFIX" = "/" ] && command -v systemctl >/dev/null 2>&1; then
    udevadm control --reload-rules 2>/dev/null || true
    systemctl daemon-reload
    systemctl enable --now sottovoce-edge.service
fi
echo "sottovoce edge installed under $PREFIX"
