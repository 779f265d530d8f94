#!/usr/bin/env bash
# Run the test suite (sets up ./.venv on first use; see util/ensure_env.sh). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source util/ensure_env.sh
exec "$PYTHON" -m pytest -q tests "$@"
