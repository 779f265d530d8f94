#!/usr/bin/env bash
# Test an mclip checkpoint; collection, feature and caption files come from the checkpoint.
# usage: ./do_test_mclip.sh ROOTPATH MODELDIR GPU_ID [tester flags]
# With no training, the same test of a multilingual CLIP text model: python tester.py --text_model NAME ...
COLLECTION='' exec "$(dirname "$0")/do_test_vatex.sh" "$@"
