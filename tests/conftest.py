"""Hypothesis profiles: ``dev`` (the default, fast) and ``ci`` (more examples, no deadline,
derandomized so a CI run is reproducible). Choose with HYPOTHESIS_PROFILE=ci."""

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=30, deadline=None)
settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture
def float64_transformers(monkeypatch):
    """transformers' LLaMA, Qwen2 and Mistral code with float32 meaning float64.

    Even in a float64 model transformers computes some steps in float32 (RMSNorm's
    ``.to(torch.float32)``, the rotary tables, the eager softmax's ``dtype=torch.float32``). With
    the ``torch`` name of those modules pointing at a proxy whose float32 is float64, their own
    lines run in float64, so a float64 comparison measures the math, not float32's rounding.
    """
    import types

    torch = pytest.importorskip("torch")
    from transformers import modeling_rope_utils
    from transformers.models.llama import modeling_llama
    from transformers.models.mistral import modeling_mistral
    from transformers.models.qwen2 import modeling_qwen2

    class Float64Torch(types.ModuleType):
        float32 = torch.float64
        float = torch.float64

        def __getattr__(self, name):
            return getattr(torch, name)

    proxy = Float64Torch("torch")
    for module in (modeling_llama, modeling_qwen2, modeling_mistral, modeling_rope_utils):
        monkeypatch.setattr(module, "torch", proxy)
