#!/usr/bin/env bash
# The test command: install yolo-dysample with its `test` extras into the current Python environment, lint, run
# pytest, repeat the Ultralytics integration tests on the older tested ultralytics releases, and check that the
# environment is still consistent. Works from any directory; extra arguments go to pytest, e.g.
# `bash scripts/test.sh -m "not toolchains"` (no export toolchain downloads) or `-m "not slow"` (no yolo subprocesses).
#
# Into this environment it installs only yolo-dysample and its `test` extras (pytest, hypothesis, onnx, onnxruntime,
# onnxslim, ruff, cloudpickle). Everything else lives in temporary scratch environments that see this one and are
# deleted afterwards: the export toolchains (tests/test_export_formats.py) and each older ultralytics release (below).
#
# Environment: PYTHON (default python3); YOLO_DYSAMPLE_SKIP_INSTALL=1 skips the install; YOLO_DYSAMPLE_TEST_RELEASES=1
# forces the older-release runs, =0 skips them (default: run them when no pytest arguments are given).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
pip_install=(-m pip install --quiet --disable-pip-version-check --no-input)
step() { printf '\n== [%4ds] %s\n' "$SECONDS" "$*"; }

if [[ "${YOLO_DYSAMPLE_SKIP_INSTALL:-0}" != "1" ]]; then
    step "installing yolo-dysample[test] from $repo into $("$python" -c 'import sys; print(sys.prefix)')"
    "$python" "${pip_install[@]}" "$repo[test]"
fi

cd "$repo"
status=0
step "ruff check"
"$python" -m ruff check . || status=1
step "ruff format --check"
"$python" -m ruff format --check . || status=1

step "pytest $*"
"$python" -m pytest "$@" || status=1

# The other tested releases (ultralytics_adapter.TESTED_ULTRALYTICS_VERSIONS, without the installed one), each in a
# scratch venv that sees this environment (yolo-dysample as installed, its .pth hook, torch) with only ultralytics
# replaced. Left out there: tests marked newest_ultralytics_only and the wheel build (independent of ultralytics).
release_tests=()
for file in tests/test_ultralytics_integration.py tests/test_ultralytics_yamls.py tests/test_ultralytics_families.py; do
    [[ -f "$file" ]] && release_tests+=("$file")
done
if [[ "${YOLO_DYSAMPLE_TEST_RELEASES:-$([[ $# -eq 0 ]] && echo 1 || echo 0)}" == "1" ]]; then
    releases="$("$python" -c '
import importlib.metadata as metadata
from yolo_dysample.ultralytics_adapter import TESTED_ULTRALYTICS_VERSIONS as tested
print(" ".join(version for version in tested if version != metadata.version("ultralytics")))')"
    for release in $releases; do
        step "ultralytics $release in a scratch environment: ${release_tests[*]}"
        scratch="$(mktemp -d)"
        scratch_python="$("$python" -m yolo_dysample.tools.scratch_env "$scratch/venv" --no-deps "ultralytics==$release")"
        # The release's own requirements that this environment lacks (8.2 and 8.3 need pandas, scipy, seaborn and
        # py-cpuinfo), without their version pins: those releases cap numpy below 2, which the installed torch outgrew.
        missing="$("$scratch_python" -c '
import importlib.metadata as metadata, re
missing = []
for requirement in metadata.requires("ultralytics") or []:
    name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
    if ";" in requirement:
        continue
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        missing.append(name)
print(" ".join(missing))')"
        if [[ -n "$missing" ]]; then
            echo "   installing the release's missing requirements into the scratch environment: $missing"
            # shellcheck disable=SC2086  # one word per requirement
            "$scratch_python" "${pip_install[@]}" $missing || status=1
        fi
        "$scratch_python" -m pytest -p no:cacheprovider -m "not newest_ultralytics_only" -k "not wheel" \
            "${release_tests[@]}" || status=1
        rm -rf "$scratch"
    done
fi

step "the environment is consistent: pip check, import onnx, onnxruntime"
"$python" -m pip check || status=1
"$python" -c "import onnx, onnxruntime" || status=1

step "done in ${SECONDS}s, exit status $status"
exit "$status"
