#!/usr/bin/env bash
# Train NRCCR on VATEX with the paper's settings (docs/training.md, 'Hyperparameters'), then test the best checkpoint.
# usage: ./do_all_vatex.sh ROOTPATH GPU_ID [extra trainer.py flags]    (GPU_ID: 0 | 0,1,2,3 | cpu)
# do_all_msrvttcn.sh runs this recipe with the MSR-VTT-CN values of the four variables below.
set -euo pipefail
cd "$(dirname "$0")"
ROOTPATH=${1:?usage: $0 ROOTPATH GPU_ID [trainer flags]}
GPU_ID=${2:?usage: $0 ROOTPATH GPU_ID [trainer flags]}
shift 2

COLLECTION=${COLLECTION:-vatex}
FEATURE=${FEATURE:-i3d_kinetics}
DISC_TYPE=${DISC_TYPE:-strong}
MOMENTUM=${MOMENTUM:-0.8}            # no effect (Adam), kept as in the original script

source util/launch.sh
launch trainer.py --model nrccr --rootpath "$ROOTPATH" --collection "$COLLECTION" --visual_feature "$FEATURE" \
  --data_type google_enc2zh --learning_rate 1e-4 --text_hidden_size 768 --video_hidden_size 1024 \
  --text_num_attention 8 --visual_num_attention 8 --text_pooling mean --video_pooling mean \
  --video_layer 1 --text_layer 1 --frozen frozen \
  --layer_list layer.5 layer.6 layer.7 layer.8 layer.9 layer.10 layer.11 \
  --glr 1e-3 --scale 0.001 --disc_type "$DISC_TYPE" --momentum "$MOMENTUM" --optim adam \
  --tri_alpha 0.6 --dtl_beta 0.4 --l1_gama 0.1 --back_w 0.5 --model_type video \
  --max_violation --text_norm --visual_norm --overwrite 0 "$@"
echo "results: $ROOTPATH/$COLLECTION/results/ (run folders under $ROOTPATH/$COLLECTION/MM_2022/$COLLECTION/)"
