# Sourced by the do_all / do_test scripts. launch SCRIPT ARGS... runs SCRIPT on $GPU_ID:
#   cpu -> one CPU process; 0 -> one GPU (CUDA_VISIBLE_DEVICES=0); 0,1,2,3 -> torchrun, one process per GPU.
# PYTHON (default python3) is the interpreter.
launch() {
  local script=$1; shift
  local py=${PYTHON:-python3}
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
