"""minilora demo: LoRA's claim on this machine, and the fallback data."""

import json
import sys

from minilora.tools import demo
from minilora.tools.cli import main


def test_demo_meets_its_target_and_writes_json(tmp_path, capsys):
    path = tmp_path / "demo.json"
    assert main(["demo", "--json", str(path)]) == 0
    summary = json.loads(path.read_text())
    full, lora = summary["full"], summary["lora"]
    assert lora["trainable_params"] <= 0.10 * full["trainable_params"]
    assert lora["accuracy"] >= full["accuracy"] - 0.03
    assert summary["frozen"]["accuracy"] < lora["accuracy"] - 0.5  # the shift is real
    out = capsys.readouterr().out
    assert "epoch" in out and "LoRA r=8" in out and "full fine-tuning" in out


def test_generated_data_when_scikit_learn_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    X, y, source = demo.load_digits()
    assert source.startswith("generated") and X.shape == (1800, 64) and set(y) == set(range(10))
    lines = []
    results = demo.run(epochs=3, out=lines.append)
    assert results["data"].startswith("generated") and "generated" in lines[0]


def test_model_demo_quick_runs_and_reports(tmp_path, capsys):
    """minilora demo --model --quick: every stage runs; LoRA trains a small share of the
    parameters; full fine-tuning lowers the prose loss it starts from."""
    path = tmp_path / "model.json"
    assert main(["demo", "--model", "--quick", "--json", str(path)]) == 0
    summary = json.loads(path.read_text())
    res = summary["results"]
    assert set(res) == {"pretrained", "full fine-tuning", "LoRA r=2"}
    assert res["LoRA r=2"]["trainable_params"] < 0.1 * res["full fine-tuning"]["trainable_params"]
    assert res["full fine-tuning"]["prose_loss"] < res["full fine-tuning"]["prose_loss_before"]
    assert summary["curves"]["pretrain"][-1] < summary["curves"]["pretrain"][0]
    out = capsys.readouterr().out
    assert "quick mode" in out and "what each writes" in out


def test_quick_without_model_is_refused(capsys):
    assert main(["demo", "--quick"]) == 2
    assert "--model" in capsys.readouterr().err
