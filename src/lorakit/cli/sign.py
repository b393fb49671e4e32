"""`lorakit sign DIR --key PRIVATE.pem` and `lorakit verify DIR --key PUBLIC.pem` (lorakit.signing)."""

from __future__ import annotations

import argparse
import json


def run_sign(args: argparse.Namespace) -> int:
    from lorakit.signing import CARD_NAME, sign_adapter

    signature = sign_adapter(args.folder, args.key, creator=args.creator, base_model=args.model,
                             sigstore=args.sigstore)
    print(f"signed {args.folder}: {signature} over every file, {CARD_NAME} included")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from lorakit.signing import verify_adapter

    result = verify_adapter(args.folder, args.key, base_model=args.model)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    card = result.card or {}
    who = f", by {card['creator']} on {card['date']}" if card.get("creator") and card.get("date") else ""
    base = card.get("base") or {}
    base_line = f"; base {base.get('model') or base.get('name')}" if base.get("model") or base.get("name") else ""
    checked = f" (checked against --model {args.model})" if args.model else ""
    print(f"verified {args.folder}: signed with {result.key}{who}; adapter {result.adapter_digest[:19]}"
          f"{base_line}{checked}" + ("" if result.card else "; no lorakit_card.json was signed"))
    return 0


def register(commands) -> None:
    sign = commands.add_parser("sign", help="sign an adapter folder (model.sig, OpenSSF model-signing format)")
    sign.add_argument("folder", help="adapter folder to sign; lorakit_card.json and model.sig are written into it")
    sign.add_argument("--key", help="ECDSA private key, PEM (P-256, P-384 or P-521)")
    sign.add_argument("--creator", help="who signs, recorded in the card (default: user@host)")
    sign.add_argument("--model", help="the base model folder (or 'embedded'): its weight files' sha256 go in the card")
    sign.add_argument("--sigstore", action="store_true",
                      help="sign keylessly with Sigstore (OIDC login, transparency log; needs the internet)")
    sign.set_defaults(run=run_sign)

    verify = commands.add_parser("verify", help="verify an adapter folder's model.sig; exit 0 verified, 2 otherwise")
    verify.add_argument("folder", help="signed adapter folder (holding model.sig)")
    verify.add_argument("--key", action="append", required=True,
                        help="ECDSA public key, PEM; repeat to accept any of several signers")
    verify.add_argument("--model", help="also check the adapter was signed for this base model folder (or 'embedded')")
    verify.add_argument("--json", action="store_true", help="print the verification (key, adapter digest, card) as JSON")
    verify.set_defaults(run=run_verify)
