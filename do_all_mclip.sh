#!/usr/bin/env bash
# Fine-tune the multilingual CLIP model (mclip; docs/models.md, 'Multilingual CLIP') on a collection, then test it.
# Started from a multilingual CLIP text model over CLIP features of its CLIP, the untrained model is the zero-shot
# one (tester.py --text_model); on other features (I3D, ResNet, the toy's) a learned projection maps the frames.
# usage: ./do_all_mclip.sh ROOTPATH COLLECTION FEATURE GPU_ID [extra trainer.py flags]    (GPU_ID: 0 | 0,1 | cpu)
#   e.g. ./do_all_mclip.sh ~/VisualSearch vatex clip_vit_b32 0 --c2kd_w 1
set -euo pipefail
cd "$(dirname "$0")"
usage="usage: $0 ROOTPATH COLLECTION FEATURE GPU_ID [trainer flags]"
ROOTPATH=${1:?$usage}
COLLECTION=${2:?$usage}
FEATURE=${3:?$usage}
GPU_ID=${4:?$usage}
shift 4

TEXT_MODEL=${TEXT_MODEL:-sentence-transformers/clip-ViT-B-32-multilingual-v1}   # aligned to openai/clip-vit-base-patch32
LEARNING_RATE=${LEARNING_RATE:-1e-5}   # fine-tuning a pretrained tower: small steps (not tuned here)
NUM_EPOCHS=${NUM_EPOCHS:-20}

source util/launch.sh
launch trainer.py --model mclip --rootpath "$ROOTPATH" --collection "$COLLECTION" --visual_feature "$FEATURE" \
  --bert_name "$TEXT_MODEL" --data_type google_enc2zh --learning_rate "$LEARNING_RATE" \
  --num_epochs "$NUM_EPOCHS" --overwrite 0 "$@"
echo "results: $ROOTPATH/$COLLECTION/results/ (run folders under $ROOTPATH/$COLLECTION/mclip/$COLLECTION/)"
