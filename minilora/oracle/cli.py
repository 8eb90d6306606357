"""``minilora oracle ...``: make cases, compute references, judge candidates.

Exit codes of ``compare``: 0 every output judged and within tolerance, 1 a mismatch, 2 unusable
input (unreadable or truncated files, unknown or missing tensors, wrong shapes, a case whose
reference or honest result is not finite); the last with one line on stderr naming the problem,
no traceback (``minilora.tools.cli.main`` reports it).
"""

import argparse
import json
import os

from minilora.formats._io import refuse_overwrite, write_atomic
from minilora.ops.blocks import ACTIVATIONS
from minilora.oracle.block_cases import BLOCKS
from minilora.oracle.cases import make_case, reference
from minilora.oracle.files import load_case, load_outputs, save_case, save_outputs
from minilora.oracle.judge import compare
from minilora.oracle.precision import PRECISIONS, precision
from minilora.tools._argtypes import (
    finite_float,
    nonnegative_int,
    output_path,
    positive_int,
    probability,
)

# The standard suite written by ``oracle vectors``: every option on its own and together, x as
# (batch, seq, d_in) as most kernels take it (and once 2-D), each precision with bias and
# dropout, one realistic shape per precision, and the LoRA-only family (W = 0).
SEQ = dict(batch=2, seq=8)
REALISTIC = dict(d_in=512, d_out=384, r=16, batch=4, seq=512, bias=True, dropout=0.05)
VECTORS = {
    "lora_basic": dict(d_in=32, d_out=24, r=4, **SEQ),
    "lora_flat_x": dict(d_in=32, d_out=24, r=4, batch=6),
    "lora_rank1": dict(d_in=16, d_out=16, r=1, **SEQ),
    "lora_rank_above_dims": dict(d_in=6, d_out=5, r=8, **SEQ),
    "lora_rslora": dict(d_in=32, d_out=24, r=16, rslora=True, **SEQ),
    "lora_bias": dict(d_in=32, d_out=24, r=4, bias=True, **SEQ),
    "lora_dropout": dict(d_in=32, d_out=24, r=4, dropout=0.25, **SEQ),
    "lora_conv1d": dict(d_in=32, d_out=24, r=4, fan_in_fan_out=True, **SEQ),
    "lora_bias_dropout_rslora": dict(d_in=40, d_out=36, r=8, bias=True, dropout=0.1,
                                     rslora=True, **SEQ),
    "lora_everything": dict(d_in=40, d_out=36, r=8, bias=True, dropout=0.1,
                            fan_in_fan_out=True, rslora=True, **SEQ),
    "lora_only": dict(d_in=32, d_out=24, r=4, lora_only=True, **SEQ),
    "lora_only_dropout": dict(d_in=32, d_out=24, r=4, lora_only=True, dropout=0.2, **SEQ),
    "lora_bf16": dict(d_in=64, d_out=48, r=8, bias=True, dropout=0.1, dtype="bf16", **SEQ),
    "lora_fp16": dict(d_in=64, d_out=48, r=8, bias=True, dropout=0.1, dtype="fp16", **SEQ),
    "lora_fp32": dict(d_in=64, d_out=48, r=8, bias=True, dropout=0.1, dtype="fp32", **SEQ),
    "lora_fp64": dict(d_in=32, d_out=24, r=4, bias=True, dropout=0.1, dtype="fp64", **SEQ),
    "dora_basic": dict(d_in=32, d_out=24, r=4, dora=True, **SEQ),
    "dora_full_norm_gradient": dict(d_in=32, d_out=24, r=4, dora=True, detach_norm=False,
                                    **SEQ),
    "dora_dropout_bias": dict(d_in=32, d_out=24, r=4, dora=True, dropout=0.2, bias=True, **SEQ),
    "dora_conv1d": dict(d_in=32, d_out=24, r=4, dora=True, fan_in_fan_out=True, **SEQ),
    "dora_only": dict(d_in=32, d_out=24, r=4, dora=True, lora_only=True, **SEQ),
    "dora_bf16": dict(d_in=64, d_out=48, r=8, dora=True, bias=True, dropout=0.1, dtype="bf16",
                      **SEQ),
    **{f"realistic_{p}": dict(REALISTIC, dtype=p) for p in ("bf16", "fp16", "fp32", "fp64")},
    "block_qkv": dict(block="qkv", d_in=32, d_out=32, r=4, **SEQ),
    "block_qkv_bias_dropout_bf16": dict(block="qkv", d_in=64, d_out=64, r=8, bias=True,
                                        dropout=0.1, dtype="bf16", **SEQ),
    **{f"block_mlp_{a}": dict(block="mlp", activation=a, d_in=32, d_out=32, hidden=48, r=4,
                              **SEQ) for a in ("silu", "gelu", "gelu_tanh")},
    "block_mlp_bias_dropout_bf16": dict(block="mlp", d_in=64, d_out=64, hidden=96, r=8,
                                        bias=True, dropout=0.1, dtype="bf16", **SEQ),
    "block_multi": dict(block="multi", d_in=32, d_out=24, r=4, adapters=4, **SEQ),
    "block_multi_bias_dropout_bf16": dict(block="multi", d_in=64, d_out=48, r=8, adapters=3,
                                          bias=True, dropout=0.1, dtype="bf16", **SEQ),
}


