#!/usr/bin/env bash
# Train the example adapters shipped in examples/adapters/ (used by the README's `lorakit serve` line):
# three skills on the embedded model with `lorakit train`'s defaults, about 2 minutes each on 2 CPU cores.
# Only the adapter files and the training report are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
LORAKIT=${LORAKIT:-.venv/bin/lorakit}
for spec in "reverse:reverse_words:--no-chat" "json:to_json:--chat" "count:count_words:--no-chat"; do
  IFS=: read -r name skill chat <<<"$spec"
  run=$(mktemp -d)
  "$LORAKIT" train --skill "$skill" "$chat" --output "$run/out" --overwrite
  mkdir -p "examples/adapters/$name"
  cp "$run/out/adapter_config.json" "$run/out/adapter_model.safetensors" "$run/out/train_report.json" \
     "examples/adapters/$name/"
  # name the base model portably rather than by this machine's path; the report's paths were temporary
  sed -i "s#\"base_model_name_or_path\": \"[^\"]*\"#\"base_model_name_or_path\": \"lorakit-embedded\"#" \
      "examples/adapters/$name/adapter_config.json"
  sed -i "s#$run/out#examples/adapters/$name#g" "examples/adapters/$name/train_report.json"
  rm -rf "$run"
done
