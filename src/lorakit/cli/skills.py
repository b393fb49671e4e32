"""`lorakit skills [NAME] --output DIR`: list the example skills, or write one's train/held-out files."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from lorakit.data.skills import SKILLS, write_skill

    if args.name is None:
        for skill in SKILLS.values():
            print(f"{skill.name:16s} {skill.description}")
        return 0
    paths = write_skill(args.name, args.output, n_train=args.train_rows, n_heldout=args.heldout_rows, seed=args.seed)
    for kind, path in paths.items():
        print(f"{kind:14s} {path}")
    return 0


def register(commands) -> None:
    parser = commands.add_parser("skills", help="list the example skills or write one's data files")
    parser.add_argument("name", nargs="?", help="the skill to write (omit to list them)")
    parser.add_argument("--output", default="skills-data", help="folder to write into (default: skills-data)")
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--heldout-rows", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run)
