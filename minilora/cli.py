"""The ``minilora`` command line: gradcheck, bench, oracle (and demo)."""

import argparse
import sys


def _gradcheck(args):
    from minilora import selfcheck

    return 0 if selfcheck.run() else 1


def _bench(args):
    from minilora import bench

    bench.run(quick=args.quick, with_torch=not args.no_torch, json_path=args.json)
    return 0


def _demo(args):
    from minilora import demo

    return demo.main(args)


def build_parser():
    parser = argparse.ArgumentParser(prog="minilora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="pretrain an MLP, then adapt it to a shifted task by full "
                       "fine-tuning and by LoRA, and compare")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--r", type=int, default=8, help="LoRA rank (alpha = 2r)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", metavar="PATH", help="write loss and accuracy curves (matplotlib)")
    p.add_argument("--json", metavar="PATH", help="write the summary as JSON")
    p.set_defaults(func=_demo)
    p = sub.add_parser("gradcheck", help="check every gradient of minilora's ops against finite "
                       "differences and print a table")
    p.set_defaults(func=_gradcheck)
    p = sub.add_parser("bench", help="speed and memory ratios against the two-GEMM floor, the "
                       "numpy backend and (when installed) PyTorch + PEFT")
    p.add_argument("--quick", action="store_true", help="two small cases, few repeats")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch + PEFT")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    p.set_defaults(func=_bench)
    from minilora.oracle import cli as oracle_cli

    oracle_cli.add_parser(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "oracle":
        from minilora.oracle import cli as oracle_cli

        return oracle_cli.run(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
