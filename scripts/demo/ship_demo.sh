# Sourced from the repository root by run_gpu.sh, run_recall.sh and run_answer_end.sh: their shared
# environment (the checkout on PYTHONPATH, unbuffered output, the student's window through SDPA unless
# AHN_RT_TRAIN_ATTENTION says otherwise: FlexAttention's compile would take a fifth to a third of these short
# runs; PY, the Python to run; DATA, the corpus folder) and ship_demo.
# ship_demo SRC DEST copies a model folder's four files (the merged demo model, or a teacher) from SRC to DEST,
# checks that they total at most 25 MB (what weights/demo/ may ship), and splits a model.safetensors over
# 15 MiB into model.safetensors.part0, .part1, ... (the GPU machine returns files of at most 16 MiB; join them
# with `cat model.safetensors.part* > model.safetensors`).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export AHN_RT_TRAIN_ATTENTION=${AHN_RT_TRAIN_ATTENTION:-sdpa}
PY=${PYTHON:-python3}
DATA=data/demo
ship_demo() {
  local src=$1 dest=$2 f size total
  mkdir -p "$dest"
  for f in model.safetensors config.json generation_config.json tokenizer.json; do
    cp "$src/$f" "$dest/$f"
  done
  size=$(stat -c %s "$dest/model.safetensors")
  total=$(cat "$dest/model.safetensors" "$dest/config.json" "$dest/generation_config.json" "$dest/tokenizer.json" | wc -c)
  echo "$(basename "$dest") model: $size bytes ($(awk "BEGIN{printf \"%.2f\", $size/1048576}") MiB); the four files $total bytes"
  if (( total > 25000000 )); then echo "ERROR: the demo files total $total bytes, over the 25 MB it may ship"; return 1; fi
  if (( size > 15 * 1048576 )); then
    split -b 15M -d -a 1 "$dest/model.safetensors" "$dest/model.safetensors.part"
    rm "$dest/model.safetensors"
    echo "model.safetensors split into $(ls "$dest"/model.safetensors.part* | wc -l) parts of 15 MiB at most"
  fi
}
