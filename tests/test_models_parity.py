"""LlamaModel against transformers (logits, loss) and PEFT (LoRA / DoRA gradients, adapters both
ways), float64 to 1e-10 / 1e-9 relative; float32 logits as a sanity check.

transformers' LLaMA-family code rounds through float32 in RMSNorm, the rotary tables and the
eager softmax whatever the model's dtype; as in tests/test_models_ops_torch.py, the float64 tests
point those modules' ``torch`` at a proxy whose ``float32``/``float`` are ``torch.float64``."""


import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


from minilora.models.pretrained import from_pretrained  # noqa: E402

# peft's get_peft_model reads transformers' deprecated is_gradient_checkpointing (a FutureWarning
# from inside peft, not from minilora)
pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

V, T, BATCH = 32, 6, 2
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rel(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def hf_model(arch="llama", *, gqa=True, tied=False, dtype=torch.float64, seed=0, window=None):
    torch.manual_seed(seed)
    kw = dict(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2 if gqa else 4,
              max_position_embeddings=64, tie_word_embeddings=tied, rms_norm_eps=1e-5)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**kw, attention_bias=True, mlp_bias=True)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**kw)
        cls = transformers.Qwen2ForCausalLM
    else:
        cfg = transformers.MistralConfig(**kw, sliding_window=window)
        cls = transformers.MistralForCausalLM
    cfg._attn_implementation = "eager"
    model = cls(cfg).to(dtype).eval()
    with torch.no_grad():  # random biases and norms, so a wrongly placed one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    return model


def ids_batch(seed=1):
    return np.random.default_rng(seed).integers(0, V, (BATCH, T))


def hf_loss(logits, ids):
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V),
                                             torch.tensor(ids[:, 1:]).reshape(-1))


def minilora_of(hf, tmp_path, dtype=np.float64):
    hf.save_pretrained(tmp_path / "base")
    return from_pretrained(tmp_path / "base", dtype=dtype, backend="numpy")


@pytest.mark.parametrize("arch,gqa,tied,window", [
    ("llama", True, False, None), ("llama", False, True, None), ("qwen2", True, False, None),
    ("qwen2", False, True, None), ("mistral", True, False, None), ("mistral", False, False, T)])
def test_logits_and_loss_match_transformers_float64(float64_transformers, tmp_path, arch, gqa,
                                                    tied, window):
    hf = hf_model(arch, gqa=gqa, tied=tied, window=window)
    model = minilora_of(hf, tmp_path)
    ids = ids_batch()
    logits, _ = model.forward(ids)
    loss, _, _, _ = model.loss(ids)
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits
    assert rel(logits, ref.numpy()) <= 1e-10
    assert abs(loss - hf_loss(ref, ids).item()) <= 1e-10 * abs(loss)


def test_logits_match_transformers_float32(tmp_path):
    hf = hf_model("llama", dtype=torch.float32)
    model = minilora_of(hf, tmp_path, dtype=np.float32)
    ids = ids_batch()
    logits, _ = model.forward(ids)
    assert logits.dtype == np.float32
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert rel(logits, ref) <= 1e-4


def _perturb(model, seed=2):
    """B (and m) nonzero, so every gradient is informative."""
    rng = np.random.default_rng(seed)
    for name, p in model.parameters().items():
        if name.endswith(".B"):
            p[...] = rng.normal(0, 0.3, p.shape)
        elif name.endswith(".m"):
            p *= rng.uniform(0.5, 1.5, p.shape)


def _peft_of(hf, model, *, r, alpha, targets, use_rslora=False, use_dora=False):
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                          use_rslora=use_rslora, use_dora=use_dora, lora_dropout=0.0)
    pm = peft.get_peft_model(hf, cfg)
    ours = model.lora_parameters()
    params = dict(pm.named_parameters())
    with torch.no_grad():
        for key, value in ours.items():
            params[_peft_name(key)].copy_(torch.tensor(value))
    return pm, params


def _peft_name(key):
    if key.endswith("lora_magnitude_vector"):
        return key + ".default.weight"
    return key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
        ".lora_B.weight", ".lora_B.default.weight")


class _Mask(torch.nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.mask = torch.tensor(mask)

    def forward(self, x):
        return x * self.mask


@pytest.mark.parametrize("case", ["all", "qv", "rslora", "dora", "dora_qv", "dropout"])
def test_lora_gradients_match_peft_float64(float64_transformers, tmp_path, case):
    hf = hf_model("llama" if case != "qv" else "qwen2")
    model = minilora_of(hf, tmp_path)
    targets = ("q_proj", "v_proj") if case in ("qv", "dora_qv") else ALL
    kw = dict(r=4, alpha=8, target_modules=targets, use_rslora=case == "rslora",
              use_dora=case.startswith("dora"))
    model.add_lora(**kw, dropout=0.25 if case == "dropout" else 0.0, seed=3)
    _perturb(model)
    ids = ids_batch()
    masks = None
    pm, params = _peft_of(hf, model, r=4, alpha=8, targets=targets, use_rslora=kw["use_rslora"],
                          use_dora=kw["use_dora"])
    if case == "dropout":
        _, cache = model.forward(ids, train=True)  # the model's own seeded masks
        masks = cache.masks
        assert len(masks) == 2 * 7 and all(np.any(m == 0) for m in masks.values())
        for name, module in pm.named_modules():
            short = name.removeprefix("base_model.model.")
            if short in masks and hasattr(module, "lora_dropout"):
                module.lora_dropout["default"] = _Mask(masks[short])
    model.zero_grad()
    loss = model.train_step(ids, dropout_masks=masks)
    out = pm(torch.tensor(ids)).logits
    ref = hf_loss(out, ids)
    ref.backward()
    assert abs(loss - ref.item()) <= 1e-10 * abs(loss)
    grads = model.lora_grads()
    assert len(grads) == sum(p.requires_grad for p in params.values())
    for key, g in grads.items():
        assert np.any(g != 0), key
        assert rel(g, params[_peft_name(key)].grad.numpy()) <= 1e-9, key


def test_save_adapter_loads_in_peft(float64_transformers, tmp_path):
    hf = hf_model("llama")
    model = minilora_of(hf, tmp_path)
    model.add_lora(r=4, alpha=8, target_modules=ALL, use_dora=True, seed=5)
    _perturb(model)
    model.save_adapter(tmp_path / "adapter")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = ids_batch()
    with torch.no_grad():
        ref = pm(torch.tensor(ids)).logits.numpy()
    assert rel(model.forward(ids)[0], ref) <= 1e-10


@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_adapter_loads_in_minilora(float64_transformers, tmp_path, use_dora):
    hf = hf_model("mistral")
    model = minilora_of(hf, tmp_path)
    cfg = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "k_proj", "down_proj"],
                          use_dora=use_dora, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, cfg)
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.2)
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    ids = ids_batch()
    with torch.no_grad():
        ref = pm(torch.tensor(ids)).logits.numpy()
    model.load_adapter(tmp_path / "peft")
    assert rel(model.forward(ids)[0], ref) <= 1e-10
