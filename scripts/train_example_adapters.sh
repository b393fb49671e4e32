#!/usr/bin/env bash
# Train the example adapters shipped in examples/adapters/ (used by the README's `lorakit serve` line):
# three skills on the embedded model with `lorakit train`'s defaults, about 2 minutes each on 2 CPU cores.
# Only the adapter files (whose header records the embedded base by name), the model card and the training
# report are kept, and a routing signature of the skill's prompts in both formats (prompt/completion and
# chat), so that `model: "auto"` routes /v1/completions and /v1/chat/completions requests alike.
set -euo pipefail
cd "$(dirname "$0")/.."
LORAKIT=${LORAKIT:-.venv/bin/lorakit}
for spec in "reverse:reverse_words:--no-chat" "json:to_json:--chat" "count:count_words:--no-chat"; do
  IFS=: read -r name skill chat <<<"$spec"
  run=$(mktemp -d)
  "$LORAKIT" train --skill "$skill" "$chat" --output "$run/$name" --overwrite
  mkdir -p "examples/adapters/$name"
  cp "$run/$name/adapter_config.json" "$run/$name/adapter_model.safetensors" "$run/$name/train_report.json" \
     "$run/$name/README.md" "examples/adapters/$name/"
  # the report's and the card's paths were temporary
  sed -i "s#$run/$name#examples/adapters/$name#g" "examples/adapters/$name/train_report.json" \
      "examples/adapters/$name/README.md"
  "$LORAKIT" route-index "examples/adapters/$name" --data "examples/skills/$skill/train.jsonl" \
     --data "examples/skills/$skill/train.chat.jsonl"
  rm -rf "$run"
done
