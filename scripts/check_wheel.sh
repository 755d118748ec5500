#!/usr/bin/env bash
# qmor as users install it: the wheel built from this checkout, installed into a fresh virtual environment, run from
# a folder outside the checkout. The built-in default run trains and `qmor app` starts and answers on loopback.
# Usage: bash scripts/check_wheel.sh (CI runs it; it needs the package registry for the wheel's dependencies).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'kill "${app:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT

python3 -m pip wheel -q --no-deps -w "$work/dist" "$root"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip
"$work/venv/bin/python" -m pip install -q torch==2.13.0  # the CPU build, as the README's install line takes it
"$work/venv/bin/python" -m pip install -q "$(ls "$work"/dist/qmor-*.whl)[app]"

cd "$work"  # nothing of the checkout is importable from here
"$work/venv/bin/qmor" train --output runs/default
test -f runs/default/adapter/adapter.safetensors

"$work/venv/bin/qmor" app --port 7999 --workspace ws > app.log 2>&1 &
app=$!
for _ in $(seq 120); do
    if "$work/venv/bin/python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7999/', timeout=2)" \
        2>/dev/null; then
        echo "wheel: the default run trained and the app answered, from outside the checkout"
        exit 0
    fi
    kill -0 "$app" 2>/dev/null || { cat app.log; echo "wheel: qmor app exited" >&2; exit 1; }
    sleep 1
done
cat app.log
echo "wheel: qmor app did not answer within 120 s" >&2
exit 1
