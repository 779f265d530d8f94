#!/usr/bin/env bash
# Test an MLCMR checkpoint; collection, feature, mode and target language come from the checkpoint.
# usage: ./do_test_mlcmr.sh ROOTPATH MODELDIR GPU_ID [tester flags, e.g. --target_language en]
COLLECTION='' exec "$(dirname "$0")/do_test_vatex.sh" "$@"