def add_parser(sub):
    oracle = sub.add_parser("oracle", help="gradient oracle: cases, references, comparisons")
    osub = oracle.add_subparsers(dest="oracle_command", required=True)

    p = osub.add_parser("case", help="write a test case (inputs and a cotangent)")
    for name in ("--d-in", "--d-out", "--r"):
        p.add_argument(name, type=positive_int, required=True)
    p.add_argument("--batch", type=nonnegative_int, default=2)
    p.add_argument("--seq", type=nonnegative_int, default=8,
                   help="x is (batch, seq, d_in), as most kernels take it (default 8)")
    p.add_argument("--flat", action="store_true", help="x is (batch, d_in): no sequence axis")
    p.add_argument("--lora-only", action="store_true",
                   help="W = 0: only the LoRA branch, so every error is the adapter's")
    p.add_argument("--alpha", type=finite_float)
    p.add_argument("--rslora", action="store_true")
    p.add_argument("--dora", action="store_true")
    p.add_argument("--full-norm-gradient", action="store_true",
                   help="DoRA: gradient through the norm (detach_norm=False)")
    p.add_argument("--dropout", type=probability, default=0.0)
    p.add_argument("--bias", action="store_true")
    p.add_argument("--fan-in-fan-out", action="store_true")
    p.add_argument("--dtype", default="fp32", type=_precision_name, metavar="|".join(PRECISIONS))
    p.add_argument("--block", choices=BLOCKS,
                   help="a fused block instead of one layer: qkv (three projections of x), "
                   "mlp (gate, up, down), multi (several adapters, one per token)")
    p.add_argument("--hidden", type=positive_int, help="mlp: the hidden size (default 2·d_in)")
    p.add_argument("--base", choices=["nf4"], help="a QLoRA base: W in bitsandbytes' NF4; the "
                   "case holds its exact float64 dequantization")
    p.add_argument("--blocksize", type=positive_int, default=64,
                   help="nf4: values per absmax block (32, 64, ..., 4096)")
    p.add_argument("--double-quant", action="store_true",
                   help="nf4: quantize the absmax too (8-bit, blocks of 256)")
    p.add_argument("--activation", choices=ACTIVATIONS, default="silu", help="mlp's")
    p.add_argument("--adapters", type=positive_int, default=3, help="multi: how many")
    p.add_argument("--seed", type=nonnegative_int, required=True)
    p.add_argument("-o", "--output", required=True, type=_output_file,
                   help="CASE.npz or CASE.safetensors")
    p.set_defaults(func=_case)

    p = osub.add_parser("reference", help="write the float64 outputs and gradients of a case")
    p.add_argument("case")
    p.add_argument("-o", "--output", required=True, type=_output_file,
                   help="REF.npz or REF.safetensors")
    p.set_defaults(func=_reference)

    p = osub.add_parser("compare", help="judge a candidate's outputs against the reference")
    p.add_argument("case")
    p.add_argument("candidate")
    p.add_argument("--dtype", type=_precision_name, metavar="|".join(PRECISIONS),
                   help="the precision the candidate computes in (default: the case's)")
    p.add_argument("--accum-dtype", type=_precision_name, metavar="|".join(PRECISIONS),
                   help="the precision it accumulates in (default fp32; fp64 for fp64)")
    p.add_argument("--only", metavar="NAMES",
                   help="judge only these outputs, comma-separated (y,dx): by default every "
                   "output the case defines must be in the candidate")
    p.add_argument("--json", metavar="REPORT", type=output_path,
                   help="also write the report as JSON")
    p.set_defaults(func=_compare)

    p = osub.add_parser("vectors", help="write the standard suite of cases with references")
    p.add_argument("--out", required=True, help="folder to write into (created if needed)")
    p.add_argument("--format", choices=["npz", "safetensors"], default="npz")
    p.set_defaults(func=_vectors)


