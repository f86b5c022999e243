#!/usr/bin/env bash
# The test suite, as the README gives it: everything except the long randomised runs.
# Run it inside the environment .ci/run (or the README) sets up. Skipped tests and expected
# failures are listed with their reasons at the end (-rsx); CI turns any skip into a failure
# (PIXFIND_NO_SKIPS=1, see tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m pytest -q -rsx -m "not slow" -p no:cacheprovider "$@"
