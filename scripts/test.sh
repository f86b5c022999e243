#!/usr/bin/env bash
# The test suite, as the README gives it: everything except the long randomised runs.
# Run it inside the environment .ci/run (or the README) sets up.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m pytest -q -m "not slow" -p no:cacheprovider "$@"
