#!/usr/bin/env bash
# Train NRCCR on Multi-30K images with the paper's image settings, then test the best checkpoint.
# usage: ./do_all_multi30k.sh ROOTPATH TASK GPU_ID [extra trainer.py flags]   (TASK: 1 | 2; GPU_ID: 0 | 0,1 | cpu)
#   target language: --data_type google_enc2de (default) | google_enc2fr | google_enc2cs
#   image encoder:   CLIP ViT-B/32 embeddings (default; extract them once with util/extract_image_features.py)
#                    or --img_encoder resnet_152 (the released pooled ResNet-152 features)
# do_all_mscoco.sh runs this recipe with MSCOCO's collection and language.
set -euo pipefail
cd "$(dirname "$0")"
ROOTPATH=${1:?usage: $0 ROOTPATH TASK GPU_ID [trainer flags]}
TASK=${2:?usage: $0 ROOTPATH TASK GPU_ID [trainer flags]}
GPU_ID=${3:?usage: $0 ROOTPATH TASK GPU_ID [trainer flags]}
shift 3

COLLECTION=${COLLECTION:-multi30k}
DATA_TYPE=${DATA_TYPE:-google_enc2de}
IMG_ENCODER=${IMG_ENCODER:-clip}
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do         # the image encoder picks the feature folder
  if [ "${args[i]}" = --img_encoder ] && [ $((i + 1)) -lt ${#args[@]} ]; then IMG_ENCODER=${args[i+1]}; fi
done
case "$IMG_ENCODER" in
  clip) FEATURE=${FEATURE:-clip_vit_b32} ;;
  resnet_152) FEATURE=${FEATURE:-resnet_152} ;;
  *) echo "$0: --img_encoder must be clip or resnet_152, got $IMG_ENCODER" >&2; exit 2 ;;
esac

source util/launch.sh
launch trainer.py --model nrccr --model_type img --rootpath "$ROOTPATH" --collection "$COLLECTION" --task "$TASK" \
  --img_encoder "$IMG_ENCODER" --visual_feature "$FEATURE" --data_type "$DATA_TYPE" \
  --learning_rate 1e-4 --text_hidden_size 768 --video_hidden_size 1024 \
  --text_num_attention 8 --visual_num_attention 8 --text_pooling mean --video_pooling mean \
  --video_layer 1 --text_layer 1 --frozen frozen \
  --layer_list layer.3 layer.4 layer.5 layer.6 layer.7 layer.8 layer.9 layer.10 layer.11 \
  --glr 1e-3 --scale 0.001 --disc_type not-so-weak --momentum 0.8 --optim adam \
  --tri_alpha 0.6 --dtl_beta 0.4 --l1_gama 0.1 --back_w 0.5 --batch_size 128 \
  --max_violation --text_norm --visual_norm --overwrite 0 "$@"
echo "results: $ROOTPATH/$COLLECTION/results/ (run folders under $ROOTPATH/$COLLECTION/MM_2022/$COLLECTION/)"
