"""`lorakit generate` (try an adapter on a prompt) and `lorakit eval` (score it on held-out data)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lorakit.cli.leaderboard import add_store_flags

TRUST_PICKLE_HELP = ("load a base model whose weights are pickle files (*.bin, *.pt): unpickling runs any code the "
                     "file holds, so only for files you trust (default: safetensors only)")


def load_for_inference(model_id, adapter, quantize=None, quantize_backend="auto", quantize_embeddings=False,
                       trust_pickle=False, *, command="generate", force=False, shown=None):
    """(model, tokenizer) in fp32 with the adapter (a folder, hub id or Adapter) loaded and active (none: the
    bare base), named `shown` in messages (default: as given); with `quantize`, the base's linear layers in
    nf4 or int8 first, as `lorakit train --quantize` trains on.

    With no `model_id`, the base the adapter records (its hub id or folder; else the embedded model). The
    model is then compared with that record: another base is a warning line; a model that already holds
    the adapter merged is refused (it would apply twice) unless `force`.
    """
    from lorakit.io import Adapter
    from lorakit.models import load_model, load_tokenizer

    value = Adapter.read(adapter) if adapter and not isinstance(adapter, Adapter) else adapter
    shown = shown or str(adapter)
    if model_id is None and value is not None:
        model_id = recorded_base(value, shown=shown)
    tokenizer = load_tokenizer(model_id)
    model = load_model(model_id, trust_pickle=trust_pickle)
    if quantize:
        from lorakit.quant import quantize_model

        quantize_model(model, quantize, quantize_backend, embeddings=quantize_embeddings)
    if value is not None:
        attach_adapter(model, value, shown, command=command, force=force)
    return model, tokenizer


def attach_adapter(model, value, shown: str, *, command: str = "generate", force: bool = False) -> None:
    """Load the Adapter `value` into `model` and activate it, after comparing the model with the base it
    records (see `load_for_inference`)."""
    from lorakit.core.adapters import adapter_set
    from lorakit.errors import AdapterError
    from lorakit.io import load_adapter
    from lorakit.io.base_record import check_base

    load_adapter(model, value)
    try:
        match = check_base(model, adapter_set(model).active, value.base, shown, force=force)
    except AdapterError:
        if command == "merge":
            raise
        raise AdapterError(f"the model already contains the adapter {shown} (merged), so loading it again "
                           "would apply it twice: run the model without --adapter") from None
    if match.status == "merged":
        print(f"lorakit {command}: warning: the model already contains {shown} (merged); applying it a second "
              "time (--force)", file=sys.stderr)
    elif match.warning:
        print(f"lorakit {command}: warning: {match.warning}", file=sys.stderr)


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
    from lorakit.errors import ConfigError, DataError
    from lorakit.train.evaluate import greedy_generate

    routing = args.adapter == "auto"  # engine/routing.py's ROUTE_MODEL
    if args.candidate and not routing:
        raise ConfigError("--candidate names the adapters --adapter auto chooses from; with another --adapter, drop it")
    candidates = _candidates(args.candidate) if routing else {}
    prompt = args.prompt if args.prompt is not None else _read_prompt_from_stdin()
    if not prompt.strip():
        raise DataError("the prompt is empty; pass it as an argument or on standard input")
    model_id = args.model
    if routing and model_id is None:
        from lorakit.cli.serve import common_base

        model_id = common_base(candidates, command="generate")
    model, tokenizer = load_for_inference(model_id, None if routing else args.adapter, args.quantize,
                                          args.quantize_backend, args.quantize_embeddings, args.trust_pickle)
    if args.chat:
        ids = generation_prompt_ids(tokenizer, [{"role": "user", "content": prompt}],
                                    f"the tokenizer of {args.model or 'the embedded model'}", remedy="drop --chat")
    else:
        ids = tokenizer(prompt)["input_ids"]
    if routing:
        _route(model, ids, candidates, args.route_threshold)
    print(greedy_generate(model, tokenizer, [ids], args.max_new_tokens)[0])
    return 0


def _candidates(values: list[str]) -> dict[str, str]:
    """--candidate NAME=DIR ... as {name: folder}; at least one."""
    from lorakit.cli.serve import parse_adapter_flags
    from lorakit.errors import ConfigError

    if not values:
        raise ConfigError("--adapter auto chooses among the adapters given with --candidate NAME=DIR (repeatable); "
                          "give at least one")
    return dict(parse_adapter_flags(values, flag="--candidate"))


def _route(model, ids: list[int], candidates: dict[str, str], threshold: float) -> None:
    """Route the prompt among the candidates' routing signatures (engine/routing.py) and load the adapter it
    chooses into `model` (none: the base model answers); the decision goes to stderr."""
    from lorakit.engine.routing import Router, read_signature
    from lorakit.errors import AdapterFileError
    from lorakit.io import Adapter

    signed = []
    for name, folder in candidates.items():
        try:
            signature = read_signature(folder, model)
        except AdapterFileError as exc:
            print(f"lorakit generate: warning: --candidate {name}: {exc}; it is not a candidate", file=sys.stderr)
            continue
        if signature is None:
            print(f"lorakit generate: warning: --candidate {name}: {folder} has no routing signature (lorakit "
                  f"route-index {folder} --data FILE makes one); it is not a candidate", file=sys.stderr)
        else:
            signed.append((name, signature))
    route = Router(model).route_signed(ids, signed, threshold)
    if route.adapter is None:
        nearest = f" (nearest: {route.nearest}, score {route.score:.3f})" if route.nearest else ""
        print(f"lorakit generate: no candidate reaches the routing threshold {threshold:g}{nearest}: the base model "
              "answers", file=sys.stderr)
        return
    print(f"lorakit generate: routed to {route.adapter} (score {route.score:.3f})", file=sys.stderr)
    folder = candidates[route.adapter]
    attach_adapter(model, Adapter.read(folder), folder)


def _read_prompt_from_stdin() -> str:
    """Standard input, after a hint on stderr when it is a terminal (a piped prompt needs none)."""
    if sys.stdin.isatty():
        print("lorakit generate: reading the prompt from standard input; end it with Ctrl-D (or pass it as an "
              "argument)", file=sys.stderr, flush=True)
    return sys.stdin.read()


def run_eval(args: argparse.Namespace) -> int:
    from lorakit.cli.leaderboard import store_path
    from lorakit.data import read_rows
    from lorakit.io import Adapter
    from lorakit.serve.feedback import FeedbackStore
    from lorakit.serve.leaderboard import check_task, default_task
    from lorakit.train.evaluate import build_eval_set, evaluate

    # The task and the store are checked first: a result that cannot be kept must not cost an evaluation.
    task = check_task(args.task) if args.task is not None else default_task(args.data)
    store = None if args.no_record else FeedbackStore(store_path(args))
    adapter = Adapter.read(args.adapter) if args.adapter else None
    model_id = args.model if args.model or adapter is None else recorded_base(adapter, shown=args.adapter)
    model, tokenizer = load_for_inference(model_id, adapter, args.quantize, args.quantize_backend,
                                          args.quantize_embeddings, args.trust_pickle, command="eval",
                                          shown=args.adapter)
    eval_set = build_eval_set(read_rows(args.data), tokenizer, max_length=args.max_length, batch_size=16,
                              samples=args.samples)
    scores = evaluate(model, tokenizer, eval_set, precision="fp32", samples=args.samples,
                      progress=True, label=f"scoring {Path(args.data).name}")
    if store is not None:
        store.add_eval(_eval_run(args, task, adapter, model_id, scores, len(eval_set.plan.examples)))
        store.close()
        print(f"lorakit eval: recorded as task {task!r} in {store.path} (lorakit leaderboard --task {task})",
              file=sys.stderr)
    if args.json:
        print(json.dumps(scores, indent=2))
        return 0
    line = f"{args.data}: loss {scores['loss']:.4f}, perplexity {scores['perplexity']:.2f}"
    if "exact_match" in scores:
        line += f", exact match {100 * scores['exact_match']:.1f}% of {scores['exact_match_samples']}"
    print(line)
    return 0


def _eval_run(args: argparse.Namespace, task: str, adapter, model_id, scores: dict, examples: int):
    """The leaderboard's record of this eval: the adapter's version (its digest; the base model's without
    one), the base it ran on, each metric with the examples it was measured on, and the data's sha256."""
    import time

    from lorakit.engine.engine import served_name
    from lorakit.serve.feedback import EvalRun, base_version
    from lorakit.signing.card import file_sha256, tree_sha256

    base = served_name(model_id)
    quantized = (f" ({args.quantize}{' with embeddings' if args.quantize_embeddings else ''})"
                 if args.quantize else "")
    metrics = {"loss": (scores["loss"], examples), "perplexity": (scores["perplexity"], examples)}
    if "exact_match" in scores:
        metrics["exact_match"] = (scores["exact_match"], scores["exact_match_samples"])
    data = Path(args.data).expanduser().resolve()
    data_sha256 = tree_sha256(data) if data.is_dir() else file_sha256(data)
    return EvalRun(version=adapter.digest if adapter else base_version(base),
                   name=served_name(args.adapter) if adapter else base, task=task, base=base + quantized,
                   metrics=metrics, data=str(data), data_sha256=data_sha256, created=time.time())


