"""PipelineConfig refuses, before any work, values that would make every row an error row."""
import numpy as np
import pytest

from pipeline import PipelineConfig


@pytest.mark.parametrize("setting, message", [
    (dict(top_k=2.5), "top_k must be an integer, got 2.5"), (dict(seed=1.5), "seed must be an integer"),
    (dict(max_new_tokens=True), "max_new_tokens must be an integer"), (dict(batch_size="8"), "batch_size must be"),
    (dict(num_beams=2, length_penalty=float("nan")), "length_penalty must be a finite number"),
    (dict(step_timeout_s=float("nan")), "step_timeout_s must be >= 0"),
])
def test_values_every_row_would_fail_on_are_refused(setting, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig(model="m", **setting)


def test_numpy_integers_are_integers():
    config = PipelineConfig(model="m", max_new_tokens=np.int64(5), seed=np.int32(3))
    assert (type(config.max_new_tokens), type(config.seed)) == (int, int)
