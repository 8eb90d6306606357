"""The ``minilora`` command line: ``minilora gradcheck`` (and further subcommands as they land)."""

import argparse
import sys


def _gradcheck(args):
    from minilora import selfcheck

    return 0 if selfcheck.run() else 1


def build_parser():
    parser = argparse.ArgumentParser(prog="minilora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("gradcheck", help="check every gradient of minilora's ops against finite "
                       "differences and print a table")
    p.set_defaults(func=_gradcheck)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
