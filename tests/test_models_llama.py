"""LlamaModel without torch: whole-model LoRA / DoRA gradients against central finite
differences (float64), KV-cache generation equal to the full pass, adapters round trip, a
read-only base never modified, AdamW training, validation at the public entries."""

import numpy as np
import pytest

from minilora.models.config import ModelConfig
from minilora.models.llama import LlamaModel, module_name
from minilora.models.lm_loss import causal_lm_loss_backward
from minilora.toolkit.optim import AdamW

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny(dtype=np.float64, *, seed=0, tied=False, bias=False, backend="numpy", **over):
    kw = dict(architecture="LlamaForCausalLM", vocab_size=32, hidden_size=16,
              intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=4, rms_norm_eps=1e-5, rope_theta=10000.0,
              max_position_embeddings=16, tie_word_embeddings=tied, qkv_bias=bias,
              o_bias=bias, mlp_bias=bias)
    kw.update(over)
    c = ModelConfig(**kw)
    rng = np.random.default_rng(seed)
    d, F, V = c.hidden_size, c.intermediate_size, c.vocab_size
    H, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    shapes = {"model.embed_tokens.weight": (V, d), "model.norm.weight": (d,)}
    if not tied:
        shapes["lm_head.weight"] = (V, d)
    out_in = {"q_proj": (H * D, d), "k_proj": (Hkv * D, d), "v_proj": (Hkv * D, d),
              "o_proj": (d, H * D), "gate_proj": (F, d), "up_proj": (F, d), "down_proj": (d, F)}
    for i in range(c.num_hidden_layers):
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (d,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (d,)
        for p, s in out_in.items():
            shapes[f"{module_name(i, p)}.weight"] = s
            if bias:
                shapes[f"{module_name(i, p)}.bias"] = (s[0],)
    weights = {}
    for k, s in shapes.items():
        w = (1.0 + 0.3 * rng.normal(size=s) if "norm" in k else 0.4 * rng.normal(size=s))
        w = w.astype(dtype)
        w.flags.writeable = False
        weights[k] = w
    return LlamaModel(c, weights, backend=backend)


def perturb(model, seed=1):
    rng = np.random.default_rng(seed)
    for name, p in model.parameters().items():
        if name.endswith(".B"):
            p[...] = rng.normal(0, 0.3, p.shape)
        elif name.endswith(".m"):
            p *= rng.uniform(0.5, 1.5, p.shape)


IDS = np.random.default_rng(2).integers(0, 32, (2, 5))


@pytest.mark.parametrize("use_dora", [False, True])
def test_gradients_match_central_differences(use_dora):
    model = tiny()
    model.add_lora(r=2, alpha=3, target_modules=ALL, use_dora=use_dora, seed=4)
    perturb(model)
    if use_dora:  # the detached-norm gradient is the gradient with n held at its value
        fixed = {}
        for name, a in model.adapters.items():
            W = model.weights[f"{name}.weight"]
            fixed[name] = np.linalg.norm(W + a.scaling * a.B @ a.A, axis=1)
        model._fixed_norms = fixed
    model.zero_grad()
    model.train_step(IDS, train=False)
    grads = {k: g.copy() for k, g in model.grads.items()}
    assert len(grads) == 2 * 7 * (3 if use_dora else 2)
    eps, worst = 1e-6, 0.0
    for name, p in model.parameters().items():
        num = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            old = p[idx]
            p[idx] = old + eps
            up = model.loss(IDS)[0]
            p[idx] = old - eps
            down = model.loss(IDS)[0]
            p[idx] = old
            num[idx] = (up - down) / (2 * eps)
        err = np.max(np.abs(num - grads[name])) / np.max(np.abs(num))
        assert err <= 1e-6, (name, err)
        worst = max(worst, err)
    assert worst > 0  # the comparison did run on nonzero gradients


@pytest.mark.parametrize("use_dora", [False, True])
def test_adamw_lowers_the_loss(use_dora):
    model = tiny()
    model.add_lora(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"),
                   use_dora=use_dora, dropout=0.1, seed=0)
    opt = AdamW(model, lr=1e-2, lora_plus_ratio=4.0)
    assert any(k.endswith(".B") for k in model.parameters())
    first = model.loss(IDS)[0]
    for _ in range(15):
        model.zero_grad()
        model.train_step(IDS)
        opt.step()
    assert model.loss(IDS)[0] < first - 0.05


def test_base_weights_never_modified(tmp_path):
    model = tiny(bias=True)
    before = {k: w.tobytes() for k, w in model.weights.items()}
    assert all(not w.flags.writeable for w in model.weights.values())
    model.add_lora(r=2, target_modules=ALL, use_dora=True, seed=0)
    opt = AdamW(model, lr=1e-2)
    for _ in range(3):
        model.zero_grad()
        model.train_step(IDS)
        opt.step()
    model.save_adapter(tmp_path / "a")
    model.generate(IDS, 3)
    assert {k: w.tobytes() for k, w in model.weights.items()} == before


@pytest.mark.parametrize("tied", [False, True])
def test_kv_cache_generation_equals_the_full_pass(tied):
    model = tiny(tied=tied, bias=True)
    model.add_lora(r=2, target_modules=ALL, seed=0)
    perturb(model)
    out = model.generate(IDS, 6)
    assert out.shape == (2, 11) and np.array_equal(out[:, :5], IDS)
    full, _ = model.forward(out)
    assert np.array_equal(np.argmax(full[:, 4:-1], axis=-1), out[:, 5:])  # greedy
    # the decode steps' logits equal the full pass's, position by position
    logits, cache = model.forward(out[:, :5])
    steps = [logits]
    for t in range(5, 11):
        logits, cache = model.forward(out[:, t:t + 1], past=cache.past)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=0, atol=1e-12)


