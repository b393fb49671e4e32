"""`lorakit registry add|list|show|remove|export|check`: store adapters as immutable, digest-addressed versions.

    lorakit registry add runs/reverse [--name reverse]
    lorakit registry list [--json]
    lorakit registry show reverse[@1a2b3c4d] [--json]
    lorakit registry remove reverse@1a2b3c4d          (or: remove reverse --all)
    lorakit registry export reverse ./reverse-copy
    lorakit registry check                           exit status 1 when a version is damaged

The registry is the folder `--registry PATH` (default: $LORAKIT_REGISTRY, else the user's data directory).
How it works and what it guarantees: docs/registry.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REFERENCE_HELP = "NAME (its latest version) or NAME@VERSION (8 or more hex digits of the version's digest)"


def _registry(args: argparse.Namespace):
    from lorakit.registry import Registry

    return Registry.open(args.registry)


def _verify(folder, keys: list[str]):
    """The signature checked against the trusted keys (lorakit.signing), or SignatureError (one line)."""
    from lorakit.signing import verify_adapter

    return verify_adapter(folder, keys)


def run_add(args: argparse.Namespace) -> int:
    if args.trusted_key:  # nothing is stored unless one of the keys signed exactly these files
        verified = _verify(args.folder, args.trusted_key)
        print(f"{args.folder}: signature verified with {Path(verified.key).name}")
    added = _registry(args).add(args.folder, args.name)
    said = {"added": "added", "alias": "added as another name of the stored version",
            "unchanged": "already in the registry under this name; nothing changed"}[added.outcome]
    print(f"{added.entry.reference}: {said}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    registry = _registry(args)
    entries = registry.entries()
    if args.json:
        print(json.dumps([e.to_json() for e in entries], indent=2))
        return 0
    if not entries:
        print(f"the registry at {registry.storage.location} is empty; add an adapter with "
              "`lorakit registry add DIR`")
        return 0
    width = max(len(e.name) for e in entries)
    print(f"{'NAME':<{width}}  VERSION       ADDED                      SIGNED  VETTED")
    for e in entries:
        print(f"{e.name:<{width}}  {e.short_digest}  {e.added_at:<25}  {'yes' if e.signed else 'no':<6}  {e.vetted}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    registry = _registry(args)
    entry = registry.resolve(args.reference)
    problems = registry.damage(entry.digest)
    folder = registry.storage.folder(entry.digest)
    card = _card_summary(folder) if not problems else {}
    info = {**entry.to_json(), "reference": entry.reference, "damaged": problems, "card": card,
            "aliases": [e.name for e in registry.entries() if e.digest == entry.digest and e.name != entry.name]}
    signature = "model.sig present (check it with --trusted-key)" if entry.signed else "unsigned"
    failed = False
    if args.trusted_key and entry.signed and not problems:
        from lorakit.errors import SignatureError

        try:
            signature = f"verified with {Path(_verify(folder, args.trusted_key).key).name}"
        except SignatureError as exc:
            signature, failed = f"NOT VERIFIED: {exc}", True
    info["signature"] = signature
    if args.json:
        print(json.dumps(info, indent=2))
        return 1 if problems or failed else 0
    print(f"{entry.reference}: {entry.digest}")
    print(f"  added {entry.added_at}; base model: {entry.base or 'not recorded'}")
    if info["aliases"]:
        print(f"  also named: {', '.join(info['aliases'])}")
    print(f"  signature: {signature}")
    print(f"  vetting: {entry.vetted}")
    if card.get("title"):
        print(f"  model card: {card['title']}")
    for key, value in (card.get("lorakit_card") or {}).items():
        print(f"  card {key}: {value}")
    print("  files:")
    for name, sha in entry.files.items():
        print(f"    {name}  sha256:{sha[:12]}")
    if problems:
        print(f"  DAMAGED: {'; '.join(problems)}")
    return 1 if problems or failed else 0


def _card_summary(folder: Path) -> dict:
    """The model card's title (its first heading) and the scalar fields of lorakit_card.json, if present."""
    summary: dict = {"title": None, "lorakit_card": None}
    readme = folder / "README.md"
    if readme.is_file():
        heading = next((line for line in readme.read_text(encoding="utf-8", errors="replace").splitlines()
                        if line.startswith("# ")), None)
        summary["title"] = heading[2:].strip() if heading else None
    card = folder / "lorakit_card.json"
    if card.is_file():
        try:
            data = json.loads(card.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            data = None
        if isinstance(data, dict):
            summary["lorakit_card"] = {k: v for k, v in data.items() if isinstance(v, (str, int, float, bool))}
    return summary


def run_remove(args: argparse.Namespace) -> int:
    for entry in _registry(args).remove(args.reference, all_versions=args.all):
        print(f"removed {entry.reference}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    dest = _registry(args).export(args.reference, args.dest)
    print(f"{args.reference}: written to {dest}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    registry = _registry(args)
    damaged = registry.check()
    for damage in damaged:
        print(f"damaged: {damage}")
    versions = len({e.digest for e in registry.entries()})
    print(f"{versions} versions checked in {registry.storage.location}: "
          + (f"{len(damaged)} damaged" if damaged else "all intact"))
    return 1 if damaged else 0


def register(commands) -> None:
    parser = commands.add_parser("registry", help="store, list, check and export adapter versions",
                                 description="Store adapters as immutable versions addressed by their content "
                                 "digest, under names (docs/registry.md). ACTION is one of: add DIR [--name NAME], "
                                 "list [--json], show REF [--json], remove REF [--all], export REF DEST, check; each "
                                 "takes --registry PATH, and `lorakit registry ACTION --help` lists its flags. REF is "
                                 "NAME (its latest version) or NAME@VERSION (8 or more hex digits of its digest).")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION",
                                    help="what to do; `lorakit registry ACTION --help` lists its flags")

    def action(name: str, summary: str, run) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=summary, description=summary[:1].upper() + summary[1:] + ".")
        sub.add_argument("--registry", metavar="PATH", default=None,
                         help="the registry folder (default: $LORAKIT_REGISTRY, else "
                         "$XDG_DATA_HOME/lorakit/registry, else ~/.local/share/lorakit/registry)")
        sub.set_defaults(run=run)
        return sub

    add = action("add", "check an adapter folder and store it as a version", run_add)
    add.add_argument("folder", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    add.add_argument("--name", default=None, help="the name to store it under (default: the folder's name)")
    add.add_argument("--trusted-key", action="append", default=[], metavar="PUBLIC.pem",
                     help="store it only if its model.sig verifies with this key (repeatable: any one of them)")
    listing = action("list", "list every name and version", run_list)
    listing.add_argument("--json", action="store_true", help="print the entries as JSON")
    show = action("show", "show a version: card, signature, vetting and files", run_show)
    show.add_argument("reference", help=REFERENCE_HELP)
    show.add_argument("--json", action="store_true", help="print the same as JSON")
    show.add_argument("--trusted-key", action="append", default=[], metavar="PUBLIC.pem",
                      help="verify the stored signature with this key (repeatable); exit 1 when it fails")
    remove = action("remove", "remove a version (its files go when no name is left on them)", run_remove)
    remove.add_argument("reference", help=REFERENCE_HELP)
    remove.add_argument("--all", action="store_true", help="remove every version of the name")
    export = action("export", "write a version as a plain adapter folder", run_export)
    export.add_argument("reference", help=REFERENCE_HELP)
    export.add_argument("dest", help="the folder to write (must not exist, or be empty)")
    action("check", "re-hash every stored file and list damaged versions", run_check)
