"""PEFT adapter folders: our own round trip, refusals and task types. Reading and writing
them with PEFT itself (from_pretrained, save_pretrained) is in tests/test_peft_parity.py."""

import json
import os
import tempfile
from unittest import mock

import numpy as np
import pytest
from _helpers import assert_adapters_equal, peft_layers
from hypothesis import given
from hypothesis import strategies as st

import minilora as ml


@pytest.mark.parametrize("use_dora", [False, True])
def test_own_round_trip_keeps_everything(tmp_path, use_dora):
    layers = peft_layers(use_dora=use_dora, use_rslora=True)
    ml.peft.save_adapter(tmp_path, layers)
    loaded = ml.peft.load_adapter(tmp_path)
    assert_adapters_equal(loaded, layers)
    assert all(a.use_dora == use_dora for a in loaded.values())


def test_bad_folders_raise_adapter_error(tmp_path):
    with pytest.raises(ml.peft.AdapterError, match="cannot read"):
        ml.peft.load_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    with pytest.raises(ml.peft.AdapterError, match="not LORA"):
        ml.peft.load_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2}')
    from minilora.formats import safetensors

    safetensors.save(tmp_path / "adapter_model.safetensors",
                     {"base_model.model.q.lora_A.weight": np.zeros((2, 4), np.float32)})
    with pytest.raises(ml.peft.AdapterError, match="lacks lora_A or lora_B"):
        ml.peft.load_adapter(tmp_path)


# One validation for save and load: a folder that save_adapter writes loads back equal, and an
# adapter whose folder load_adapter would refuse is refused by save_adapter, with the same class.

_NAMES = ["q", "v", "x.q", "layers.0.q_proj", "q(", "a*b", "(a+)+", "a\nb", "é", "q" * 600]


@st.composite
def _adapter_sets(draw):
    use_dora = draw(st.booleans())
    use_rslora = draw(st.booleans())
    names = draw(st.lists(st.sampled_from(_NAMES), min_size=1, max_size=3, unique=True))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    adapters = {}
    for name in names:
        r, d_in, d_out = (draw(st.integers(1, 3)) for _ in range(3))
        rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        A = rng.standard_normal((r, d_in)).astype(dtype)
        B = rng.standard_normal((d_out, r)).astype(dtype)
        if draw(st.integers(0, 9)) == 0:
            A[0, 0] = draw(st.sampled_from([np.nan, np.inf]))
        m = None
        if use_dora:
            m = rng.uniform(0.5, 2, d_out + draw(st.sampled_from([0, 0, 0, 1]))).astype(dtype)
        alpha = draw(st.sampled_from([1.0, 2.5, 8, 16.0]))
        adapters[name] = ml.peft.Adapter(A, B, alpha, use_rslora, False, use_dora, m)
    task_type = draw(st.sampled_from([None, "CAUSAL_LM", "SEQ_CLS", "causal_lm", "LM"]))
    return adapters, task_type


def _outcome(call):
    try:
        return call(), None
    except Exception as e:  # the class is what is compared
        return None, type(e)


@given(_adapter_sets())
def test_save_refuses_exactly_what_load_refuses(case):
    adapters, task_type = case
    with tempfile.TemporaryDirectory() as tmp:
        unchecked, checked = os.path.join(tmp, "unchecked"), os.path.join(tmp, "checked")
        with mock.patch.object(ml.peft, "_check_config", lambda config, where: config), \
                mock.patch.object(ml.peft, "_check_tensors", lambda *args: None), \
                mock.patch.object(ml.peft, "_check_round_trip", lambda *args: None):
            _, unchecked_error = _outcome(
                lambda: ml.peft.save_adapter(unchecked, adapters, task_type=task_type))
        _, save_error = _outcome(
            lambda: ml.peft.save_adapter(checked, adapters, task_type=task_type))
        if unchecked_error is not None:  # refused before any file check: the same refusal
            assert save_error is unchecked_error
            return
        _, load_error = _outcome(lambda: ml.peft.load_adapter(unchecked))
        if save_error is not None and load_error is None:
            # save refuses a folder that would load as other adapters (a module name that,
            # read as PEFT's pattern, does not match itself alone)
            wrong = ml.peft.load_adapter(unchecked)
            assert issubclass(save_error, ml.peft.AdapterError)
            assert any((wrong[n].r, wrong[n].alpha) != (a.r, float(a.alpha))
                       for n, a in adapters.items())
            assert not os.path.exists(checked)
            return
        assert save_error is load_error, (save_error, load_error)
        if save_error is not None:
            assert issubclass(save_error, ml.peft.AdapterError)
            assert not os.path.exists(checked)
            return
        loaded = ml.peft.load_adapter(checked)
        with open(os.path.join(checked, "adapter_config.json"), encoding="utf-8") as f:
            assert json.load(f)["task_type"] == task_type
    assert_adapters_equal(loaded, adapters)


def test_save_writes_task_type_and_refuses_an_unknown_one(tmp_path):
    layers = peft_layers()
    ml.peft.save_adapter(tmp_path / "a", layers, task_type="CAUSAL_LM")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    assert ml.peft.load_adapter(tmp_path / "a").keys() == layers.keys()
    with pytest.raises(ml.peft.AdapterError, match="task_type must be null or one of"):
        ml.peft.save_adapter(tmp_path / "b", layers, task_type="causal_lm")
    assert not (tmp_path / "b").exists()
    config["task_type"] = "TRANSLATION"
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ml.peft.AdapterError, match="task_type"):
        ml.peft.load_adapter(tmp_path / "a")
