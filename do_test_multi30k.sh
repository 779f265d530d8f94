#!/usr/bin/env bash
# Test an NRCCR image checkpoint on Multi-30K (test 2016): MODELDIR holds model_best.pth.tar. The task, target
# language and image encoder are those stored in the checkpoint. Runs the shared test recipe of do_test_vatex.sh.
# usage: ./do_test_multi30k.sh ROOTPATH MODELDIR GPU_ID [extra tester.py flags]    (GPU_ID: 0 | cpu)
COLLECTION=${COLLECTION-multi30k} exec "$(dirname "$0")/do_test_vatex.sh" "$@"
