# Sourced by scripts/*.sh: makes sure a virtual environment with deeplab2_kmax and its test
# dependencies exists and is active.
#
# Uses the active virtual environment if there is one, else $DEEPLAB2_KMAX_VENV, else .venv in
# the repository. Re-installs only when pyproject.toml changed since the last install.

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${VIRTUAL_ENV:-}" ] && [ -z "${DEEPLAB2_KMAX_VENV:-}" ]; then
  venv="$VIRTUAL_ENV"
else
  venv="${DEEPLAB2_KMAX_VENV:-$repo_root/.venv}"
fi
python_bin="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "Creating virtual environment $venv" >&2
  "$python_bin" -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
stamp="$venv/.deeplab2_kmax-install-stamp"
wanted="$(cat "$repo_root/pyproject.toml" | cksum) $repo_root"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
  echo "Installing deeplab2_kmax and its dependencies into $venv (a few minutes the first time)" >&2
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet -e "$repo_root[test]"
  python -m pip check
  echo "$wanted" > "$stamp"
fi
cd "$repo_root"
