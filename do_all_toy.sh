#!/usr/bin/env bash
# The whole pipeline on a built-in toy collection, on a laptop CPU in minutes: set up ./.venv if needed,
# build the toy collection and tiny BERT if missing, train, test.
# usage: ./do_all_toy.sh [ROOTPATH] [GPU_ID] [extra trainer flags, e.g. --model mlcmr --train_mode unparallel]
#   the multilingual CLIP model: ./do_all_toy.sh ROOTPATH cpu --model mclip   (the tiny BERT as its text tower)
#   images: ./do_all_toy.sh ROOTPATH cpu --collection toyimg [--data_type google_enc2de|google_enc2fr|google_enc2cs]
set -euo pipefail
cd "$(dirname "$0")"
ROOTPATH=${1:-./VisualSearch}
GPU_ID=${2:-cpu}
shift $(( $# < 2 ? $# : 2 ))

COLLECTION=toy
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do         # the collection picks the features, the BERT and the recipe
  if [ "${args[i]}" = --collection ] && [ $((i + 1)) -lt ${#args[@]} ]; then COLLECTION=${args[i+1]}; fi
done
case "$COLLECTION" in
  toy)    FEATURE=toy_feature; BERT="$ROOTPATH/tiny_bert"; LAST="toytest_zh.caption.txt"
          EXTRA=() ;;
  toyimg) FEATURE=toy_clip; BERT="$ROOTPATH/tiny_bert_img"; LAST="toyimgtest_cs_2016.caption.txt"
          EXTRA=(--model_type img --img_encoder clip --data_type google_enc2de --task 1) ;;
  *) echo "$0: --collection must be toy or toyimg, got $COLLECTION" >&2; exit 2 ;;
esac

source util/ensure_env.sh
if [ ! -f "$ROOTPATH/$COLLECTION/TextData/$LAST" ] || [ ! -f "$BERT/config.json" ]; then
  "$PYTHON" util/make_toy_data.py --root "$ROOTPATH" --collection "$COLLECTION"
fi

source util/launch.sh
launch trainer.py --model nrccr --rootpath "$ROOTPATH" --collection "$COLLECTION" --visual_feature "$FEATURE" \
  --bert_name "$BERT" --layer_list layer.9 layer.10 layer.11 \
  --text_hidden_size 128 --video_hidden_size 128 --text_mapping_layers 0-256 --visual_mapping_layers 0-256 \
  --visual_rnn_size 64 --visual_kernel_num 64 \
  --disc_type not-so-weak --l1_gama 0.1 --back_w 0.5 --learning_rate 1e-3 --batch_size 64 \
  --num_epochs 12 --workers 0 --max_violation --text_norm --visual_norm ${EXTRA[@]+"${EXTRA[@]}"} "$@"
echo "results: $ROOTPATH/$COLLECTION/results/"