def _precision_name(text):
    """argparse type: a precision name or alias (float32 -> fp32), else a usage error."""
    try:
        return precision(text).name
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _output_file(text):
    """argparse type: a writable .npz or .safetensors path."""
    if not text.endswith((".npz", ".safetensors")):
        raise argparse.ArgumentTypeError(f"{text}: the file name must end in .npz or "
                                         f".safetensors")
    return output_path(text)


def _case(args):
    case = make_case(d_in=args.d_in, d_out=args.d_out, r=args.r, batch=args.batch,
                     seq=None if args.flat else args.seq, alpha=args.alpha, rslora=args.rslora,
                     dora=args.dora, dropout=args.dropout, bias=args.bias,
                     fan_in_fan_out=args.fan_in_fan_out, detach_norm=not args.full_norm_gradient,
                     dtype=args.dtype, lora_only=args.lora_only, block=args.block,
                     hidden=args.hidden, activation=args.activation, adapters=args.adapters,
                     seed=args.seed, base=args.base, blocksize=args.blocksize,
                     double_quant=args.double_quant)
    save_case(args.output, case)
    print(f"wrote {args.output}: {', '.join(f'{k}{v.shape}' for k, v in case.tensors.items())}")
    return 0


def _reference(args):
    refuse_overwrite(args.output, [args.case])
    ref = reference(load_case(args.case))
    save_outputs(args.output, ref, {"dtype": "fp64"}, inputs=[args.case])
    print(f"wrote {args.output}: {', '.join(f'{k}{v.shape}' for k, v in ref.items())}")
    return 0


def _compare(args):
    if args.json:
        refuse_overwrite(args.json, [args.case, args.candidate])
    case = load_case(args.case)
    report = compare(case, load_outputs(args.candidate, case), dtype=args.dtype,
                     accum_dtype=args.accum_dtype, outputs=args.only)
    print(report)
    if args.json:
        write_atomic(args.json, report.to_json().encode())
    return 0 if report.passed else 1


def _vectors(args):
    os.makedirs(args.out, exist_ok=True)
    index = {}
    for seed, (name, kwargs) in enumerate(VECTORS.items()):
        case = make_case(seed=seed, **kwargs)
        case_file, ref_file = f"{name}.case.{args.format}", f"{name}.reference.{args.format}"
        save_case(os.path.join(args.out, case_file), case)
        save_outputs(os.path.join(args.out, ref_file), reference(case), {"dtype": "fp64"})
        index[name] = {"case": case_file, "reference": ref_file, "dtype": case.input_precision,
                       "options": {k: v for k, v in kwargs.items() if k != "dtype"}}
    write_atomic(os.path.join(args.out, "index.json"), json.dumps(index, indent=2).encode())
    print(f"wrote {len(index)} cases with references and index.json to {args.out}")
    return 0
