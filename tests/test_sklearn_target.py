"""scikit-learn MLPs as targets: converted from coefs_/intercepts_, reconstructed exactly, predictions compared."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier, MLPRegressor

import onlynorm
from onlynorm import Box
from onlynorm.errors import InvalidTargetError, OnlyNormError, UnsupportedActivationError
from onlynorm.targets.sklearn import predict, predict_proba, spec_from_sklearn


def _fit(model, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(X, y)


@pytest.fixture(scope="module")
def digits_model():
    X, y = load_digits(return_X_y=True)
    return _fit(MLPClassifier(hidden_layer_sizes=(12,), max_iter=60, random_state=0), X, y), X


def test_digits_classifier_reconstructed_exactly(digits_model):
    model, X = digits_model
    assert model.score(X, model.predict(X)) == 1.0 and len(model.classes_) == 10
    box = Box(0.0, 16.0)  # the digits' pixel range
    f = onlynorm.reconstruct(model, domain=box, seed=0)
    assert f.target_dims == [64, 12, 10]
    report = onlynorm.verify(f, model, samples=3000)
    assert report.passed and report.max_rel_error < 1e-11
    assert report.prediction_agreement == 1.0 and report.max_proba_error < 1e-9
    # on the real digits too: the same predictions and probabilities as scikit-learn's own
    with torch.no_grad():
        logits = f(torch.as_tensor(X, dtype=torch.float64)).numpy()
    np.testing.assert_array_equal(predict(model, logits), model.predict(X))
    np.testing.assert_allclose(predict_proba(model, logits), model.predict_proba(X), atol=1e-9, rtol=0)


def test_spec_is_the_transposed_coefficients(digits_model):
    model, X = digits_model
    spec = spec_from_sklearn(model)
    assert spec.dims == [64, 12, 10] and spec.dtype == torch.float64
    assert torch.equal(spec.weights[0], torch.as_tensor(model.coefs_[0].T))
    proba = predict_proba(model, spec(torch.as_tensor(X[:50])).numpy())
    np.testing.assert_allclose(proba, model.predict_proba(X[:50]), atol=1e-13, rtol=0)


def test_verify_catches_another_classifier(digits_model):
    model, X = digits_model
    other = _fit(
        MLPClassifier(hidden_layer_sizes=(12,), max_iter=60, random_state=1), X, load_digits(return_X_y=True)[1]
    )
    f = onlynorm.reconstruct(other, domain=Box(0.0, 16.0))
    report = onlynorm.verify(f, model, samples=2000)
    assert not report.passed
    assert report.prediction_agreement < 0.9 and report.max_proba_error > 0.1


def test_binary_classifier_and_regressor():
    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, (80, 3))
    binary = _fit(MLPClassifier(hidden_layer_sizes=(4,), max_iter=50, random_state=0), X, X[:, 0] > 0)
    reg = _fit(MLPRegressor(hidden_layer_sizes=(5, 4), max_iter=50, random_state=0), X, np.c_[X.sum(1), X[:, 1]])
    for model, dims in ((binary, [3, 4, 1]), (reg, [3, 5, 4, 2])):
        f = onlynorm.reconstruct(model, method="deep", seed=2)
        assert f.target_dims == dims
        report = onlynorm.verify(f, model, samples=2000)
        assert report.passed, report
    assert onlynorm.verify(onlynorm.reconstruct(binary), binary, samples=500).prediction_agreement == 1.0
    reg_report = onlynorm.verify(onlynorm.reconstruct(reg), reg, samples=500)
    assert reg_report.prediction_agreement is None and reg_report.max_predict_error < 1e-12


@pytest.mark.parametrize("activation", ["tanh", "logistic", "identity"])
def test_other_activations_are_refused_in_one_line(activation):
    X = np.random.default_rng(1).uniform(-1, 1, (30, 2))
    model = _fit(MLPRegressor(hidden_layer_sizes=(3,), activation=activation, max_iter=5, random_state=0), X, X[:, 0])
    with pytest.raises(UnsupportedActivationError, match=f"found activation='{activation}'") as info:
        onlynorm.reconstruct(model)
    assert isinstance(info.value, OnlyNormError) and "\n" not in str(info.value)


def test_unfitted_model_is_refused():
    with pytest.raises(InvalidTargetError, match="unfitted"):
        onlynorm.random_normnet(MLPClassifier())
