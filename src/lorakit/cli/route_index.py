"""`lorakit route-index DIR --data FILE`: give an adapter folder a routing signature (engine/routing.py).

The signature summarises the data's prompts as the base model sees them; `lorakit serve` routes a request
whose model is "auto" to the adapter whose signature the prompt fits best (docs/routing.md). A signed
folder (DIR/model.sig) is refused unless --force: its signature covers every file of the folder, so a new
file breaks it until the folder is signed again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from lorakit.cli.generate import recorded_base
    from lorakit.data import read_rows
    from lorakit.engine.routing import ROUTING_FILE, compute_signature, signature_prompts
    from lorakit.errors import SignatureError
    from lorakit.io import Adapter
    from lorakit.models import EMBEDDED_NAME, load_model, load_tokenizer
    from lorakit.signing import SIGNATURE_NAME
    from lorakit.signing.card import record_routing

    folder = Path(args.folder)
    adapter = Adapter.read(folder, allow_hub=False)
    signed = (folder / SIGNATURE_NAME).is_file()
    if signed and not args.force:
        raise SignatureError(f"{folder} is signed ({SIGNATURE_NAME} covers every file of the folder), so writing "
                             f"{ROUTING_FILE} into it would break the signature. Pass --force to write it anyway, "
                             f"then sign the folder again (lorakit sign {folder} --key PRIVATE.pem)")
    model_id = args.model if args.model is not None else recorded_base(adapter, shown=str(folder))
    tokenizer, model = load_tokenizer(model_id), load_model(model_id, trust_pickle=args.trust_pickle)
    prompts = [p for data in args.data for p in signature_prompts(read_rows(data), tokenizer)]
    signature = compute_signature(model.eval(), prompts, args.layer, base=model_id or EMBEDDED_NAME)
    path = signature.save(folder)
    carded = record_routing(folder)
    print(f"{path}: {signature.prompts} prompts of {', '.join(args.data)} at layer {signature.layer}, "
          f"{signature.directions.shape[0]} directions, {path.stat().st_size:,} bytes"
          + ("; lorakit_card.json records it" if carded else ""))
    if signed:
        print(f"lorakit route-index: warning: {folder / SIGNATURE_NAME} no longer verifies; sign the folder again: "
              f"lorakit sign {folder} --key PRIVATE.pem", file=sys.stderr)
    return 0


def register(commands) -> None:
    from lorakit.cli.generate import TRUST_PICKLE_HELP

    parser = commands.add_parser("route-index", help="give an adapter a routing signature (for model \"auto\")",
                                 description="Compute a routing signature of the data's prompts on the base model "
                                             "and write it into the adapter folder (routing_signature.safetensors); "
                                             "`lorakit serve` routes requests for model \"auto\" by it.")
    parser.add_argument("folder", help="adapter folder")
    parser.add_argument("--data", required=True, action="append", metavar="FILE",
                        help="the adapter's training rows (.jsonl/.json/.csv/.parquet/datasets folder): their prompts "
                             "define its domain; repeatable (e.g. the same rows as prompt/completion and as chat, to "
                             "route both /v1/completions and /v1/chat/completions requests)")
    parser.add_argument("--model", help="the base model, hub id or folder (default: the base the adapter records, else "
                                        "the embedded model)")
    parser.add_argument("--layer", type=int, default=0,  # routing.DEFAULT_LAYER (not imported: it loads torch)
                        help="hidden state the signature is taken at: 0 the token embeddings (free at serving time), "
                             "L the output of layer L (a route then runs L layers of the base; default: 0)")
    parser.add_argument("--force", action="store_true",
                        help="write into a signed folder (its model.sig then no longer verifies: sign it again)")
    parser.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE_HELP)
    parser.set_defaults(run=run)
