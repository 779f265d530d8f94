#!/usr/bin/env bash
# The whole pipeline on the built-in toy collection, on a laptop CPU in minutes: set up ./.venv if needed,
# build the toy collection and tiny BERT if missing, train, test.
# usage: ./do_all_toy.sh [ROOTPATH] [GPU_ID] [extra trainer flags, e.g. --model mlcmr --train_mode unparallel]
set -euo pipefail
cd "$(dirname "$0")"
ROOTPATH=${1:-./VisualSearch}
GPU_ID=${2:-cpu}
shift $(( $# < 2 ? $# : 2 ))

COLLECTION=toy
FEATURE=toy_feature
BERT="$ROOTPATH/tiny_bert"

source util/ensure_env.sh
if [ ! -f "$ROOTPATH/$COLLECTION/TextData/${COLLECTION}test_zh.caption.txt" ] || [ ! -f "$BERT/config.json" ]; then
  "$PYTHON" util/make_toy_data.py --root "$ROOTPATH" --collection "$COLLECTION"
fi

source util/launch.sh
launch trainer.py --model nrccr --rootpath "$ROOTPATH" --collection "$COLLECTION" --visual_feature "$FEATURE" \
  --bert_name "$BERT" --layer_list layer.9 layer.10 layer.11 \
  --text_hidden_size 128 --video_hidden_size 128 --text_mapping_layers 0-256 --visual_mapping_layers 0-256 \
  --visual_rnn_size 64 --visual_kernel_num 64 \
  --disc_type not-so-weak --l1_gama 0.1 --back_w 0.5 --learning_rate 1e-3 --batch_size 64 \
  --num_epochs 12 --workers 0 --max_violation --text_norm --visual_norm "$@"
echo "results: $ROOTPATH/$COLLECTION/results/"
