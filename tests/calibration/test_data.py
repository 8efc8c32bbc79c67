"""The bundled text: calibration and evaluation topics are disjoint and non-trivial."""
from prefixquant_kernels import data


def test_calibration_and_evaluation_text_are_disjoint():
    calib_keys, eval_keys = data.split_keys()
    assert not set(calib_keys) & set(eval_keys) and len(eval_keys) >= 10
    calib, ev = data.calibration_texts(), data.evaluation_text()
    assert len(ev) > 50_000 and sum(map(len, calib)) > 150_000
    assert not any(t in ev for t in calib if len(t) > 200)
