"""Configuration: one set of defaults, loaded from YAML, typos rejected."""

from pathlib import Path

import pytest

from pose_estimator.config import EstimatorConfig, load_config
from pose_estimator.solver import SolverConfig

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_yaml_matches_the_dataclass_defaults():
    cfg = load_config(ROOT / "config" / "estimator.yaml")
    assert cfg == EstimatorConfig()


def test_nested_overrides_and_int_to_float(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("mode: rigid\ntemperature: 2\nsolver:\n  robust_loss: huber\n")
    cfg = load_config(p)
    assert cfg.mode == "rigid" and cfg.temperature == 2.0
    assert cfg.solver.robust_loss == "huber"
    assert cfg.solver.max_iterations == SolverConfig().max_iterations


def test_ros_parameter_file_layout_is_accepted(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("pose_estimator:\n  ros__parameters:\n    estimator:\n      mode: rigid\n")
    assert load_config(p).mode == "rigid"


@pytest.mark.parametrize("text,msg", [
    ("mdoe: rigid\n", "unknown key"),
    ("solver:\n  robust_los: huber\n", "unknown key"),
    ("mode: sideways\n", "mode must be"),
    ("temperature: fast\n", "expected float"),
    ("solver:\n  robust_loss: l7\n", "robust_loss must be"),
])
def test_bad_config_is_a_clear_error(tmp_path, text, msg):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ValueError, match=msg):
        load_config(p)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
