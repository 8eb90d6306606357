"""``minilora demo --model``: LoRA's claim on a language model, on a CPU, in under two minutes.

1. Pretrain a tiny LLaMA (byte-level, every weight trained from random) on Python source code:
   the standard library's own modules, so no download (``minilora.models.text``).
2. Shift the data: English prose (the help topics that ``help("assert")`` prints). The
   pretrained model writes code; its loss on prose is high.
3. Adapt to the prose two ways with the same steps and batches: full fine-tuning (every weight
   trains) and LoRA on all seven projections at a few ranks (the pretrained weights frozen).
   Report trainable parameters, validation loss and perplexity on prose (and on code: what
   adapting forgot), time, and what each model writes from the same prompt.

Every gradient is minilora's hand-derived backward (docs/math.md).
"""

import json
import time

import numpy as np

from minilora.formats._io import write_atomic
from minilora.models import text
from minilora.models.config import ModelConfig
from minilora.models.lm_loss import causal_lm_loss, causal_lm_loss_backward
from minilora.toolkit.optim import AdamW

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT = "The "


def tiny_config(quick=False):
    """The demo's model: a byte-level LLaMA of 3.0M parameters (quick: 31k)."""
    d, layers, F, heads = (32, 2, 88, 4) if quick else (256, 4, 704, 8)
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=text.VOCAB_SIZE,
                       hidden_size=d, intermediate_size=F, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads // 2,
                       head_dim=d // heads,
                       rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512,
                       tie_word_embeddings=True)


def random_weights(config, seed=0, dtype=np.float32):
    """transformers' initialisation: every matrix N(0, 0.02²), every norm weight 1."""
    from minilora.models.weights import expected_shapes

    rng = np.random.default_rng(seed)
    return {name: (np.ones(shape, dtype) if name.endswith("norm.weight") else
                   (0.02 * rng.standard_normal(shape)).astype(dtype))
            for name, shape in expected_shapes(config).items()}


def evaluate(model, ids, batch, seq, batches=4, seed=123):
    """Mean validation loss over fixed windows (the same for every model)."""
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(batches):
        w = text.windows(ids, batch, seq, rng)
        losses.append(causal_lm_loss(model.forward(w)[0], w)[0])
    return float(np.mean(losses))


