# Sourced by run_tests.sh and do_all_toy.sh: sets PYTHON to an interpreter with the requirements.
# Order: $PYTHON if set; ./.venv if present; the current python3 if it already has everything (e.g. your
# conda env with a CUDA build of torch); otherwise create ./.venv and install into it (first run only).
# MLCMR_USE_VENV=1 always uses ./.venv (CI does this, to start from a fresh Python).
# MLCMR_OPTIONAL=1 also installs requirements-optional.txt (PyAV, h5py, faiss-cpu; CI does this so their
# tests run instead of skipping).
# TORCH_SPEC overrides the torch requirement installed into a new venv (default torch==2.13.0).
# The do_all / do_test scripts then find the same interpreter without installing anything (util/launch.sh).
_mlcmr_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_mlcmr_check='import torch, transformers, tensorboard, tqdm, numpy, pytest'
if [ -n "${PYTHON:-}" ]; then
  _mlcmr_python_from='$PYTHON'
elif [ -x "$_mlcmr_repo/.venv/bin/python" ] && "$_mlcmr_repo/.venv/bin/python" -c "$_mlcmr_check" 2>/dev/null; then
  PYTHON="$_mlcmr_repo/.venv/bin/python"
  _mlcmr_python_from='the repository .venv'
elif [ "${MLCMR_USE_VENV:-0}" != 1 ] && python3 -c "$_mlcmr_check" 2>/dev/null; then
  PYTHON=python3
  _mlcmr_python_from='python3 has the requirements'
else
  echo "setting up $_mlcmr_repo/.venv (first run only) ..." >&2
  python3 -m venv "$_mlcmr_repo/.venv"
  "$_mlcmr_repo/.venv/bin/python" -m pip install -q --upgrade pip
  "$_mlcmr_repo/.venv/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  "$_mlcmr_repo/.venv/bin/python" -m pip install -q -r "$_mlcmr_repo/requirements.txt"
  PYTHON="$_mlcmr_repo/.venv/bin/python"
  _mlcmr_python_from='the repository .venv, just set up'
fi
if [ "${MLCMR_OPTIONAL:-0}" = 1 ]; then
  "$PYTHON" -m pip install -q -r "$_mlcmr_repo/requirements-optional.txt"
fi
export PYTHON
echo "python: $PYTHON ($_mlcmr_python_from)" >&2
_mlcmr_python_said=$PYTHON
