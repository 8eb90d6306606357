"""``minilora demo``: LoRA's claim on real training, on a CPU, in seconds.

1. Pretrain an MLP (64 -> 512 -> 512 -> 10) to read handwritten digits.
2. Shift the task: the same digits rotated by 90 degrees. The pretrained model fails on them.
3. Adapt three ways and compare on the rotated test set:
   frozen (the pretrained model as it is), full fine-tuning (every weight trains), and LoRA
   (rank-8 adapters on every linear layer; the pretrained weights stay frozen).

Why rank 8: a 90-degree rotation permutes the 64 input pixels, a full-rank change of the first
layer's input. Measured over five seeds (0-4), rank 4 ends 0.4-2.6 points behind full
fine-tuning and rank 8 0.4-1.7: rank 8 stays within two points on every seed, while LoRA still
trains only 5.6% of the parameters.

Data: scikit-learn's bundled 8x8 digits (1,797 images, shipped inside the package, no download)
when scikit-learn is installed (``pip install minilora[examples]``); otherwise a generated
stand-in (noisy strokes of ten fixed 8x8 glyphs), and the demo says which it used.
Every gradient comes from minilora's hand-derived backward passes.
"""

import json
import time

import numpy as np

from minilora.formats._io import write_atomic
from minilora.toolkit.layer import LoRALinear
from minilora.toolkit.losses import accuracy, softmax_cross_entropy, softmax_cross_entropy_backward
from minilora.toolkit.modules import Linear, ReLU, Sequential, summary
from minilora.toolkit.optim import AdamW, clip_grad_norm

HIDDEN = 512


