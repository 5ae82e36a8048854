#!/usr/bin/env bash
# Peak memory of SmolLM2-135M capture, with and without a frontier budget (issue #3).
#
#   bash bench/capture_memory.sh TAG SAMPLES [extra quantize flags...]
#   e.g. bash bench/capture_memory.sh nobudget 128
#        bash bench/capture_memory.sh budget256 128 --max-memory 256MB
#
# Runs one CLI quantization (RTN W4: the capture is the same as for every algorithm, the rounding is cheap) over
# SAMPLES windows of 512 tokens under /usr/bin/time -v (ru_maxrss of the whole process), and samples VmRSS and the
# size of the spill folders every 2 s into $OUT_DIR/TAG.rss ("unix-time rss-kB anon-kB file-kB spill-kB").
# Needs `bash tools/setup.sh --bench` and GNU time (/usr/bin/time).
set -euo pipefail
cd "$(dirname "$0")/.."
tag=$1; n=$2; shift 2
OUT_DIR=${OUT_DIR:-/tmp/qronos-capture-memory}
mkdir -p "$OUT_DIR"
eval "$(.venv/bin/python tools/assets.py smollm2 | grep -E '^(onnx|tokenizer)=' | sed 's/^/model_/')"
eval "$(.venv/bin/python tools/assets.py wikileads | grep -E '^calib_txt=')"
echo "=== $tag start $(date +%T)"
/usr/bin/time -v -o "$OUT_DIR/$tag.time" .venv/bin/qronos-onnx quantize "$model_onnx" \
  --calib "$calib_txt" --tokenizer "$model_tokenizer" --samples "$n" --seq-len 512 --algo rtn --w4 \
  -o "$OUT_DIR/$tag.onnx" --overwrite "$@" > "$OUT_DIR/$tag.log" 2>&1 &
pid=$!
while kill -0 $pid 2>/dev/null; do
  child=$(pgrep -P $pid | head -1 || true); p=${child:-$pid}
  echo "$(date +%s) $(grep -E '^(VmRSS|RssAnon|RssFile)' /proc/$p/status 2>/dev/null | awk '{printf "%s ", $2}')" \
       "$(du -sk /tmp/qronos-frontier-* 2>/dev/null | awk '{s+=$1} END {print s+0}')" >> "$OUT_DIR/$tag.rss"
  sleep 2
done
wait $pid && rc=0 || rc=$?
echo "=== $tag rc=$rc end $(date +%T); peak RSS (kB): $(grep 'Maximum resident' "$OUT_DIR/$tag.time" | awk '{print $NF}')"
exit $rc
