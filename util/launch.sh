# Sourced by the do_all / do_test scripts. launch SCRIPT ARGS... runs SCRIPT on $GPU_ID:
#   cpu -> one CPU process; 0 -> one GPU (CUDA_VISIBLE_DEVICES=0); 0,1,2,3 -> torchrun, one process per GPU.
# The interpreter, chosen once when this file is sourced and named on stderr: $PYTHON if set; else the
# repository's ./.venv/bin/python when it exists (the one ./do_all_toy.sh and ./run_tests.sh set up), so a
# run after the quick start needs no `activate`; else python3. Nothing is installed here (see ensure_env.sh).
_mlcmr_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${PYTHON:-}" ]; then
  _mlcmr_python_from='$PYTHON'
elif [ -x "$_mlcmr_repo/.venv/bin/python" ]; then
  PYTHON="$_mlcmr_repo/.venv/bin/python"
  _mlcmr_python_from='the repository .venv'
else
  PYTHON=python3
  _mlcmr_python_from='no .venv in the repository, no $PYTHON'
fi
export PYTHON
if [ "${_mlcmr_python_said:-}" != "$PYTHON" ]; then
  echo "python: $PYTHON ($_mlcmr_python_from)" >&2
  _mlcmr_python_said=$PYTHON
fi

launch() {
  local script=$1; shift
  local py=$PYTHON
  if [ "$GPU_ID" = cpu ]; then
    "$py" "$script" --device cpu "$@"
  elif [[ "$GPU_ID" == *,* ]]; then
    local n; n=$(awk -F, '{print NF}' <<<"$GPU_ID")
    CUDA_VISIBLE_DEVICES=$GPU_ID "$py" -m torch.distributed.run --standalone --nproc_per_node="$n" "$script" --device cuda "$@"
  else
    CUDA_VISIBLE_DEVICES=$GPU_ID "$py" "$script" --device cuda "$@"
  fi
}
# Evaluation runs in one process: on the first GPU of a list.
launch_single() {
  local saved=$GPU_ID
  GPU_ID=${GPU_ID%%,*}
  launch "$@"
  GPU_ID=$saved
}
