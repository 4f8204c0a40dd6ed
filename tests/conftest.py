import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# JAX computes float64 in float32 unless told otherwise; the float64 tests
# and the numerical gradient checks need the real thing.
os.environ.setdefault("JAX_ENABLE_X64", "1")

import hypothesis  # noqa: E402

hypothesis.settings.register_profile(
    "default", deadline=None, max_examples=60, derandomize=True, database=None
)
# .ci/run runs the suite on three backends. The generated cases and the
# formula are the same on each; TensorFlow, the README's test command, tries
# 60 cases per property, and JAX and PyTorch 10 of them, as the CI's time
# allows.
hypothesis.settings.register_profile(
    "other-backends", hypothesis.settings.get_profile("default"), max_examples=10
)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
