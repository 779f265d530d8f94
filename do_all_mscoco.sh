#!/usr/bin/env bash
# Train NRCCR on MSCOCO images (English -> Japanese with STAIR val/test, or Chinese with COCO-CN val/test), then
# test the best checkpoint: the Multi-30K recipe with MSCOCO's collection and language.
# usage: ./do_all_mscoco.sh ROOTPATH GPU_ID [extra trainer.py flags]    (GPU_ID: 0 | 0,1 | cpu)
#   target language: --data_type google_enc2ja (default, as the original script) | google_enc2zh
ROOTPATH=${1:?usage: $0 ROOTPATH GPU_ID [trainer flags]}
GPU_ID=${2:?usage: $0 ROOTPATH GPU_ID [trainer flags]}
shift 2
COLLECTION=mscoco DATA_TYPE=${DATA_TYPE:-google_enc2ja} \
  exec "$(dirname "$0")/do_all_multi30k.sh" "$ROOTPATH" 1 "$GPU_ID" "$@"
