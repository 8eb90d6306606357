"""check_model: a whole PEFT model judged module by module as its author runs it."""

import types

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from minilora.testing.torch import check_model  # noqa: E402

# transformers 5 warns inside peft.get_peft_model (not in minilora)
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MLP0 = "base_model.model.model.layers.0.mlp"


def tiny_llama(dtype, dropout=0.1, seed=0):
    """A 2-layer LLaMA with random weights and PEFT LoRA (r 4, alpha 8: s = 2) on all seven
    projections, B drawn nonzero, in training mode (dropout active)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config),
                                peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                target_modules=PROJECTIONS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    return model.to(dtype).train()


def batch():
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "fp64": torch.float64}


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_the_plain_peft_model_passes_every_module(dtype):
    report = check_model(tiny_llama(DTYPES[dtype]), batch(), dtype=dtype)
    assert report.passed, str(report)
    blocks = sorted((r.name.split("layers.")[1], r.block) for r in report.layers)
    assert blocks == [("0.mlp", "mlp"), ("0.self_attn", "qkv"), ("0.self_attn.o_proj", "linear"),
                      ("1.mlp", "mlp"), ("1.self_attn", "qkv"), ("1.self_attn.o_proj", "linear")]
    assert report.not_judged == [] and "PASSED" in str(report)
    for row in report.layers:  # every output judged, dx included (the frozen W's dW is not)
        names = {t.name for t in row.report.tensors}
        assert "dx" in names and {"y", "y.0"} & names and {"dA", "dA.0"} & names
        assert all(n.startswith("dW") for n in row.report.not_judged)


def silu_grad(e):
    sig = torch.sigmoid(e)
    return sig * (1 + e * (1 - sig))  # d silu(e) / de


class LoRAMLP(torch.autograd.Function):
    """A fused LoRA MLP, y = down(silu(gate x) ⊙ up x), with a hand-written backward and one
    optional planted bug: "indicator" (gate's dx term multiplied by mask > 0, not the mask),
    "scaling twice" (up's dB multiplied by s²), "bf16 dB" (down's dB summed token by token in
    bf16)."""

    @staticmethod
    def forward(ctx, x, Wg, Ag, Bg, Wu, Au, Bu, Wd, Ad, Bd, mg, mu, md, s, bug):
        lead = x.shape[:-1]
        x, mg, mu, md = (t.reshape(-1, t.shape[-1]) for t in (x, mg, mu, md))  # (N, ·)
        e = x @ Wg.T + s[0] * ((x * mg) @ Ag.T) @ Bg.T  # (N, d_ff)
        u = x @ Wu.T + s[1] * ((x * mu) @ Au.T) @ Bu.T  # (N, d_ff)
        z = torch.nn.functional.silu(e) * u  # (N, d_ff)
        y = z @ Wd.T + s[2] * ((z * md) @ Ad.T) @ Bd.T  # (N, d)
        ctx.save_for_backward(x, Wg, Ag, Bg, Wu, Au, Bu, Wd, Ad, Bd, mg, mu, md, e, u, z)
        ctx.s, ctx.bug, ctx.lead = s, bug, lead
        return y.reshape(*lead, -1)

    @staticmethod
    def backward(ctx, dy):
        x, Wg, Ag, Bg, Wu, Au, Bu, Wd, Ad, Bd, mg, mu, md, e, u, z = ctx.saved_tensors
        s, bug = ctx.s, ctx.bug
        dy = dy.reshape(-1, dy.shape[-1])  # (N, d)
        hd, gd = (z * md) @ Ad.T, dy @ Bd  # (N, r), (N, r)
        dAd = s[2] * gd.T @ (z * md)  # (r, d_ff)
        if bug == "bf16 dB":
            total = torch.zeros(Bd.shape, dtype=torch.bfloat16)  # (d, r)
            for n in range(dy.shape[0]):
                total = total + torch.outer(dy[n], hd[n]).to(torch.bfloat16)
            dBd = s[2] * total.to(dy.dtype)
        else:
            dBd = s[2] * dy.T @ hd  # (d, r)
        dz = dy @ Wd + s[2] * (gd @ Ad) * md  # (N, d_ff)
        de = dz * u * silu_grad(e)  # (N, d_ff)
        du = dz * torch.nn.functional.silu(e)  # (N, d_ff)
        hg, gg = (x * mg) @ Ag.T, de @ Bg  # (N, r)
        hu, gu = (x * mu) @ Au.T, du @ Bu  # (N, r)
        gate_keep = (mg > 0).to(mg.dtype) if bug == "indicator" else mg
        dx = de @ Wg + s[0] * (gg @ Ag) * gate_keep + du @ Wu + s[1] * (gu @ Au) * mu  # (N, d)
        dAg, dBg = s[0] * gg.T @ (x * mg), s[0] * de.T @ hg
        dAu = s[1] * gu.T @ (x * mu)
        dBu = (s[1] * s[1] if bug == "scaling twice" else s[1]) * du.T @ hu
        return (dx.reshape(*ctx.lead, -1), None, dAg, dBg, None, dAu, dBu, None, dAd, dBd,
                None, None, None, None, None)


def patch_mlp(mlp, bug=None):
    """Replace one LlamaMLP's forward by LoRAMLP (unsloth's pattern): the projections are no
    longer called as modules; each dropout module is called on ones to draw its mask."""

    def parts(proj, shape, like):
        ones = torch.ones(shape, dtype=like.dtype)
        return (proj.base_layer.weight, proj.lora_A["default"].weight,
                proj.lora_B["default"].weight, proj.lora_dropout["default"](ones),
                proj.scaling["default"])

    def forward(self, x):
        d_ff = self.gate_proj.base_layer.weight.shape[0]
        g, u = parts(self.gate_proj, x.shape, x), parts(self.up_proj, x.shape, x)
        d = parts(self.down_proj, (*x.shape[:-1], d_ff), x)
        return LoRAMLP.apply(x, *g[:3], *u[:3], *d[:3], g[3], u[3], d[3],
                             (g[4], u[4], d[4]), bug)

    mlp.forward = types.MethodType(forward, mlp)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_an_honest_fused_mlp_patched_into_one_layer_passes(dtype):
    model = tiny_llama(DTYPES[dtype])
    patch_mlp(model.base_model.model.model.layers[0].mlp)
    report = check_model(model, batch(), dtype=dtype)
    assert report.passed, str(report)
    assert [r.block for r in report.layers if r.name == MLP0] == ["mlp"]


@pytest.mark.parametrize(("bug", "output"), [("indicator", "dx"), ("scaling twice", "dB.1"),
                                             ("bf16 dB", "dB.2")])
def test_a_planted_bug_in_the_fused_mlp_fails_exactly_that_module(bug, output):
    model = tiny_llama(torch.float32)
    patch_mlp(model.base_model.model.model.layers[0].mlp, bug)
    report = check_model(model, batch(), dtype="fp32")
    assert not report.passed and report.failed == [MLP0], str(report)
    row = next(r for r in report.layers if r.name == MLP0)
    failed = [t.name for t in row.report.tensors if not t.passed]
    assert failed == [output] and row.worst[2] == output
    assert len(report.layers) == 6 and sum(r.passed for r in report.layers) == 5
    assert f"{MLP0}" in str(report) and "FAILED" in str(report)


class Bypass(torch.nn.Module):
    """A patched projection: the LoRA layer's forward runs inside another module's, never as
    a module call of its own, so its hooks never fire."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner.forward(x)


