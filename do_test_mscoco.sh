#!/usr/bin/env bash
# Test an NRCCR image checkpoint on MSCOCO (the test set of the checkpoint's target language).
# usage: ./do_test_mscoco.sh ROOTPATH MODELDIR GPU_ID [extra tester.py flags]    (GPU_ID: 0 | cpu)
COLLECTION=mscoco exec "$(dirname "$0")/do_test_vatex.sh" "$@"
