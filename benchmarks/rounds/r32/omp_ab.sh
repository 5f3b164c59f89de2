#!/bin/bash
# CLI merge, pack and unpack with OpenMP's default wait policy (an invalid value: libgomp warns and keeps
# its default, spin then sleep) and PASSIVE (the command's default now), alternated
F=/tmp/r31/fam/family-h512-v8000-L7-s0-g1
cd /work/main
for r in 1 2 3 4 5; do
  for pol in DEFAULT PASSIVE; do
    for cmd in merge pack unpack; do
      case $cmd in
        merge) args="-q merge /tmp/r32/p4.tallpack -o /tmp/r32/o2 -f";;
        pack) args="-q pack --base $F/base.safetensors $F/task0.safetensors $F/task1.safetensors $F/task2.safetensors $F/task3.safetensors -o /tmp/r32/p4b.tallpack -f";;
        unpack) args="-q unpack /tmp/r32/p4.tallpack --task task1 -o /tmp/r32/o1 -f";;
      esac
      s=$(date +%s.%N)
      OMP_WAIT_POLICY=$pol python -m tallpack $args > /dev/null 2>&1
      e=$(date +%s.%N)
      echo "$r $pol $cmd $(echo "$e - $s" | bc)"
    done
  done
done
