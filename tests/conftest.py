"""Hypothesis profiles: ``dev`` (the default, fast) and ``ci`` (more examples, no deadline,
derandomized so a CI run is reproducible). Choose with HYPOTHESIS_PROFILE=ci."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=30, deadline=None)
settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
