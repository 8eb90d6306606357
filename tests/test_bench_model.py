"""minilora bench --model: both sides run the same model, and the figures are written."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from minilora.tools import bench_model  # noqa: E402
from minilora.tools.cli import main  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers, inside PEFT


def test_both_sides_hold_the_same_model_and_take_the_same_step():
    case = bench_model.QUICK
    tmodel, topt = bench_model.build_torch(case)
    model, opt = bench_model.build_minilora(tmodel, case)
    ids = bench_model._batch(case)
    with torch.no_grad():
        expected = tmodel(input_ids=torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(model.forward(ids)[0], expected, rtol=0, atol=1e-5)
    bench_model.torch_step(tmodel, topt, torch.as_tensor(ids))()
    bench_model.minilora_step(model, opt, ids)()  # one AdamW step on each side: still equal
    with torch.no_grad():
        expected = tmodel(input_ids=torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(model.forward(ids)[0], expected, rtol=0, atol=1e-4)


def test_bench_model_quick_writes_its_figures(tmp_path, capsys):
    path = tmp_path / "model.json"
    assert main(["bench", "--model", "--quick", "--json", str(path)]) == 0
    figures = json.loads(path.read_text())
    for key in ("numba/floor", "torch+peft/floor", "numba/torch+peft", "tokens_per_s_minilora",
                "tokens_per_s_torch"):
        assert figures[key] > 0
    # a tiny step may fit in pages the process already had: the peak may rise by 0 bytes
    assert figures["peak_step_bytes_minilora"] >= 0 and figures["peak_step_bytes_torch"] > 0
    assert "minilora/torch" in capsys.readouterr().out


def test_bench_model_refuses_no_torch(capsys):
    assert main(["bench", "--model", "--no-torch"]) == 2
    assert "needs torch" in capsys.readouterr().err