def train(model, ids, *, steps, batch, seq, lr, seed, out=None, label="", seconds=None):
    """AdamW on the model's trainable parameters; returns the per-step training losses. With
    ``seconds``, training stops early when that much time has passed (the caller says so)."""
    opt = AdamW(model, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        if seconds is not None and time.perf_counter() - start > seconds:
            break
        w = text.windows(ids, batch, seq, rng)  # (batch, seq)
        logits, cache = model.forward(w, train=True)
        loss, loss_cache = causal_lm_loss(logits, w)
        model.backward(causal_lm_loss_backward(loss_cache), cache)
        opt.step()
        model.zero_grad()
        losses.append(loss)
        if out and (step + 1) % max(1, steps // 4) == 0:
            out(f"  {label} step {step + 1:4d}/{steps}: loss {loss:.3f}")
    return losses


def sample(model, seed=0, n=120):
    ids = text.encode(PROMPT)[None, :]  # (1, T)
    new = model.generate(ids, max_new_tokens=n, temperature=0.7, seed=seed)
    s = text.decode(np.asarray(new)[0]).replace("\n", "⏎")
    return "".join(ch if ch.isprintable() and ch != "\ufffd" else "·" for ch in s)


def run(quick=False, out=print, json_path=None, plot_path=None, ranks=None, budget=100.0):
    """The demo. ``budget``: seconds for the training (pretraining gets half, full fine-tuning
    a share of the rest; the LoRA runs then take as many steps as full fine-tuning did); on a
    slow machine the runs are shortened to fit, and the demo says so."""
    from minilora.models.llama import LlamaModel

    t_start = time.perf_counter()
    config = tiny_config(quick)
    batch, seq = (4, 32) if quick else (16, 64)
    pre_steps, adapt_steps = (8, 6) if quick else (200, 80)
    ranks = ranks or ((2,) if quick else (2, 8))
    chars = 60_000 if quick else 1_500_000
    code_train, code_val = text.split(text.encode(text.corpus("code", max_chars=chars)))
    prose_train, prose_val = text.split(text.encode(text.corpus("prose", max_chars=chars // 2)))
    if quick:
        out("quick mode: a 31k-parameter model and a few steps, to show the demo runs; the "
            "figures mean nothing (run `minilora demo --model` for the real demo)")
    out(f"pretraining on code: {len(code_train):,} bytes of the standard library's source; "
        f"adapting to prose: {len(prose_train):,} bytes of its help topics")

    base = LlamaModel(config, random_weights(config, seed=0), train_base=True)
    n_params = sum(p.size for p in base.parameters().values())
    out(f"model: LLaMA, d={config.hidden_size}, {config.num_hidden_layers} layers, "
        f"{config.num_attention_heads} heads / {config.num_key_value_heads} kv heads, "
        f"{n_params:,} parameters, byte vocabulary")
    t0 = time.perf_counter()
    curves = {"pretrain": train(base, code_train, steps=pre_steps, batch=batch, seq=seq,
                                lr=3e-3, seed=1, out=out, label="pretrain",
                                seconds=budget / 2)}
    if len(curves["pretrain"]) < pre_steps:
        out(f"(shortened: {len(curves['pretrain'])} of {pre_steps} pretraining steps fit in "
            f"{budget / 2:.0f} s on this machine)")
    pretrained = {k: v.copy() for k, v in base.parameters().items()}
    results = {"pretrained": {
        "trainable_params": n_params, "seconds": time.perf_counter() - t0,
        "prose_loss": evaluate(base, prose_val, batch, seq),
        "code_loss": evaluate(base, code_val, batch, seq), "sample": sample(base)}}

    def adapted(name, model, lr, seconds=None):
        t = time.perf_counter()
        before = evaluate(model, prose_val, batch, seq)
        curves[name] = train(model, prose_train, steps=adapt_steps, batch=batch, seq=seq, lr=lr,
                             seed=2, out=out, label=name, seconds=seconds)
        results[name] = {
            "trainable_params": sum(p.size for p in model.parameters().values()),
            "seconds": time.perf_counter() - t, "prose_loss_before": before,
            "prose_loss": evaluate(model, prose_val, batch, seq),
            "code_loss": evaluate(model, code_val, batch, seq), "sample": sample(model)}

    adapted("full fine-tuning", LlamaModel(config, pretrained, train_base=True), 1e-3,
            seconds=budget / 2 / (1 + len(ranks)))
    if len(curves["full fine-tuning"]) < adapt_steps:
        adapt_steps = len(curves["full fine-tuning"])
        out(f"(shortened: {adapt_steps} adapting steps for every method, to fit the budget)")
    frozen = {k: v.copy() for k, v in pretrained.items()}
    for k in frozen:
        frozen[k].flags.writeable = False
    for r in ranks:
        model = LlamaModel(config, frozen)
        model.add_lora(r=r, alpha=2 * r, target_modules=TARGETS, seed=r)
        adapted(f"LoRA r={r}", model, 3e-3)

    out("")
    out(f"{'model':<18}{'trainable':>11}{'share':>8}{'prose loss':>12}{'prose ppl':>11}"
        f"{'code loss':>11}{'seconds':>9}")
    for name, res in results.items():
        out(f"{name:<18}{res['trainable_params']:>11,}{res['trainable_params'] / n_params:>8.1%}"
            f"{res['prose_loss']:>12.3f}{np.exp(res['prose_loss']):>11.2f}"
            f"{res['code_loss']:>11.3f}{res['seconds']:>9.1f}")
    out("")
    out(f"what each writes after {PROMPT!r} (temperature 0.7; ⏎ a newline, · a byte that is "
        f"no character on its own):")
    for name, res in results.items():
        out(f"  {name:<18}{res['sample']}")
    total = time.perf_counter() - t_start
    out(f"\ntotal {total:.1f} s")
    summary = {"config": config.__dict__, "results": results, "curves": curves,
               "seconds": total, "quick": quick}
    if json_path:
        write_atomic(json_path, json.dumps(summary, indent=2).encode())
    if plot_path:
        _plot(curves, plot_path, out)
    return summary


def _plot(curves, path, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        out("(matplotlib is not installed: no plot)")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(curves["pretrain"])
    ax1.set(title="pretraining on code", xlabel="step", ylabel="training loss (nats/byte)")
    for name, c in curves.items():
        if name != "pretrain":
            ax2.plot(c, label=name)
    ax2.set(title="adapting to prose", xlabel="step", ylabel="training loss (nats/byte)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    out(f"plot: {path}")
