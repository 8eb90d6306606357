"""torch parity of the transformer's ops (minilora.models): each forward against transformers'
LLaMA code on the same float64 inputs to ≤ 1e-12 relative, each backward against torch autograd.

transformers' LLaMA casts to float32 in three places whatever the model's dtype: LlamaRMSNorm
(``hidden_states.to(torch.float32)``), LlamaRotaryEmbedding (``dtype=torch.float`` tables) and
eager_attention_forward (``softmax(..., dtype=torch.float32)``). To compare float64 with float64,
the ``float64_transformers`` fixture runs transformers' own lines with the ``torch`` name of
those modules pointing at a proxy whose ``float32``/``float`` are ``torch.float64``: the same
code, the casts made no-ops. ``test_transformers_float32_casts_bound_the_difference`` shows that
without the proxy the difference is float32 rounding, nothing more.
"""

import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig  # noqa: E402
from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402

from minilora.models.attention import attention_backward, attention_forward  # noqa: E402
from minilora.models.embedding import embedding_backward, embedding_forward  # noqa: E402
from minilora.models.lm_loss import causal_lm_loss, causal_lm_loss_backward  # noqa: E402
from minilora.models.rmsnorm import rmsnorm_backward, rmsnorm_forward  # noqa: E402
from minilora.models.rope import rope_backward, rope_forward, rope_tables  # noqa: E402

RTOL = 1e-12


def assert_rel(actual, expected, rtol=RTOL):
    actual, expected = np.asarray(actual), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    err = float(np.max(np.abs(actual - expected), initial=0.0))
    scale = float(np.max(np.abs(expected), initial=0.0))
    assert err <= rtol * scale, f"relative error {err / max(scale, 1e-300):.3g} > {rtol}"


def T(a, grad=False):
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


def _rotary(D, theta, factor):
    params = {"rope_type": "default", "rope_theta": theta} if factor == 1.0 else \
        {"rope_type": "linear", "rope_theta": theta, "factor": factor}
    config = LlamaConfig(hidden_size=4 * D, num_attention_heads=4, head_dim=D,
                         rope_parameters=params)
    return modeling_llama.LlamaRotaryEmbedding(config)


@pytest.mark.parametrize("shape,eps", [((2, 5, 16), 1e-6), ((3, 7), 1e-5), ((1, 1, 4), 0.5)])
def test_rmsnorm_matches_transformers(float64_transformers, shape, eps):
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal(shape), rng.standard_normal(shape)
    w = rng.standard_normal(shape[-1])
    norm = modeling_llama.LlamaRMSNorm(shape[-1], eps=eps).double()
    with torch.no_grad():
        norm.weight.copy_(T(w))
    xt = T(x, grad=True)
    yt = norm(xt)
    (yt * T(dy)).sum().backward()
    y, cache = rmsnorm_forward(x, w, eps=eps)
    assert_rel(y, yt.detach().numpy())
    assert_rel(rmsnorm_backward(dy, cache), xt.grad.numpy())


@pytest.mark.parametrize("D,theta,factor,positions", [
    (8, 10000.0, 1.0, np.arange(6)),
    (16, 500000.0, 1.0, np.arange(100, 103)),
    (8, 10000.0, 4.0, np.arange(5, 9)),  # linear scaling
    (4, 1e6, 2.0, np.array([2047])),  # a late decode step
])
def test_rope_matches_transformers(float64_transformers, D, theta, factor, positions):
    rng = np.random.default_rng(1)
    B, H, Hkv, Tn = 2, 4, 2, positions.size
    q, k = rng.standard_normal((B, H, Tn, D)), rng.standard_normal((B, Hkv, Tn, D))
    dq, dk = rng.standard_normal(q.shape), rng.standard_normal(k.shape)
    rotary = _rotary(D, theta, factor)
    cos_t, sin_t = rotary(T(q), torch.tensor(positions)[None, :])  # (1, T, D)
    cos, sin = rope_tables(positions, D, theta=theta, scaling_factor=factor, dtype=np.float64)
    assert_rel(cos, cos_t[0].numpy())
    assert_rel(sin, sin_t[0].numpy())
    qt, kt = T(q, grad=True), T(k, grad=True)
    q_embed, k_embed = modeling_llama.apply_rotary_pos_emb(qt, kt, cos_t, sin_t)
    ((q_embed * T(dq)).sum() + (k_embed * T(dk)).sum()).backward()
    assert_rel(rope_forward(q, cos, sin), q_embed.detach().numpy())
    assert_rel(rope_forward(k, cos, sin), k_embed.detach().numpy())
    assert_rel(rope_backward(dq, cos, sin), qt.grad.numpy())
    assert_rel(rope_backward(dk, cos, sin), kt.grad.numpy())


