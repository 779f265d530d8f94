#!/usr/bin/env bash
# Test an MLCMR checkpoint; the collection, feature, mode and target language come from the checkpoint.
# usage: ./do_test_mlcmr.sh ROOTPATH MODELDIR GPU_ID [tester flags, e.g. --target_language en]
set -euo pipefail
cd "$(dirname "$0")"
ROOTPATH=${1:?usage: $0 ROOTPATH MODELDIR GPU_ID [tester flags]}
MODELDIR=${2:?usage: $0 ROOTPATH MODELDIR GPU_ID [tester flags]}
GPU_ID=${3:?usage: $0 ROOTPATH MODELDIR GPU_ID [tester flags]}
shift 3

source util/launch.sh
launch_single tester.py --rootpath "$ROOTPATH" --logger_name "$MODELDIR" --overwrite 1 "$@"
