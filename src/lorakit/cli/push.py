"""`lorakit push DIR OWNER/NAME`: upload an adapter folder to the Hugging Face hub (io.push)."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from lorakit.io.push import push_adapter

    url = push_adapter(args.folder, args.repo_id, private=args.private, token=args.token, revision=args.revision,
                       commit_message=args.commit_message)
    print(f"pushed {args.folder} -> {url}" + (f" (branch {args.revision})" if args.revision else ""))
    return 0


def register(commands) -> None:
    parser = commands.add_parser("push", help="upload an adapter folder to the Hugging Face hub")
    parser.add_argument("folder", help="adapter folder (a lorakit train output or any PEFT LoRA folder)")
    parser.add_argument("repo_id", help="hub repository OWNER/NAME (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--token", help="hub token with write access (default: HF_TOKEN, else the saved login)")
    parser.add_argument("--revision", help="branch to upload to, created if missing (default: main)")
    parser.add_argument("--commit-message", help="the commit's message")
    parser.set_defaults(run=run)
