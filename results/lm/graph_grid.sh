#!/bin/bash
# HLG weights on DEV (first 300 utterances) through sherpa-onnx; usage: graph_grid.sh LMDIR "a1,b1 a2,b2 ..."
set -e
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=src
LM=$1
for ab in $2; do
  a=${ab%,*}; b=${ab#*,}; g=exp/lm/graphs/$(basename $LM)-a$a-b$b
  taskset -c 1 nice -n 5 /work/main/.venv/bin/python -m streamkd lm graph --lm $LM --lang /work/main/data/lang12 \
      --out $g --lm-alpha $a --lm-beta $b 2>&1 | grep -v "arpa_file_parser\|^\[I\]"
  taskset -c 1 nice -n 5 /work/main/.venv/bin/python -m streamkd lm runtimes --only "sherpa-onnx HLG" \
      --checkpoint /work/main/exp/benchmark/student_none/final.pt --onnx /work/main/exp/onnx-fp32 --lm $LM --graph $g \
      --manifest /work/main/data/corpus12/dev.jsonl --max-utts 300 --out $g/dev300.json | grep "sherpa-onnx HLG |"
  rm $g/HLG.fst
done
