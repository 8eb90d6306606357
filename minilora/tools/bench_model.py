"""``minilora bench --model``: a LoRA training step of a LLaMA-style model, against torch + PEFT.

The step is what fine-tuning repeats: forward, the causal language-model loss, backward, AdamW
on the adapters. minilora's model (``minilora.models.LlamaModel``) and transformers'
``LlamaForCausalLM`` wrapped by PEFT's ``get_peft_model`` hold the same weights and adapters and
run the same batch in one process, interleaved with the model's floor (its large products alone
in NumPy's BLAS: every projection's ``x Wᵀ`` and ``dy W``, attention's six batched products per
head, the LM head's two), each figure the median over repeats of a ratio (``minilora.tools.bench``'s
``time_case``). Memory is the rise of the peak resident set of a fresh process during one step
(after a first step, so optimizer state and BLAS buffers exist already), for each side alone,
with glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``) on both sides: every
large array is then mapped when made and unmapped when freed, so the rise is the step's own
peak of live memory. Without it, malloc keeps what the first step freed and lends it to the
second, and the figure measures how much the allocator happened to keep (it read 384 MiB for
minilora and 256 MiB for torch, against 885 and 840 MiB of live peak, on the same code).
"""

import json
import os
import subprocess
import sys

import numpy as np

from minilora.formats._io import write_atomic
from minilora.tools.bench import time_case

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The model (d=512, 8 layers, 32M parameters with the untied head); batch 8 x 256
# tokens; LoRA r=16 on all seven.
FULL = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
            intermediate_size=1408, vocab_size=8192, batch=8, seq=256, r=16)
QUICK = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=160, vocab_size=256, batch=2, seq=32, r=4)


def _sizes(case):
    return {k: v for k, v in case.items() if k not in ("batch", "seq", "r")}


def build_torch(case, seed=0):
    """transformers' LlamaForCausalLM (random weights, fp32) with PEFT LoRA on all seven
    projections, B made nonzero so every gradient is a real one; and its AdamW."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**_sizes(case), max_position_embeddings=max(2048, case["seq"]),
                         tie_word_embeddings=False)
    base = LlamaForCausalLM(config).float().eval()
    model = get_peft_model(base, LoraConfig(r=case["r"], lora_alpha=2 * case["r"],
                                            target_modules=list(TARGETS), lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4)


def build_minilora(torch_model, case):
    """minilora's model with the torch model's base weights and adapters (copied), and its
    AdamW."""
    from minilora.models.config import ModelConfig
    from minilora.models.llama import LlamaModel
    from minilora.toolkit.optim import AdamW

    sd = {k.removeprefix("base_model.model."): v.detach().numpy().copy()
          for k, v in torch_model.state_dict().items()}
    weights = {k.replace(".base_layer", ""): v for k, v in sd.items() if "lora_" not in k}
    c = torch_model.base_model.model.config
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=c.vocab_size,
                         hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers,
                         num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads,
                         head_dim=c.hidden_size // c.num_attention_heads,
                         rms_norm_eps=c.rms_norm_eps,
                         rope_theta=float(c.rope_parameters["rope_theta"]),
                         max_position_embeddings=c.max_position_embeddings,
                         tie_word_embeddings=False)
    model = LlamaModel(config, weights)
    model.add_lora(r=case["r"], alpha=2 * case["r"], target_modules=TARGETS)
    torch_sd = torch_model.state_dict()
    for name, p in model.parameters().items():  # "<module>.A" / ".B": the live arrays
        module, part = name.rsplit(".", 1)
        p[...] = torch_sd[f"base_model.model.{module}.lora_{part}.default.weight"].numpy()
    return model, AdamW(model, lr=1e-4, weight_decay=0.01)


def torch_step(model, opt, ids):
    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def minilora_step(model, opt, ids):
    def step():
        model.train_step(ids)
        opt.step()
        model.zero_grad()
    return step


def floor_step(case, seed=0):
    """The step's large products alone, in NumPy: for each layer, each projection's x Wᵀ and
    dy W, attention's QKᵀ, PV and the four products of its backward; the LM head's two."""
    rng = np.random.default_rng(seed)
    d, F, V = case["hidden_size"], case["intermediate_size"], case["vocab_size"]
    H, Hkv = case["num_attention_heads"], case["num_key_value_heads"]
    D, N, B, T = d // H, case["batch"] * case["seq"], case["batch"], case["seq"]

    def arr(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    # (d_out, d_in) of q, k, v, o, gate, up, down
    projections = [(H * D, d), (Hkv * D, d), (Hkv * D, d), (d, H * D), (F, d), (F, d), (d, F)]
    Ws = [arr(o, i) for o, i in projections]
    xs = {i: arr(N, i) for i in {i for _, i in projections}}  # (N, d_in)
    dys = {o: arr(N, o) for o in {o for o, _ in projections}}  # (N, d_out)
    q, k, v, P, dout = arr(B, H, T, D), arr(B, H, T, D), arr(B, H, T, D), arr(B, H, T, T), \
        arr(B, H, T, D)
    E, h, dlogits = arr(V, d), arr(N, d), arr(N, V)

    def step():
        for _ in range(case["num_hidden_layers"]):
            for W, (o, i) in zip(Ws, projections, strict=True):
                xs[i] @ W.T  # (N, d_out)
                dys[o] @ W  # (N, d_in)
            q @ k.transpose(0, 1, 3, 2)  # (B, H, T, T) scores
            P @ v  # (B, H, T, D) out
            dout @ v.transpose(0, 1, 3, 2)  # (B, H, T, T) dP
            P.transpose(0, 1, 3, 2) @ dout  # (B, H, T, D) dv
            P @ k  # (B, H, T, D) dq
            P.transpose(0, 1, 3, 2) @ q  # (B, H, T, D) dk
        h @ E.T  # (N, V) logits
        dlogits @ E  # (N, d)
    return step


def _batch(case, seed=1):
    rng = np.random.default_rng(seed)
    return rng.integers(0, case["vocab_size"], size=(case["batch"], case["seq"]))  # (B, T)


_PROBE = """
import sys, json
from minilora.tools import bench_model as bm
case = json.loads(sys.argv[2])
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
import torch
torch.set_num_threads(2)
tmodel, topt = bm.build_torch(case)
ids = bm._batch(case)
if sys.argv[1] == "torch":
    step = bm.torch_step(tmodel, topt, torch.as_tensor(ids))
