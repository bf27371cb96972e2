"""Analysis of the monitor's curves against NumPy and hand-made curves with known answers."""

import numpy as np
import pytest

from umm_jax import overfitting

SIGNALS = ("knn", "linear", "rate_reduction")  # umm_jax.monitor.SIGNALS


@pytest.mark.parametrize("n", [2, 3, 7, 40])
def test_pearson_matches_numpy(n):
  rng = np.random.default_rng(n)
  x, y = rng.normal(size=n), rng.normal(size=n)
  y_related = 0.7 * x + 0.3 * y
  for a, b in [(x, y), (x, y_related), (y_related, x)]:
    np.testing.assert_allclose(overfitting.pearson(a, b), np.corrcoef(a, b)[0, 1], rtol=1e-12)
  # Invariant to a positive affine map of either curve; flips sign under a negative one.
  np.testing.assert_allclose(
    overfitting.pearson(3 * x + 1, y), overfitting.pearson(x, y), rtol=1e-12
  )
  np.testing.assert_allclose(overfitting.pearson(-x, y), -overfitting.pearson(x, y), rtol=1e-12)


def test_pearson_is_nan_where_undefined_and_checks_shapes():
  assert np.isnan(overfitting.pearson([1.0], [2.0]))
  assert np.isnan(overfitting.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
  assert np.isnan(overfitting.pearson([1.0, np.nan, 2.0], [1.0, 2.0, 3.0]))
  with pytest.raises(ValueError, match=r"\(3,\), \(2,\)"):
    overfitting.pearson([1, 2, 3], [1, 2])


def test_normalize_divides_by_the_maximum():
  np.testing.assert_allclose(overfitting.normalize([0.2, 0.5, 0.4]), [0.4, 1.0, 0.8])
  out = overfitting.normalize([np.nan, 2.0, 4.0])
  assert np.isnan(out[0]) and np.allclose(out[1:], [0.5, 1.0])
  for bad in ([0.0, -1.0], [np.nan, np.nan]):
    with pytest.raises(ValueError, match="positive maximum"):
      overfitting.normalize(bad)


def test_peak_and_early_stopping_on_hand_made_curves():
  # Accuracy peaks at checkpoint 2 then declines (overfitting); ΔR peaks one checkpoint late.
  accuracy = [0.50, 0.70, 0.80, 0.75, 0.74]
  delta = [1.0, 2.0, 2.4, 2.5, 2.45]
  assert overfitting.peak(accuracy) == 2 and overfitting.peak(delta) == 3
  assert overfitting.peak([1.0, 3.0, 3.0]) == 1  # ties: the first (earliest) checkpoint
  assert overfitting.peak([np.nan, 1.0, 0.5]) == 1
  stop = overfitting.early_stopping(delta, accuracy)
  assert (stop["chosen"], stop["best"], stop["final"]) == (3, 2, 4)
  np.testing.assert_allclose(
    [stop["chosen_accuracy"], stop["best_accuracy"], stop["final_accuracy"], stop["gap"]],
    [0.75, 0.80, 0.74, 0.05],
  )
  # ΔR and accuracy peak together: the label-free choice is the best checkpoint.
  same = overfitting.early_stopping([1.0, 3.0, 2.0], [0.6, 0.9, 0.8])
  assert same["chosen"] == same["best"] == 1 and same["gap"] == 0
  with pytest.raises(ValueError, match="not NaN"):
    overfitting.peak([np.nan])


def hand_made_result(signals=SIGNALS) -> dict:
  """Two layers over five checkpoints: layer1 rises and stays, layer4 rises then falls."""
  epochs = [5, 10, 15, 20, 25]
  values = {
    "layer1": dict(knn_top1=[0.4, 0.5, 0.55, 0.55, 0.55], delta=[1.0, 1.5, 1.6, 1.6, 1.59]),
    "layer4": dict(knn_top1=[0.5, 0.7, 0.8, 0.72, 0.7], delta=[2.0, 3.0, 3.5, 3.6, 3.1]),
  }
  for layer in values.values():
    layer["linear_top1"] = [v + 0.05 for v in layer["knn_top1"]]
  keep = {"knn": ["knn_top1"], "linear": ["linear_top1"], "rate_reduction": ["delta"]}
  kept = [k for s in signals for k in keep[s]]
  checkpoints = {}
  for i, epoch in enumerate(epochs):
    layers = {layer: {k: v[k][i] for k in kept} for layer, v in values.items()}
    seconds = {"features": 1.0, "knn": 0.5, "linear": 2.0, "rate_reduction": 0.2}
    checkpoints[str(4 * epoch)] = dict(step=4 * epoch, epoch=epoch, layers=layers, seconds=seconds)
  protocol = {"layers": list(values), "signals": list(signals)}
  return dict(protocol=protocol, encoder="checkpoints", checkpoint_dir="x", checkpoints=checkpoints)


def test_analyse_hand_made_result():
  result = hand_made_result()
  curves = overfitting.curves(result)
  np.testing.assert_array_equal(curves["epoch"], [5, 10, 15, 20, 25])
  np.testing.assert_array_equal(curves["step"], [20, 40, 60, 80, 100])
  assert np.isnan(curves["layers"]["layer1"]["rate"]).all()  # not recorded: NaN
  analysis = overfitting.analyse(result)
  last = analysis["layer4"]
  assert last["peak"]["knn_top1"] == 2 and last["peak"]["delta"] == 3
  acc, delta = curves["layers"]["layer4"]["linear_top1"], curves["layers"]["layer4"]["delta"]
  np.testing.assert_allclose(last["pearson"]["linear"], np.corrcoef(acc, delta)[0, 1], rtol=1e-12)
  assert last["early_stopping"]["knn"]["chosen"] == 3
  np.testing.assert_allclose(last["early_stopping"]["knn"]["gap"], 0.08)
  assert analysis["layer1"]["peak"]["knn_top1"] == 2  # the first of the plateau
  only_delta = overfitting.analyse(hand_made_result(signals=("rate_reduction",)))
  assert only_delta["layer4"]["pearson"] == {} and only_delta["layer4"]["peak"] == {"delta": 3}
