#!/usr/bin/env bash
# Test an NRCCR checkpoint on VATEX: MODELDIR holds model_best.pth.tar (ours or an original release). The
# other do_test scripts run this recipe with their COLLECTION (empty: the one stored in the checkpoint).
# usage: ./do_test_vatex.sh ROOTPATH MODELDIR GPU_ID [extra tester.py flags]    (GPU_ID: 0 | cpu)
set -euo pipefail
cd "$(dirname "$0")"
ROOTPATH=${1:?usage: $0 ROOTPATH MODELDIR GPU_ID [tester flags]}
MODELDIR=${2:?usage: $0 ROOTPATH MODELDIR GPU_ID [tester flags]}
GPU_ID=${3:?usage: $0 ROOTPATH MODELDIR GPU_ID [tester flags]}
shift 3

COLLECTION=${COLLECTION-vatex}       # empty: the collection stored in the checkpoint

source util/launch.sh
launch_single tester.py --rootpath "$ROOTPATH" ${COLLECTION:+--collection "$COLLECTION"} \
  --logger_name "$MODELDIR" --overwrite 1 "$@"
