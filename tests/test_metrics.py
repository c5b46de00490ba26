"""Pass@k against the binomial formula, and the run logger's outputs."""

import io
import json
from math import comb

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from uecjax.metrics import RunLogger, pass_at_k, pass_at_k_table


@pytest.mark.parametrize("n", [1, 4, 8, 20])
def test_pass_at_k_equals_binomial_formula(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            expected = 1 - comb(n - c, k) / comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_1_is_the_success_rate_and_table_averages_prompts():
    correct = np.array([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    table = pass_at_k_table(correct)
    assert set(table) == {"pass@1", "pass@2", "pass@4"}
    assert table["pass@1"] == pytest.approx(correct.mean())
    assert table["pass@4"] == pytest.approx(2 / 3)
    assert table["pass@2"] == pytest.approx((0.5 + 1 + 0) / 3)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)


def test_run_logger_writes_jsonl_tensorboard_and_console(tmp_path):
    out = io.StringIO()
    logger = RunLogger(str(tmp_path), console=out)
    logger.scalars(3, {"reward": np.float32(0.5), "entropy": 1.25, "nan": float("nan"), "text": "x",
                       "eval/pass@4": 0.75})
    logger.progress(3, 10, {"reward": 0.5, "entropy": 1.25, "pass@1": 0.4, "tokens_per_s": 1234.5})
    logger.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows[0]["step"] == 3 and rows[0]["reward"] == 0.5 and "nan" not in rows[0] and "text" not in rows[0]
    line = out.getvalue()
    assert "step 3/10" in line and "reward 0.5" in line and "pass@1 0.4" in line and "tok/s 1234" in line
    scalars = {}
    for path in (tmp_path / "tensorboard").iterdir():
        for event in read_events(path):
            for value in event.summary.value:
                scalars[value.tag] = (event.step, value.simple_value)
    assert scalars == {"reward": (3, 0.5), "entropy": (3, 1.25), "eval/pass_at_4": (3, 0.75)}


def read_events(path):
    """Parses a TensorBoard event file (TFRecord framing: length, crc, payload, crc)."""
    data = open(path, "rb").read()
    offset = 0
    while offset < len(data):
        length = int.from_bytes(data[offset:offset + 8], "little")
        payload = data[offset + 12:offset + 12 + length]
        offset += 12 + length + 4
        yield event_pb2.Event.FromString(payload)