def test_a_projection_hidden_inside_a_patched_forward_is_not_judged_and_says_why():
    model = tiny_llama(torch.float32)
    attn = model.base_model.model.model.layers[1].self_attn
    attn.q_proj = Bypass(attn.q_proj)
    report = check_model(model, batch(), dtype="fp32")
    assert not report.passed
    hidden = "base_model.model.model.layers.1.self_attn.q_proj.inner"
    assert [n for n, _ in report.not_judged] == [hidden]
    assert "never ran as a module call" in dict(report.not_judged)[hidden]
    assert all(r.passed for r in report.layers) and len(report.layers) == 7  # k, v alone
    assert f"not judged: {hidden}" in str(report)


def test_a_model_elsewhere_than_the_device_is_refused_and_meta_too():
    model = tiny_llama(torch.float32)
    with pytest.raises(ValueError, match="meta"):
        check_model(model, batch(), dtype="fp32", device="meta")
    with pytest.raises(TypeError, match="dict"):
        check_model(model, [1, 2], dtype="fp32")
    with pytest.raises(ValueError, match="not a scalar tensor"):
        check_model(model, {"input_ids": batch()["input_ids"]}, dtype="fp32")  # no labels


def test_a_custom_loss_and_an_explicit_cpu_device():
    model = tiny_llama(torch.float32)
    ids = batch()["input_ids"]
    report = check_model(model, {"input_ids": ids}, dtype="fp32", device="cpu",
                         loss_fn=lambda out: (out.logits ** 2).mean())
    assert report.passed and len(report.layers) == 6, str(report)


