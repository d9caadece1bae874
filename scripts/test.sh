#!/usr/bin/env bash
# Install yolo-dysample (with its `test` extras) into the current Python environment, then run pytest.
# Works from any directory. Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
# PYTHON picks the interpreter (default: python3); YOLO_DYSAMPLE_SKIP_INSTALL=1 skips the install step.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"

if [[ "${YOLO_DYSAMPLE_SKIP_INSTALL:-0}" != "1" ]]; then
    echo "== installing yolo-dysample[test] from $repo into $("$python" -c 'import sys; print(sys.prefix)')"
    "$python" -m pip install --quiet --disable-pip-version-check --no-input "$repo[test]"
fi

cd "$repo"
echo "== running tests"
exec "$python" -m pytest "$@"
