"""The honest and planted torch candidates run on a GPU: does the oracle's verdict hold where
kernel authors run their code?

    python benchmarks/gpu_check.py [--device cuda] [--seeds 3]

When torch sees a GPU, each candidate runs on it through ``minilora.testing.torch`` at bf16,
fp16, fp32 and fp64 (tensors built on the device, results brought back as float64) and is
judged: the honest ones (torch autograd LoRA and DoRA, an MLP block) must pass, the planted
ones (a dropout mask applied as an indicator in dx, dB summed token by token in bf16) must
fail. Without a GPU it says so and exits 0, having run nothing.
"""

import argparse
import sys

import torch

from minilora import oracle
from minilora.testing._harness import lora_fn
from minilora.testing.torch import torch_outputs

# honest LoRA / DoRA (PEFT's formulation, detached norm) in torch autograd
autograd_lora = lora_fn(lambda V: torch.linalg.norm(V, dim=1), torch.Tensor.detach)


def autograd_mlp(x, W, A, B, *, scaling, bias=None, dropout_mask=None, activation="silu"):
    """Honest LoRA MLP block: down(silu(gate(x)) * up(x))."""
    mask = dropout_mask or [None] * 3
    e, u = (autograd_lora(x, W[j], A[j], B[j], scaling=scaling[j], dropout_mask=mask[j])
            for j in (0, 1))
    z = torch.nn.functional.silu(e) * u
    return autograd_lora(z, W[2], A[2], B[2], scaling=scaling[2], dropout_mask=mask[2])


class PlantedLoRA(torch.autograd.Function):
    """A hand-written LoRA backward with one of two real bugs: "indicator" (dx's LoRA term
    multiplied by mask > 0 instead of the mask) or "bf16 dB" (dB = s·dyᵀh summed token by token
    in bf16)."""

    @staticmethod
    def forward(ctx, x, W, A, B, mask, scaling, bug):
        x_d = x * mask  # (N, d_in)
        ctx.save_for_backward(x_d, W, A, B, mask)
        ctx.scaling, ctx.bug = scaling, bug
        return x @ W.T + scaling * (x_d @ A.T) @ B.T  # (N, d_out)

    @staticmethod
    def backward(ctx, dy):
        x_d, W, A, B, mask = ctx.saved_tensors
        s = ctx.scaling
        h, g = x_d @ A.T, dy @ B  # (N, r), (N, r)
        keep = (mask > 0).to(mask.dtype) if ctx.bug == "indicator" else mask
        dx = dy @ W + s * (g @ A) * keep  # (N, d_in)
        if ctx.bug == "bf16 dB":
            total = torch.zeros(B.shape, dtype=torch.bfloat16, device=dy.device)  # (d_out, r)
            for n in range(dy.shape[0]):
                total = total + torch.outer(dy[n], h[n]).to(torch.bfloat16)
            dB = (s * total.float()).to(dy.dtype)
        else:
            dB = s * dy.T @ h  # (d_out, r)
        return dx, None, s * g.T @ x_d, dB, None, None, None


def planted(bug):
    def fn(x, W, A, B, *, scaling, bias=None, dropout_mask=None, m=None):
        return PlantedLoRA.apply(x, W, A, B, dropout_mask, scaling, bug)

    return fn


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(f"no GPU found: nothing was run on {args.device} "
              f"(torch {torch.__version__}, torch.cuda.is_available() is False)")
        return 0
    rows, wrong = [], 0
    opts = dict(d_in=256, d_out=192, r=16, batch=256, dropout=0.1)  # x: (N, d_in)
    for dtype in ("bf16", "fp16", "fp32", "fp64"):
        for seed in range(args.seeds):
            single = oracle.make_case(**opts, dtype=dtype, seed=seed)
            dora = oracle.make_case(**opts, dora=True, dtype=dtype, seed=seed)
            mlp = oracle.make_case(**opts, block="mlp", dtype=dtype, seed=seed)
            runs = [("honest lora", autograd_lora, single, True),
                    ("honest dora", autograd_lora, dora, True),
                    ("honest mlp", autograd_mlp, mlp, True),
                    ("indicator dx", planted("indicator"), single, False)]
            if dtype == "fp32":  # a bf16 sum inside an fp32 kernel
                runs.append(("bf16 dB", planted("bf16 dB"), single, False))
            for name, fn, case, honest in runs:
                out = torch_outputs(fn, case, dtype, device=args.device)
                passed = oracle.compare(case, out, dtype=dtype).passed
                wrong += passed != honest
                rows.append((dtype, seed, name, "pass" if passed else "FAIL",
                             "ok" if passed == honest else "WRONG VERDICT"))
    print(f"device {torch.device(args.device)} ({torch.cuda.get_device_name(args.device)})"
          if torch.device(args.device).type == "cuda" else f"device {args.device}")
    for row in rows:
        print("  ".join(str(c).ljust(14) for c in row))
    print(f"{len(rows)} judgments, {wrong} wrong verdicts")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
