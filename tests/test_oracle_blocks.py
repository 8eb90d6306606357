"""The oracle on the fused blocks: honest candidates pass at every precision, planted bugs of
the kinds real block kernels have fail, the activation bounds hold, files and the CLI work."""

import numpy as np
import pytest

from minilora import oracle
from minilora.ops import blocks
from minilora.oracle.block_cases import ACTIVATION_BOUNDS
from minilora.oracle.cases import emulate
from minilora.tools.cli import main

BLOCK_OPTIONS = [dict(block="qkv"), dict(block="qkv", bias=True, dropout=0.1),
                 dict(block="mlp"), dict(block="mlp", activation="gelu", bias=True, dropout=0.1),
                 dict(block="mlp", activation="gelu_tanh", rslora=True),
                 dict(block="multi"), dict(block="multi", bias=True, dropout=0.1,
                                           fan_in_fan_out=True, adapters=5)]


def test_the_activation_bounds_bound_the_derivatives():
    e = np.linspace(-30, 30, 2_000_001)
    h = 1e-4
    for activation, (L1, L2) in ACTIVATION_BOUNDS.items():
        _, d1 = blocks.activation_derivative(e, activation)
        d2 = (blocks.activation_derivative(e + h, activation)[1]
              - blocks.activation_derivative(e - h, activation)[1]) / (2 * h)
        assert np.max(np.abs(d1)) <= L1 and np.max(np.abs(d2)) <= L2, activation
        assert np.max(np.abs(d1)) > 0.97 * L1 and np.max(np.abs(d2)) > 0.9 * L2  # and are tight
        assert np.all(np.abs(blocks.activation_forward(e, activation)) <= np.abs(e))


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32", "fp64"])
@pytest.mark.parametrize("options", BLOCK_OPTIONS)
def test_honest_block_candidates_pass_and_planted_bugs_fail(dtype, options):
    case = oracle.make_case(d_in=24, d_out=20, r=4, batch=3, seq=5, dtype=dtype, seed=1,
                            **options)
    judge = oracle.Judge(case, dtype)
    for backend in ("numpy", "numba"):
        report = judge.compare(emulate(case, dtype, backend=backend))
        assert report.passed, str(report)
    good = emulate(case, dtype, backend="numba")
    for name in good:
        if name.startswith(("dA", "dB", "y", "dx")):
            assert not judge.compare({**good, name: good[name] * 0.5}).passed, name


def _outputs(case, **changes):
    """The case's float64 outputs with the block run on changed inputs (a bug's effect)."""
    t = {**case.tensors, **changes}
    return oracle.reference(case.with_tensors(t))


def test_block_bugs_real_kernels_have_are_caught():
    # qkv: dx summed over two of the three projections
    case = oracle.make_case(block="qkv", d_in=32, d_out=32, r=4, batch=2, seq=8, dtype="bf16")
    good = emulate(case, "bf16")
    t = {k: v.astype(np.float64) for k, v in case.tensors.items()}
    x, dys = t["x"], [t[f"dy.{j}"] for j in range(3)]
    _, cache = blocks.lora_qkv_forward(x, [t[f"W.{j}"] for j in range(2)],
                                       [t[f"A.{j}"] for j in range(2)],
                                       [t[f"B.{j}"] for j in range(2)], scaling=case.scaling[:2])
    partial = blocks.lora_qkv_backward(dys[:2], cache).dx
    assert not oracle.compare(case, {**good, "dx": partial}).passed
    # mlp: SiLU's derivative used for GELU (the forward right, the backward of another act)
    case = oracle.make_case(block="mlp", activation="gelu", d_in=32, d_out=32, r=4, batch=2,
                            seq=8, dtype="bf16")
    wrong = oracle.reference(oracle.Case(case.tensors, case.scaling, block="mlp",
                                         activation="silu", input_precision="bf16"))
    good = emulate(case, "bf16")
    assert not oracle.compare(case, {**good, "dx": wrong["dx"], "dA.0": wrong["dA.0"]}).passed
    # multi: each token's adapter shifted by one (an off-by-one in the segment offsets)
    case = oracle.make_case(block="multi", d_in=32, d_out=24, r=4, batch=2, seq=8,
                            dtype="bf16")
    index = case.tensors["adapter_index"]
    shifted = _outputs(case, adapter_index=np.where(index >= 0, (index + 1) % 3, -1))
    assert not oracle.compare(case, {**emulate(case, "bf16"), "y": shifted["y"]},
                              outputs=["y"]).passed


def test_block_cases_round_trip_through_files_and_the_cli(tmp_path, capsys):
    for block in ("qkv", "mlp", "multi"):
        path, ref = tmp_path / f"{block}.safetensors", tmp_path / f"{block}.ref.npz"
        assert main(["oracle", "case", "--block", block, "--d-in", "16", "--d-out", "12",
                     "--r", "2", "--bias", "--dropout", "0.2", "--dtype", "bf16", "--seed",
                     "3", "-o", str(path)]) == 0
        case = oracle.load_case(path)
        assert case.block == block and len(case.scaling) >= 2
        assert main(["oracle", "reference", str(path), "-o", str(ref)]) == 0
        assert main(["oracle", "compare", str(path), str(ref), "--dtype", "fp64"]) == 0
        out = oracle.load_outputs(ref, case)
        name = next(k for k in out if k.startswith("dA"))
        oracle.save_outputs(tmp_path / "bad.npz", {**out, name: out[name] * 1.1})
        assert main(["oracle", "compare", str(path), str(tmp_path / "bad.npz"),
                     "--dtype", "fp64"]) == 1
    capsys.readouterr()
    assert main(["oracle", "case", "--block", "mlp", "--dora", "--d-in", "4", "--d-out", "4",
                 "--r", "1", "--seed", "0", "-o", str(tmp_path / "x.npz")]) == 2
    assert "neither dora" in capsys.readouterr().err


def test_a_block_file_with_mismatched_metadata_is_refused(tmp_path):
    case = oracle.make_case(block="multi", d_in=8, d_out=6, r=2, batch=2, seq=3)
    oracle.save_case(tmp_path / "c.npz", case)
    oracle.load_case(tmp_path / "c.npz")
    bad = oracle.Case(case.tensors, case.scaling[:2], block="multi")
    from minilora.oracle.files import write_tensors
    write_tensors(tmp_path / "short.npz", case.tensors, bad.metadata())
    with pytest.raises(oracle.OracleInputError, match="list of 3 finite numbers"):
        oracle.load_case(tmp_path / "short.npz")
    t = dict(case.tensors, adapter_index=case.tensors["adapter_index"].astype(np.float32))
    write_tensors(tmp_path / "float_index.npz", t, case.metadata())
    with pytest.raises(oracle.OracleInputError, match="adapter_index"):
        oracle.load_case(tmp_path / "float_index.npz")
    t = dict(case.tensors)
    t["dy.0"] = t.pop("dy")
    write_tensors(tmp_path / "mixed.npz", t, case.metadata())
    with pytest.raises(oracle.OracleInputError):
        oracle.load_case(tmp_path / "mixed.npz")