def test_the_hand_written_mlp_backward_matches_finite_differences_in_float64():
    g = torch.Generator().manual_seed(3)

    def rand(*shape, grad=False):
        return torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_(grad)

    d, d_ff, r = 5, 7, 2
    x = rand(2, 3, d, grad=True)
    Wg, Wu, Wd = rand(d_ff, d), rand(d_ff, d), rand(d, d_ff)
    Ag, Au, Ad = rand(r, d, grad=True), rand(r, d, grad=True), rand(r, d_ff, grad=True)
    Bg, Bu, Bd = rand(d_ff, r, grad=True), rand(d_ff, r, grad=True), rand(d, r, grad=True)
    keep = torch.rand(2, 3, d, generator=g) > 0.3
    mg = mu = keep / 0.7
    md = (torch.rand(2, 3, d_ff, generator=g) > 0.3) / 0.7

    def f(x, Ag, Bg, Au, Bu, Ad, Bd):
        return LoRAMLP.apply(x, Wg, Ag, Bg, Wu, Au, Bu, Wd, Ad, Bd, mg.double(), mu.double(),
                             md.double(), (2.0, 0.5, 1.5), None)

    assert torch.autograd.gradcheck(f, (x, Ag, Bg, Au, Bu, Ad, Bd))
    assert not torch.autograd.gradcheck(
        lambda *a: LoRAMLP.apply(a[0], Wg, *a[1:3], Wu, *a[3:5], Wd, *a[5:], mg.double(),
                                 mu.double(), md.double(), (2.0, 0.5, 1.5), "indicator"),
        (x, Ag, Bg, Au, Bu, Ad, Bd), raise_exception=False)


def test_a_model_without_lora_dropout_is_judged():
    """lora_dropout=0: PEFT's dropout is an nn.Identity, which check_model's mask hook skips."""
    report = check_model(tiny_llama(torch.float32, dropout=0.0), batch(), dtype="fp32")
    assert report.passed and len(report.layers) == 6, str(report)


def qlora_llama(dtype, hidden=64, intermediate=128, blocksize=64, seed=0):
    """QLoRA as bitsandbytes and PEFT build it: the tiny LLaMA's seven projections replaced by
    bitsandbytes Linear4bit (NF4, double quantization, ``blocksize``) quantized on this CPU,
    then PEFT LoRA on them (r 4, alpha 8), B drawn nonzero, no LoRA dropout."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden,
                                      intermediate_size=intermediate, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    for module in list(model.modules()):
        for child, linear in list(module.named_children()):
            if child in PROJECTIONS:
                q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                      compute_dtype=dtype, quant_type="nf4",
                                      compress_statistics=True)
                q.weight = bnb.nn.Params4bit(linear.weight.data.float(), requires_grad=False,
                                             quant_type="nf4", compress_statistics=True,
                                             blocksize=blocksize)
                setattr(module, child, q.to("cpu"))  # quantized here
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                       target_modules=PROJECTIONS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    return model.train()


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_a_qlora_model_passes_with_its_4bit_bases_judged_exactly(dtype):
    """Each 4-bit base is read back from its quant_state (codes, nested absmax, offset) and
    judged at its exact dequantization, with the honest model bitsandbytes' p(fl32(c[q]·a))."""
    model = qlora_llama(DTYPES[dtype])
    report = check_model(model, batch(), dtype=dtype)
    assert report.passed and len(report.layers) == 14, str(report)
    assert {r.block for r in report.layers} == {"linear"}  # blocks hold float bases only
    assert all({"y", "dx", "dA", "dB"} <= {t.name for t in r.report.tensors}
               for r in report.layers)