def load_digits(seed=0):
    """(X (n, 64) in [0, 1], labels (n,), source name)."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        return _generated_digits(seed) + ("generated glyphs (scikit-learn not installed)",)
    data = sk_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int64), \
        "scikit-learn's handwritten digits"


def _generated_digits(seed, n=1800):
    """Ten random 8x8 glyphs; each sample is one, shifted by a pixel and noised."""
    rng = np.random.default_rng(seed)
    glyphs = (rng.random((10, 8, 8)) < 0.35).astype(np.float32)
    labels = rng.integers(0, 10, n)
    images = glyphs[labels]
    shifts = rng.integers(-1, 2, (n, 2))
    images = np.stack([np.roll(img, tuple(s), axis=(0, 1))
                       for img, s in zip(images, shifts, strict=True)])
    images = np.clip(images + 0.3 * rng.standard_normal(images.shape), 0, 1)
    return images.reshape(n, 64).astype(np.float32), labels


def rotate(X):
    """Each 8x8 image rotated by 90 degrees: the shifted task."""
    return np.rot90(X.reshape(-1, 8, 8), axes=(1, 2)).reshape(-1, 64).copy()


def split(X, y, seed=0, test_fraction=0.3):
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return X[train], y[train], X[test], y[test]


def mlp(seed):
    return Sequential(Linear(64, HIDDEN, seed=seed), ReLU(), Linear(HIDDEN, HIDDEN, seed=seed + 1),
                      ReLU(), Linear(HIDDEN, 10, seed=seed + 2))


def lora_mlp(pretrained, r, alpha, seed):
    """The pretrained MLP with every Linear replaced by a LoRALinear over its frozen weights."""
    modules = []
    for i, m in enumerate(pretrained.modules):
        if isinstance(m, Linear):
            out_features, in_features = m.W.shape
            modules.append(LoRALinear(in_features, out_features, r=r, alpha=alpha, weight=m.W,
                                      bias=m.b is not None, bias_value=m.b, seed=seed + i))
        else:
            modules.append(type(m)())
    return Sequential(*modules)


def full_copy(pretrained):
    return Sequential(*[Linear(m.W.shape[1], m.W.shape[0], weight=m.W, bias=m.b is not None,
                               bias_value=m.b)
                        if isinstance(m, Linear) else type(m)() for m in pretrained.modules])


def evaluate(model, X, y):
    model.eval()
    acc = accuracy(model(X), y)
    model.train()
    return acc


def train(model, X, y, *, epochs, lr, batch=64, seed=0, label="", X_test=None, y_test=None,
          out=print, lora_plus_ratio=1.0):
    """Minibatch AdamW on softmax cross-entropy; returns per-epoch (loss, test accuracy)."""
    opt = AdamW(model, lr=lr, weight_decay=0.0, lora_plus_ratio=lora_plus_ratio)
    rng = np.random.default_rng(seed)
    history = []
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(y))
        losses = []
        for start in range(0, len(y), batch):
            idx = order[start:start + batch]
            model.zero_grad()
            loss, cache = softmax_cross_entropy(model(X[idx]), y[idx])
            model.backward(softmax_cross_entropy_backward(cache).astype(X.dtype))
            clip_grad_norm(model, 5.0)
            opt.step()
            losses.append(loss)
        acc = evaluate(model, X_test, y_test) if X_test is not None else float("nan")
        history.append((float(np.mean(losses)), acc))
        out(f"  {label} epoch {epoch:2d}/{epochs}: loss {np.mean(losses):.4f}, "
            f"test accuracy {100 * acc:5.1f}%")
    return history


def run(*, epochs=20, r=8, alpha=16, seed=0, out=print):
    """Run the demo; returns the summary dict (also what ``--json`` writes)."""
    X, y, source = load_digits(seed)
    out(f"data: {source}, {len(y)} images of 8x8 pixels, 10 classes")
    Xtr, ytr, Xte, yte = split(X, y, seed)
    Rtr, Rte = rotate(Xtr), rotate(Xte)

    out(f"1. pretraining a 64-{HIDDEN}-{HIDDEN}-10 MLP on upright digits")
    base = mlp(seed)
    t0 = time.perf_counter()
    train(base, Xtr, ytr, epochs=epochs, lr=2e-3, seed=seed, label="pretrain", X_test=Xte,
          y_test=yte, out=out)
    out(f"   upright test accuracy {100 * evaluate(base, Xte, yte):.1f}% "
        f"({time.perf_counter() - t0:.1f} s)")

    out("2. the shifted task: the same digits rotated by 90 degrees")
    results = {"data": source, "frozen": {"trainable_params": 0,
                                          "accuracy": evaluate(base, Rte, yte),
                                          "train_seconds": 0.0}}
    out(f"   frozen pretrained model on rotated digits: "
        f"{100 * results['frozen']['accuracy']:.1f}%")

    histories = {}
    for name, model, lr in (("full", full_copy(base), 2e-3),
                            ("lora", lora_mlp(base, r, alpha, seed), 5e-3)):
        out(f"3. adapting by {'full fine-tuning' if name == 'full' else f'LoRA (r={r})'}: "
            f"{summary(model)}")
        t0 = time.perf_counter()
        histories[name] = train(model, Rtr, ytr, epochs=epochs, lr=lr, seed=seed + 1,
                                label=name, X_test=Rte, y_test=yte, out=out)
        results[name] = {"trainable_params": model.num_parameters()[0],
                         "accuracy": evaluate(model, Rte, yte),
                         "train_seconds": time.perf_counter() - t0}
    results["histories"] = {k: [list(h) for h in v] for k, v in histories.items()}
    full, lora = results["full"], results["lora"]
    results["lora_params_fraction"] = lora["trainable_params"] / full["trainable_params"]
    results["accuracy_gap_points"] = 100 * (full["accuracy"] - lora["accuracy"])

    out("")
    out(f"{'method':<18}{'trainable params':>17}{'accuracy':>10}{'train time':>12}")
    for name, label in (("frozen", "frozen baseline"), ("full", "full fine-tuning"),
                        ("lora", f"LoRA r={r}")):
        row = results[name]
        out(f"{label:<18}{row['trainable_params']:>17,}{100 * row['accuracy']:>9.1f}%"
            f"{row['train_seconds']:>11.1f}s")
    gap = results["accuracy_gap_points"]
    out(f"LoRA trains {100 * results['lora_params_fraction']:.1f}% of full fine-tuning's "
        f"parameters and ends {abs(gap):.1f} accuracy points {'below' if gap > 0 else 'above'} "
        f"it")
    return results


def plot(results, path):
    """Loss and accuracy curves of both adaptations (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'minilora[examples]'") from None
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, label in (("full", "full fine-tuning"), ("lora", "LoRA")):
        loss, acc = zip(*results["histories"][name], strict=True)
        epochs = range(1, len(loss) + 1)
        ax_loss.plot(epochs, loss, marker="o", label=label)
        ax_acc.plot(epochs, [100 * a for a in acc], marker="o", label=label)
    ax_acc.axhline(100 * results["frozen"]["accuracy"], color="gray", ls="--",
                   label="frozen baseline")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="rotated digits: loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="rotated digits: accuracy")
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args):
    results = run(epochs=args.epochs, r=args.r, alpha=2 * args.r, seed=args.seed)
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    if args.json:
        write_atomic(args.json, json.dumps(results, indent=2).encode())
        print(f"wrote {args.json}")
    return 0
