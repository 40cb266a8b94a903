# Sourced by scripts/serve and scripts/test: make ./.venv hold authz (and the extras asked for),
# installing only when the venv is missing or pyproject.toml changed since the last install.
# The hash of pyproject.toml is kept in .venv/.authz-install; with it, a start needs no network.

ensure_venv() {  # ensure_venv [EXTRA]   e.g. ensure_venv test
  local extra="${1:-}" python="${PYTHON:-python3}" stamp=.venv/.authz-install hash want
  hash="$(sha256sum pyproject.toml | cut -d' ' -f1)"
  want="$hash ${extra:-base}"
  if [ -x .venv/bin/python ] && [ -f "$stamp" ] && grep -qxF "$want" "$stamp"; then
    return 0
  fi
  echo "Installing authz${extra:+ with [$extra]} into .venv (pyproject.toml changed or no venv yet)..." >&2
  [ -x .venv/bin/python ] || "$python" -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  # setuptools reports every editable install as a warning; it is not one.
  PYTHONWARNINGS="ignore:Editable installation" \
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra:+[$extra]}"
  # A [test] install also holds everything `serve` needs.
  { echo "$hash base"; [ -z "$extra" ] || echo "$want"; } > "$stamp"
}