def test_sampling_is_seeded_and_valid():
    model = tiny()
    a = model.generate(IDS, 5, temperature=1.0, seed=3)
    b = model.generate(IDS, 5, temperature=1.0, seed=3)
    assert np.array_equal(a, b) and a.min() >= 0 and a.max() < 32
    assert not np.array_equal(a, model.generate(IDS, 5, temperature=1.0, seed=4))


@pytest.mark.parametrize("use_dora", [False, True])
def test_adapter_round_trip(tmp_path, use_dora):
    model = tiny()
    model.add_lora(r=3, alpha=5, target_modules=("q_proj", "o_proj", "up_proj"),
                   use_rslora=True, use_dora=use_dora, seed=0)
    perturb(model)
    model.save_adapter(tmp_path / "a")
    other = tiny()
    other.load_adapter(tmp_path / "a")
    assert other.lora_parameters().keys() == model.lora_parameters().keys()
    for k, v in model.lora_parameters().items():
        np.testing.assert_array_equal(other.lora_parameters()[k], v)
    np.testing.assert_array_equal(other.forward(IDS)[0], model.forward(IDS)[0])
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in \
        model.lora_parameters()


def test_load_adapter_refuses_unknown_modules_and_shapes(tmp_path):
    model = tiny()
    model.add_lora(r=2, target_modules=("q_proj",), seed=0)
    model.save_adapter(tmp_path / "a")
    small = tiny(num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj"):
        small.load_adapter(tmp_path / "a")
    wide = tiny(num_attention_heads=2, head_dim=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="do not fit"):
        wide.load_adapter(tmp_path / "a")


def test_input_validation():
    model = tiny()
    with pytest.raises(TypeError, match="input_ids"):
        model.forward(IDS.astype(np.float64))
    with pytest.raises(ValueError, match="out of range"):
        model.forward(IDS + 32)
    with pytest.raises(ValueError, match="batch, seq"):
        model.forward(IDS[0])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.forward(np.zeros((1, 17), np.int64))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(IDS, 12)
    with pytest.raises(ValueError, match="target_modules"):
        model.add_lora(target_modules=("qkv",))


def test_float32_runs_in_float32():
    model = tiny(np.float32)
    model.add_lora(r=2, target_modules=ALL, seed=0)
    logits, cache = model.forward(IDS)
    assert logits.dtype == np.float32
    model.backward(np.ones_like(logits), cache)
    assert all(g.dtype == np.float32 for g in model.grads.values())


@pytest.mark.parametrize("use_dora", [False, True])
def test_numba_backend_equals_numpy(use_dora):
    grads = []
    for backend in ("numpy", "numba"):
        model = tiny(backend=backend)
        model.add_lora(r=2, target_modules=ALL, use_dora=use_dora, seed=0)
        perturb(model)
        model.zero_grad()
        model.train_step(IDS, train=False)
        grads.append(model.grads)
    for k, g in grads[0].items():
        np.testing.assert_allclose(grads[1][k], g, rtol=0, atol=1e-12 * np.max(np.abs(g)))


def test_dropout_masks_are_seeded_and_inverted():
    model = tiny()
    model.add_lora(r=2, target_modules=("q_proj", "down_proj"), dropout=0.5, seed=9)
    _, c1 = model.forward(IDS, train=True)
    _, c2 = model.forward(IDS, train=True)
    assert set(c1.masks) == {module_name(i, p) for i in range(2) for p in ("q_proj", "down_proj")}
    m = c1.masks[module_name(0, "down_proj")]
    assert m.shape == (2, 5, 24) and set(np.unique(m)) == {0.0, 2.0}
    assert not np.array_equal(m, c2.masks[module_name(0, "down_proj")])  # a fresh draw per call
    assert model.forward(IDS)[1].masks == {}  # eval: no dropout


def test_explicit_masks_are_used_and_checked():
    model = tiny()
    model.add_lora(r=2, target_modules=("v_proj",), seed=0)
    perturb(model)
    zeros = {module_name(i, "v_proj"): np.zeros((2, 5, 16)) for i in range(2)}
    base = tiny().forward(IDS)[0]
    assert not np.allclose(model.forward(IDS)[0], base, rtol=0, atol=1e-6)  # B ≠ 0: adapted
    # masks zeroing every LoRA branch's input give the base model's logits
    np.testing.assert_allclose(model.forward(IDS, dropout_masks=zeros)[0], base, rtol=0,
                               atol=1e-12)
    name = module_name(1, "v_proj")
    with pytest.raises(ValueError, match="q_proj"):
        model.forward(IDS, dropout_masks={module_name(0, "q_proj"): zeros[name]})
    with pytest.raises(ValueError, match="shape"):
        model.forward(IDS, dropout_masks={name: np.ones((2, 5, 8))})


@pytest.mark.parametrize("tied,bias", [(False, True), (True, False)])
def test_base_weight_gradients_match_central_differences(tied, bias):
    """train_base=True (pretraining, full fine-tuning): every base weight's gradient, the
    norms', the embedding's and the LM head's (tied: the embedding gets both), against central
    differences of the loss, a few coordinates of each."""
    frozen = tiny(tied=tied, bias=bias)
    model = LlamaModel(frozen.config, frozen.weights, train_base=True)
    assert model.parameters().keys() == frozen.weights.keys()
    model.zero_grad()
    model.train_step(IDS, train=False)
    rng = np.random.default_rng(5)
    eps = 1e-6
    for name, p in model.parameters().items():
        g = model.grads[name]
        assert np.abs(g).max() > 0, name
        for flat in rng.choice(p.size, size=min(3, p.size), replace=False):
            idx = np.unravel_index(flat, p.shape)
            old = p[idx]
            p[idx] = old + eps
            up = model.loss(IDS)[0]
            p[idx] = old - eps
            down = model.loss(IDS)[0]
            p[idx] = old
            fd = (up - down) / (2 * eps)
            assert abs(g[idx] - fd) <= 1e-6 * max(1.0, abs(fd)), (name, idx, g[idx], fd)
    assert all(not w.flags.writeable for w in frozen.weights.values())  # the source untouched


def test_train_base_trains_and_refuses_adapters():
    frozen = tiny()
    before = {k: v.copy() for k, v in frozen.weights.items()}
    model = LlamaModel(frozen.config, frozen.weights, train_base=True)
    with pytest.raises(ValueError, match="train_base"):
        model.add_lora(r=2)
    opt = AdamW(model, lr=1e-2)
    first = model.train_step(IDS)
    for _ in range(10):
        model.zero_grad()
        model.train_step(IDS)
        opt.step()
    assert model.loss(IDS)[0] < first - 0.1
    assert all(np.array_equal(before[k], frozen.weights[k]) for k in before)


@pytest.mark.parametrize("train_base, targets, use_dora, backend", [
    (False, ALL, False, "numpy"), (True, None, False, "numpy"), (False, ALL, True, "numpy"),
    (False, ("q_proj", "v_proj", "down_proj"), False, "numba")])
def test_train_step_equals_loss_then_backward(train_base, targets, use_dora, backend):
    """train_step's fused head and loss, and its first layer without the input gradient the
    frozen embedding would receive, give loss's value and backward's gradients (the blocks,
    DoRA, and a plain k_proj beside the adapted q and v)."""
    frozen = tiny(tied=True)
    model = LlamaModel(frozen.config, frozen.weights, train_base=train_base, backend=backend)
    if not train_base:
        model.add_lora(r=2, alpha=3, target_modules=targets, use_dora=use_dora, seed=4)
        perturb(model)
    model.zero_grad()
    value = model.train_step(IDS, train=False)
    fused = {k: g.copy() for k, g in model.grads.items()}
    model.zero_grad()
    loss, _, cache, loss_cache = model.loss(IDS)
    model.backward(causal_lm_loss_backward(loss_cache), cache)
    assert value == pytest.approx(loss, rel=1e-13)
    for k, g in model.grads.items():
        assert np.abs(g).max() > 0, k
        np.testing.assert_allclose(fused[k], g, rtol=1e-11, atol=1e-14, err_msg=k)
