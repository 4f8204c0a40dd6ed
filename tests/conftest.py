import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# JAX computes float64 in float32 unless told otherwise; the float64 tests
# and the numerical gradient checks need the real thing.
os.environ.setdefault("JAX_ENABLE_X64", "1")

import hypothesis  # noqa: E402

hypothesis.settings.register_profile(
    "default", deadline=None, max_examples=60, derandomize=True, database=None
)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
