#!/usr/bin/env bash
# Installs the test dependencies (redis-server and chromium from Debian, the project with its
# test extra) and runs every test. This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# The browser tests drive Debian's chromium through Playwright; no browser is downloaded.
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The test fixtures start their own redis-server on free ports; the distribution's
# service is not needed.
# Debian's own Python marks itself externally managed (PEP 668); as root on a test machine
# installing into it is what is wanted. Other Pythons ignore the variable.
export PIP_BREAK_SYSTEM_PACKAGES=1
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
python3 -m ruff check .
python3 -m pytest -q "$@"