def register(commands) -> None:
    generate = commands.add_parser("generate", help="generate from a prompt with an adapter (greedy)")
    generate.add_argument("prompt", nargs="?", help="the prompt (default: read standard input)")
    add_model_flags(generate)
    generate.add_argument("--adapter", help="adapter folder (default: none, the bare base model); auto: the --candidate "
                                            "whose routing signature the prompt fits (docs/routing.md)")
    generate.add_argument("--candidate", action="append", default=[], metavar="NAME=DIR",
                          help="with --adapter auto: an adapter folder it may choose (repeatable)")
    # 0.4: routing.DEFAULT_THRESHOLD, not imported here (it loads torch for every command's --help)
    generate.add_argument("--route-threshold", type=float, default=0.4, metavar="SCORE",
                          help="with --adapter auto: the score a candidate needs, else the base model answers "
                               "(default: 0.4)")
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
    score.add_argument("--task", metavar="NAME",
                       help="the task the leaderboard keeps the results under (default: the data file's stem, or "
                            "the folder of a file named for its split: reverse_words/heldout.jsonl is reverse_words)")
    score.add_argument("--no-record", action="store_true",
                       help="keep the results out of the leaderboard (by default they are kept with the adapter's "
                            "version in the feedback database)")
    add_store_flags(score)
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