else:
    model, opt = bm.build_minilora(tmodel, case)
    del tmodel, topt
    step = bm.minilora_step(model, opt, ids)
step()  # optimizer state, BLAS buffers and allocator pools exist from here on
before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:  # peak := now (Linux >= 4.0)
    f.write("5")
step()
print(status("VmHWM:") - before)
"""


def peak_step_bytes(who, case):
    """The rise of a fresh process's peak resident set during its second training step."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # see the module's docstring
    out = subprocess.run([sys.executable, "-c", _PROBE, who, json.dumps(case)], check=True,
                         capture_output=True, text=True, env=env)
    return int(out.stdout.split()[-1])


def model_run(quick=False, json_path=None, out=print, repeats=None):
    """Time the step (minilora, torch + PEFT, the floor) and measure each one's peak memory."""
    import torch

    case = QUICK if quick else FULL
    repeats = repeats or (2 if quick else 5)
    torch.set_num_threads(2)
    tmodel, topt = build_torch(case)
    model, opt = build_minilora(tmodel, case)
    ids = _batch(case)
    contenders = {"floor": floor_step(case), "numba": minilora_step(model, opt, ids),
                  "torch+peft": torch_step(tmodel, topt, torch.as_tensor(ids))}
    result = time_case(contenders, repeats, inner=1)
    tokens = case["batch"] * case["seq"]
    floor_s = result["floor_ms"] / 1e3
    result["tokens_per_s_minilora"] = tokens / (floor_s * result["numba/floor"])
    result["tokens_per_s_torch"] = tokens / (floor_s * result["torch+peft/floor"])
    del contenders, tmodel, topt, model, opt
    mem = {who: peak_step_bytes(who, case) for who in ("minilora", "torch")}
    result["peak_step_bytes_minilora"], result["peak_step_bytes_torch"] = mem["minilora"], \
        mem["torch"]
    result["peak_step_minilora_over_torch"] = mem["minilora"] / mem["torch"]
    result["case"] = case
    name = ("LLaMA d={hidden_size} L={num_hidden_layers} H={num_attention_heads}/"
            "{num_key_value_heads} F={intermediate_size} V={vocab_size} B={batch}x{seq} r={r}"
            ).format(**case)
    out(f"LoRA training step (forward, loss, backward, AdamW), fp32: {name}")
    out(f"{'minilora/floor':>16}{'torch/floor':>14}{'minilora/torch':>16}{'floor ms':>10}"
        f"{'tok/s minilora':>16}{'tok/s torch':>13}")
    out(f"{result['numba/floor']:16.3f}{result['torch+peft/floor']:14.3f}"
        f"{result['numba/torch+peft']:16.3f}{result['floor_ms']:10.1f}"
        f"{result['tokens_per_s_minilora']:16.0f}{result['tokens_per_s_torch']:13.0f}")
    out(f"peak extra memory of the step (fresh process): minilora "
        f"{mem['minilora'] / 2**20:.1f} MiB, torch + PEFT {mem['torch'] / 2**20:.1f} MiB, "
        f"ratio {result['peak_step_minilora_over_torch']:.3f}")
    if json_path:
        write_atomic(json_path, json.dumps(result, indent=2).encode())
    return result
