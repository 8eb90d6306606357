"""The package's layout: the module paths from before the packages import the moved modules
themselves (minilora._moved), and the public names stay where API.md puts them."""

import importlib

import pytest

import minilora as ml
from minilora import _moved


@pytest.mark.parametrize("old", sorted(_moved.MOVED))
def test_an_old_module_path_is_the_moved_module(old):
    new = importlib.import_module(_moved.new_name(f"minilora.{old}"))
    assert importlib.import_module(f"minilora.{old}") is new
    assert new.__spec__.name == new.__name__ == _moved.new_name(f"minilora.{old}")


def test_importing_every_old_path_leaves_the_packages_names_alone():
    for old in _moved.MOVED:
        importlib.import_module(f"minilora.{old}")
    assert callable(ml.gradcheck) and ml.gradcheck.__module__ == "minilora.ops.gradcheck"
    assert callable(ml.lora_forward) and ml.LoRALinear.__module__ == "minilora.toolkit.layer"


def test_public_names_stay_where_the_contract_puts_them():
    from minilora.peft import load_adapter, save_adapter

    assert ml.peft.load_adapter is load_adapter and ml.peft.save_adapter is save_adapter
    assert ml.peft.__name__ == "minilora.formats.peft"
    assert ml.oracle.compare is importlib.import_module("minilora.oracle.judge").compare
    assert ml.models.from_pretrained is importlib.import_module(
        "minilora.models.pretrained").from_pretrained


def test_names_that_never_existed_still_fail():
    assert _moved.new_name("minilora.nonsense") is None
    assert _moved.new_name("numpy.peft") is None
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("minilora.nonsense")
