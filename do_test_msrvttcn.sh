#!/usr/bin/env bash
# Test an NRCCR checkpoint on MSR-VTT-CN: MODELDIR holds model_best.pth.tar (ours or an original release).
# usage: ./do_test_msrvttcn.sh ROOTPATH MODELDIR GPU_ID [extra tester.py flags]    (GPU_ID: 0 | cpu)
COLLECTION=msrvttcn exec "$(dirname "$0")/do_test_vatex.sh" "$@"
