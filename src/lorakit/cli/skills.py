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
    from lorakit.data.skills import SKILLS

    parser = commands.add_parser("skills", help="list the example skills or write one's data files")
    parser.add_argument("name", nargs="?", choices=tuple(SKILLS), metavar="NAME",
                        help="the skill to write, one of %(choices)s (omit to list them)")
    parser.add_argument("--output", default="skills-data", help="folder to write into (default: skills-data)")
    parser.add_argument("--train-rows", type=int, default=2000, help="training rows to write (default: 2000)")
    parser.add_argument("--heldout-rows", type=int, default=200,
                        help="held-out rows to write, none of whose prompts occur in training (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed the rows are drawn with (default: 0)")
    parser.set_defaults(run=run)
