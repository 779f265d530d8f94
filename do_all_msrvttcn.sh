#!/usr/bin/env bash
# Train NRCCR on MSR-VTT-CN with the paper's settings (docs/training.md, 'Hyperparameters'), then test the best checkpoint:
# the VATEX recipe with MSR-VTT-CN's collection, feature and discriminator.
# usage: ./do_all_msrvttcn.sh ROOTPATH GPU_ID [extra trainer.py flags]    (GPU_ID: 0 | 0,1,2,3 | cpu)
COLLECTION=msrvttcn FEATURE=resnext101-resnet152 DISC_TYPE=not-so-weak MOMENTUM=0.0 \
  exec "$(dirname "$0")/do_all_vatex.sh" "$@"