def test_a_dequantization_bug_in_one_qlora_layer_fails_exactly_there():
    """One Linear4bit's forward dequantizes with twice its blocksize (a fused kernel that
    hard-codes 128), its backward through that W by autograd: that module fails in y and dx
    (dA and dB do not depend on W), and every other passes."""
    F = pytest.importorskip("bitsandbytes.functional")
    model = qlora_llama(torch.float32)
    down = model.base_model.model.model.layers[0].mlp.down_proj
    base = down.get_base_layer()
    qs = base.weight.quant_state
    wrong = F.QuantState(absmax=qs.absmax, shape=qs.shape, code=qs.code,
                         blocksize=2 * qs.blocksize, quant_type="nf4", dtype=qs.dtype,
                         offset=qs.offset, state2=qs.state2)
    base.forward = lambda x: x @ F.dequantize_4bit(base.weight.data, wrong).to(x.dtype).T
    report = check_model(model, batch(), dtype="fp32")
    name = "base_model.model.model.layers.0.mlp.down_proj"
    assert report.failed == [name], str(report)
    row = next(r for r in report.layers if r.name == name)
    assert [t.name for t in row.report.tensors if not t.passed] == ["y", "dx"]


def test_bitsandbytes_own_cpu_dequantization_bug_is_caught():
    """bitsandbytes 0.50.2's CPU kernel dequantizes rows of 32 and 48 values in blocks of 64
    wrongly (docs/oracle.md, "QLoRA bases (NF4)"): the QLoRA model built so fails in every
    module, judged against the weights' exact dequantization, while the same model in blocks
    of 32 (its rows of 32 and 64 values whole blocks) passes."""
    F = pytest.importorskip("bitsandbytes.functional")
    model = qlora_llama(torch.float32, hidden=32, intermediate=48, blocksize=64)
    w = model.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer().weight
    if not _cpu_kernel_wrong(F, w):
        pytest.skip("this bitsandbytes build dequantizes rows of 32 in blocks of 64 correctly")
    report = check_model(model, batch(), dtype="fp32")
    assert len(report.failed) == 14, str(report)
    report = check_model(qlora_llama(torch.float32, hidden=32, intermediate=64, blocksize=32),
                         batch(), dtype="fp32")
    assert report.passed, str(report)


def _cpu_kernel_wrong(F, w):
    """bitsandbytes' dequantize_4bit against its own reference (default backend) path."""
    from bitsandbytes.backends.default import ops as default_ops

    qs = w.quant_state
    absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    ref = default_ops._dequantize_4bit_compute.__wrapped__(
        w.data.reshape(-1), absmax.float(), F.get_4bit_type("nf4", device="cpu"),
        qs.blocksize, qs.shape, qs.dtype)
    return not torch.equal(F.dequantize_4bit(w.data, qs), ref)


def test_a_4bit_base_of_another_format_is_not_judged_and_says_why():
    bnb = pytest.importorskip("bitsandbytes")
    model = qlora_llama(torch.float32)
    v = model.base_model.model.model.layers[1].self_attn.v_proj
    fp4 = bnb.nn.Linear4bit(v.in_features, v.out_features, bias=False,
                            compute_dtype=torch.float32, quant_type="fp4")
    fp4.weight = bnb.nn.Params4bit(torch.randn(v.out_features, v.in_features) * 0.1,
                                   requires_grad=False, quant_type="fp4")
    v.base_layer = fp4.to("cpu")
    report = check_model(model, batch(), dtype="fp32")
    name = "base_model.model.model.layers.1.self_attn.v_proj"
    assert not report.passed and [n for n, _ in report.not_judged] == [name], str(report)
    assert "fp4 4-bit base" in dict(report.not_judged)[name]
    assert len(report.layers) == 13 and all(r.passed for r in report.layers)