def _eager_attention(q, k, v, q_offset):
    """transformers' eager_attention_forward with its causal additive mask (B, 1, T, S)."""
    B, H, Tn, D = q.shape
    S = k.shape[2]
    masked = torch.arange(S)[None, :] > q_offset + torch.arange(Tn)[:, None]  # (T, S)
    mask = torch.zeros(B, 1, Tn, S, dtype=q.dtype)
    mask[:, :, masked] = torch.finfo(q.dtype).min
    module = types.SimpleNamespace(num_key_value_groups=H // k.shape[1], training=False)
    out, _ = modeling_llama.eager_attention_forward(module, q, k, v, mask, scaling=D ** -0.5)
    return out.transpose(1, 2)  # (B, H, T, D)


@pytest.mark.parametrize("B,H,Hkv,Tn,D,q_offset", [
    (2, 8, 4, 6, 16, 0), (1, 4, 4, 5, 8, 0), (2, 6, 1, 3, 8, 5), (3, 4, 2, 1, 8, 9),
])
def test_attention_matches_transformers(float64_transformers, B, H, Hkv, Tn, D, q_offset):
    rng = np.random.default_rng(2)
    S = q_offset + Tn
    q = rng.standard_normal((B, H, Tn, D))
    k, v = rng.standard_normal((B, Hkv, S, D)), rng.standard_normal((B, Hkv, S, D))
    dout = rng.standard_normal(q.shape)
    qt, kt, vt = T(q, grad=True), T(k, grad=True), T(v, grad=True)
    out_t = _eager_attention(qt, kt, vt, q_offset)
    (out_t * T(dout)).sum().backward()
    out, cache = attention_forward(q, k, v, q_offset=q_offset)
    assert_rel(out, out_t.detach().numpy())
    for mine, theirs in zip(attention_backward(dout, cache), (qt, kt, vt), strict=True):
        assert_rel(mine, theirs.grad.numpy())


def test_transformers_float32_casts_bound_the_difference():
    """Without the proxy, transformers' float64 RMSNorm and attention round through float32:
    the difference from minilora's float64 is at float32's rounding level, and no more."""
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((2, 5, 16)), rng.standard_normal(16)
    norm = modeling_llama.LlamaRMSNorm(16, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(T(w))
        y_t = norm(T(x)).numpy()
    y, _ = rmsnorm_forward(x, w, eps=1e-6)
    assert_rel(y, y_t, rtol=1e-6)
    q, k, v = (rng.standard_normal((2, 4, 5, 8)) for _ in range(3))
    with torch.no_grad():
        out_t = _eager_attention(T(q), T(k), T(v), 0).numpy()
    assert_rel(attention_forward(q, k, v)[0], out_t, rtol=1e-6)


def test_embedding_matches_torch():
    rng = np.random.default_rng(4)
    W = rng.standard_normal((11, 6))
    ids = rng.integers(0, 11, (3, 7))
    dh = rng.standard_normal((3, 7, 6))
    Wt = T(W, grad=True)
    h_t = torch.nn.functional.embedding(torch.tensor(ids), Wt)
    (h_t * T(dh)).sum().backward()
    h, cache = embedding_forward(ids, W)
    assert_rel(h, h_t.detach().numpy(), rtol=0.0)
    assert_rel(embedding_backward(dh, cache), Wt.grad.numpy())


@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_lm_loss_matches_torch_cross_entropy(ignore_index):
    rng = np.random.default_rng(5)
    B, Tn, V = 3, 6, 9
    logits = rng.standard_normal((B, Tn, V)) * 4
    ids = rng.integers(0, V, (B, Tn))
    ids[0, 2] = ids[2, 5] = ignore_index if ignore_index < 0 else ids[0, 2]
    lt = T(logits, grad=True)
    ref = torch.nn.functional.cross_entropy(lt[:, :-1].reshape(-1, V),
                                            torch.tensor(ids[:, 1:]).reshape(-1),
                                            ignore_index=ignore_index)
    ref.backward()
    loss, cache = causal_lm_loss(logits, ids, ignore_index=ignore_index)
    assert_rel(loss, ref.item())
    assert_rel(causal_lm_loss_backward(cache), lt.grad.numpy())
    # transformers' ForCausalLMLoss (labels = input_ids) computes in float32 (logits.float()):
    hf = ForCausalLMLoss(T(logits), torch.tensor(ids), V, ignore_index=ignore_index)
    assert_rel(loss, hf.item(), rtol=1e-6)
