"""`lorakit generate` (try an adapter on a prompt) and `lorakit eval` (score it on held-out data)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TRUST_PICKLE_HELP = ("load a base model whose weights are pickle files (*.bin, *.pt): unpickling runs any code the "
                     "file holds, so only for files you trust (default: safetensors only)")


def load_for_inference(model_id, adapter, quantize=None, quantize_backend="auto", quantize_embeddings=False,
                       trust_pickle=False, *, command="generate", force=False):
    """(model, tokenizer) in fp32 with the adapter (a folder, hub id or Adapter) loaded and active (none: the
    bare base); with `quantize`, the base's linear layers in nf4 or int8 first, as `lorakit train
    --quantize` trains on.

    With no `model_id`, the base the adapter records (its hub id or folder; else the embedded model). The
    model is then compared with that record: another base is a warning line; a model that already holds
    the adapter merged is refused (it would apply twice) unless `force`.
    """
    from lorakit.core.adapters import adapter_set
    from lorakit.errors import AdapterError
    from lorakit.io import Adapter, load_adapter
    from lorakit.io.base_record import check_base
    from lorakit.models import load_model, load_tokenizer

    value = Adapter.read(adapter) if adapter and not isinstance(adapter, Adapter) else adapter
    if model_id is None and value is not None:
        model_id = recorded_base(value, shown=str(adapter))
    tokenizer = load_tokenizer(model_id)
    model = load_model(model_id, trust_pickle=trust_pickle)
    if quantize:
        from lorakit.quant import quantize_model

        quantize_model(model, quantize, quantize_backend, embeddings=quantize_embeddings)
    if value is None:
        return model, tokenizer
    load_adapter(model, value)
    try:
        match = check_base(model, adapter_set(model).active, value.base, str(adapter), force=force)
    except AdapterError:
        if command == "merge":
            raise
        raise AdapterError(f"the model already contains the adapter {adapter} (merged), so loading it again "
                           "would apply it twice: run the model without --adapter") from None
    if match.status == "merged":
        print(f"lorakit {command}: warning: the model already contains {adapter} (merged); applying it a second "
              "time (--force)", file=sys.stderr)
    elif match.warning:
        print(f"lorakit {command}: warning: {match.warning}", file=sys.stderr)
    return model, tokenizer


def recorded_base(adapter, shown: str):
    """The model to load for `adapter` when --model is not given: its recorded hub id or folder, else None
    (the embedded model). A recorded folder that is no longer there is an error saying to pass --model."""
    from lorakit.errors import ModelError

    record = adapter.base
    if record is None or record.source not in ("hub", "local") or not record.name:
        return None
    if record.source == "local" and not Path(record.name).expanduser().is_dir():
        raise ModelError(f"{shown} was trained on the model folder {record.name}, which is not there (moved?): pass "
                         "--model with the base's folder or hub id; its weights are checked against the record")
    return record.name


def run_generate(args: argparse.Namespace) -> int:
    from lorakit.data.chat import generation_prompt_ids
    from lorakit.errors import DataError
    from lorakit.train.evaluate import greedy_generate

    prompt = args.prompt if args.prompt is not None else _read_prompt_from_stdin()
    if not prompt.strip():
        raise DataError("the prompt is empty; pass it as an argument or on standard input")
    model, tokenizer = load_for_inference(args.model, args.adapter, args.quantize, args.quantize_backend,
                                          args.quantize_embeddings, args.trust_pickle)
    if args.chat:
        ids = generation_prompt_ids(tokenizer, [{"role": "user", "content": prompt}],
                                    f"the tokenizer of {args.model or 'the embedded model'}", remedy="drop --chat")
    else:
        ids = tokenizer(prompt)["input_ids"]
    print(greedy_generate(model, tokenizer, [ids], args.max_new_tokens)[0])
    return 0


def _read_prompt_from_stdin() -> str:
    """Standard input, after a hint on stderr when it is a terminal (a piped prompt needs none)."""
    if sys.stdin.isatty():
        print("lorakit generate: reading the prompt from standard input; end it with Ctrl-D (or pass it as an "
              "argument)", file=sys.stderr, flush=True)
    return sys.stdin.read()


def run_eval(args: argparse.Namespace) -> int:
    from lorakit.data import read_rows
    from lorakit.train.evaluate import build_eval_set, evaluate

    model, tokenizer = load_for_inference(args.model, args.adapter, args.quantize, args.quantize_backend,
                                          args.quantize_embeddings, args.trust_pickle, command="eval")
    eval_set = build_eval_set(read_rows(args.data), tokenizer, max_length=args.max_length, batch_size=16,
                              samples=args.samples)
    scores = evaluate(model, tokenizer, eval_set, precision="fp32", samples=args.samples,
                      progress=True, label=f"scoring {Path(args.data).name}")
    if args.json:
        print(json.dumps(scores, indent=2))
        return 0
    line = f"{args.data}: loss {scores['loss']:.4f}, perplexity {scores['perplexity']:.2f}"
    if "exact_match" in scores:
        line += f", exact match {100 * scores['exact_match']:.1f}% of {scores['exact_match_samples']}"
    print(line)
    return 0


def register(commands) -> None:
    generate = commands.add_parser("generate", help="generate from a prompt with an adapter (greedy)")
    generate.add_argument("prompt", nargs="?", help="the prompt (default: read standard input)")
    add_model_flags(generate)
    generate.add_argument("--adapter", help="adapter folder (default: none, the bare base model)")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.add_argument("--max-new-tokens", type=int, default=64,
                          help="the most tokens to generate; it stops earlier at end-of-sequence (default: 64)")
    add_quantize_flags(generate)
    generate.set_defaults(run=run_generate)

    score = commands.add_parser("eval", help="score an adapter: loss, perplexity, exact match")
    add_model_flags(score)
    score.add_argument("--adapter", help="adapter folder (default: none, the bare base model)")
    score.add_argument("--data", required=True, help="held-out rows (.jsonl/.json/.csv/.parquet/datasets folder)")
    score.add_argument("--samples", type=int, default=200, help="rows scored by generation (default: 200)")
    score.add_argument("--max-length", type=int, default=256,
                       help="tokens per held-out row; longer ones are cut (default: 256)")
    score.add_argument("--json", action="store_true", help="print the scores as JSON")
    add_quantize_flags(score)
    score.set_defaults(run=run_eval)


def add_model_flags(parser) -> None:
    """--model / --trust-pickle, shared by generate, eval, merge and serve (train's come from TrainConfig)."""
    parser.add_argument("--model", help="hub id or local folder (default: the base the adapter records, else the "
                                        "embedded model)")
    parser.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE_HELP)


def add_quantize_flags(parser) -> None:
    """--quantize / --quantize-backend, shared by generate, eval, merge and serve."""
    parser.add_argument("--quantize", choices=["nf4", "int8"],
                        help="run on the base with its linear layers in nf4 or int8 (as trained with --quantize)")
    parser.add_argument("--quantize-backend", default="auto", choices=["auto", "torch", "bitsandbytes"],
                        help="auto: bitsandbytes where it runs, else torch (both give the same weights)")
    parser.add_argument("--quantize-embeddings", action="store_true",
                        help="with --quantize: the embedding table and output head too (as trained with it)")
