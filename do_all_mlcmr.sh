#!/usr/bin/env bash
# Train MLCMR (docs/models.md, docs/training.md 'Hyperparameters'), then test the best checkpoint on TARGET_LANG.
# usage: ./do_all_mlcmr.sh COLLECTION FEATURE TRAIN_MODE LABEL_SITUATION TARGET_LANG ROOTPATH [GPU_ID] [flags]
#   e.g. ./do_all_mlcmr.sh vatex i3d_kinetics parallel translate zh ~/VisualSearch 0
#   TRAIN_MODE parallel|unparallel, LABEL_SITUATION human_label|translate, TARGET_LANG zh|en, GPU_ID 0|0,1|cpu
set -euo pipefail
cd "$(dirname "$0")"
usage="usage: $0 COLLECTION FEATURE TRAIN_MODE LABEL_SITUATION TARGET_LANG ROOTPATH [GPU_ID] [trainer flags]"
COLLECTION=${1:?$usage}
FEATURE=${2:?$usage}
TRAIN_MODE=${3:?$usage}
LABEL_SITUATION=${4:?$usage}
TARGET_LANG=${5:?$usage}
ROOTPATH=${6:?$usage}
GPU_ID=${7:-0}
shift $(( $# < 7 ? $# : 7 ))

# The reference validates MSR-VTT on its test captions (it has no val split); we do the same only when
# there is no <C>val.caption.txt, and say so.
VAL_SPLIT=val
if [ ! -f "$ROOTPATH/$COLLECTION/TextData/${COLLECTION}val.caption.txt" ]; then
  VAL_SPLIT=test
  echo "note: no ${COLLECTION}val.caption.txt: validating on the test captions, as the MLCMR reference did" >&2
fi

source util/launch.sh
launch trainer.py --model mlcmr --rootpath "$ROOTPATH" --collection "$COLLECTION" --visual_feature "$FEATURE" \
  --train_mode "$TRAIN_MODE" --label_situation "$LABEL_SITUATION" --target_language "$TARGET_LANG" \
  --val_split "$VAL_SPLIT" --max_violation --text_norm --visual_norm --overwrite 0 "$@"
echo "results: $ROOTPATH/$COLLECTION/results/ (run folders under $ROOTPATH/$COLLECTION/mlcmr/$COLLECTION/)"
