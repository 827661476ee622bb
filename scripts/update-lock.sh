#!/usr/bin/env bash
# Regenerate requirements.lock from pyproject.toml: the newest versions the ranges allow, every extra included.
# Run it after changing a dependency range, then run .ci/run (tests on the lock) before committing the new lock.
# pip-tools runs in a throwaway venv so the project's environment is left as it is. torch is left out of the lock
# (install.sh installs it first, pinned by TORCH_VERSION, so CPU machines get the CPU wheel and GPU users keep theirs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
venv=$(mktemp -d)/lock-venv
"$PY" -m venv "$venv"
"$venv/bin/pip" install -q "pip-tools>=7.4,<8"
extras=$("$PY" -c 'import tomllib; print(" ".join("--extra " + e for e in tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]))')
# shellcheck disable=SC2086
"$venv/bin/pip-compile" --quiet --strip-extras $extras --unsafe-package torch --no-emit-index-url \
  --no-emit-find-links --no-emit-trusted-host --output-file requirements.lock pyproject.toml
rm -rf "$(dirname "$venv")"
echo "requirements.lock: $(grep -c '==' requirements.lock) pinned packages"
