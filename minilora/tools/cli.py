"""The ``minilora`` command line: demo, gradcheck, bench, oracle.

Every argument is checked before any work starts; a bad one, an unusable file or a failure to
write ends the command with exit code 2 and one line on stderr, never a traceback.
"""

import argparse
import sys

from minilora.oracle import cli as oracle_cli
from minilora.toolkit.memory import retain_freed_memory
from minilora.tools import bench, demo, selfcheck
from minilora.tools._argtypes import nonnegative_int, output_path, positive_int


class CommandError(Exception):
    """A problem the user can fix, reported as one line and exit code 2."""


# -- the commands -----------------------------------------------------------------------------

def _gradcheck(args):
    return 0 if selfcheck.run() else 1


def _bench(args):
    if args.plot and not args.sweep:
        raise CommandError("--plot draws a sweep: give --sweep r, N or d")
    if args.plot:
        _need_matplotlib()
    if sum(map(bool, (args.blocks, args.sweep, args.model))) > 1:
        raise CommandError("--blocks, --model and --sweep are separate runs: give one")
    if args.model:
        if args.no_torch:
            raise CommandError("--model measures against transformers + PEFT: it needs torch")
        try:
            import peft  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            raise CommandError("--model needs torch, transformers and peft: "
                               "pip install 'minilora[parity]'") from None
        from minilora.tools import bench_model

        bench_model.model_run(quick=args.quick, json_path=args.json)
        return 0
    if args.blocks:
        bench.blocks_run(quick=args.quick, with_torch=not args.no_torch, json_path=args.json)
        return 0
    if args.sweep:
        rows = bench.sweep(args.sweep, quick=args.quick, with_torch=not args.no_torch,
                           json_path=args.json)
        if args.plot:
            bench.plot_sweep(args.sweep, rows, args.plot)
            print(f"wrote {args.plot}")
        return 0
    bench.run(quick=args.quick, with_torch=not args.no_torch, json_path=args.json)
    return 0


def _need_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CommandError("--plot needs matplotlib: pip install 'minilora[examples]'") from None


def _demo(args):
    if args.plot:
        _need_matplotlib()
    retain_freed_memory()  # each training step reuses the last one's memory, unfaulted
    if args.model:
        from minilora.tools import demo_model

        demo_model.run(quick=args.quick, json_path=args.json, plot_path=args.plot)
        return 0
    if args.quick:
        raise CommandError("--quick shortens the language-model demo: give it with --model")
    return demo.main(args)


def build_parser():
    parser = argparse.ArgumentParser(prog="minilora", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="pretrain an MLP, then adapt it to a shifted task by full "
                       "fine-tuning and by LoRA, and compare")
    p.add_argument("--epochs", type=positive_int, default=20)
    p.add_argument("--r", type=positive_int, default=8, help="LoRA rank (alpha = 2r)")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--plot", metavar="PATH", type=output_path,
                   help="write loss and accuracy curves (matplotlib)")
    p.add_argument("--json", metavar="PATH", type=output_path, help="write the summary as JSON")
    p.add_argument("--model", action="store_true",
                   help="the language-model demo instead: pretrain a tiny LLaMA on Python code, "
                   "adapt it to English prose by full fine-tuning and by LoRA at a few ranks")
    p.add_argument("--quick", action="store_true",
                   help="with --model: a tiny model and a few steps (shows it runs)")
    p.set_defaults(func=_demo)
    p = sub.add_parser("gradcheck", help="check every gradient of minilora's ops against finite "
                       "differences and print a table")
    p.set_defaults(func=_gradcheck)
    p = sub.add_parser("bench", help="speed and memory ratios against the two-GEMM floor, the "
                       "numpy backend and (when installed) PyTorch + PEFT")
    p.add_argument("--quick", action="store_true", help="two small cases, few repeats")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch + PEFT")
    p.add_argument("--json", metavar="PATH", type=output_path,
                   help="also write the figures as JSON")
    p.add_argument("--sweep", choices=sorted(bench.SWEEPS),
                   help="vary one size around N=4096, 1024->1024, r=16 and print each ratio "
                   "against the floor and against the ideal")
    p.add_argument("--plot", metavar="PATH", type=output_path,
                   help="with --sweep: draw the ratios (matplotlib)")
    p.add_argument("--blocks", action="store_true",
                   help="the fused blocks (MLP, QKV, many adapters) against their floors")
    p.add_argument("--model", action="store_true",
                   help="a LoRA training step of a 32M-parameter LLaMA against transformers + "
                   "PEFT and the model's floor")
    p.set_defaults(func=_bench)
    oracle_cli.add_parser(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    user_errors = (CommandError, OSError, MemoryError)
    if args.command == "oracle":  # its inputs are files: what is wrong in them is a ValueError
        user_errors += (ValueError, TypeError)
    try:
        return args.func(args)
    except user_errors as e:
        what = f"{args.command} {args.oracle_command}" if args.command == "oracle" \
            else args.command
        message = str(e) or type(e).__name__
        if isinstance(e, MemoryError):
            message = "out of memory (make the problem smaller)"
        print(f"minilora {what}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minilora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
