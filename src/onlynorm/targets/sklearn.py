"""scikit-learn targets: a fitted ``MLPClassifier``/``MLPRegressor`` with ``activation="relu"`` as an :class:`MLPSpec`.

scikit-learn stores layer ``i`` as ``coefs_[i]`` of shape ``(n_in, n_out)`` and ``intercepts_[i]``; the target
weight is its transpose. The reconstructed map is the network *before* its output activation: the regressor's
identity output, and the classifier's logits — the softmax (multi-class) or logistic (binary, multi-label) that
``predict_proba`` applies on top is not a ReLU layer and is not part of the reconstruction. Apply
:func:`predict_proba` / :func:`predict` to a reconstructed network's outputs to get the classifier's answers;
:func:`onlynorm.verify` does so and compares them with the model's own.

scikit-learn is only touched through the fitted model's attributes, so this module imports without it.

>>> import warnings
>>> import numpy as np
>>> from sklearn.neural_network import MLPRegressor
>>> X = np.random.default_rng(0).uniform(-1, 1, (40, 3))
>>> with warnings.catch_warnings():
...     warnings.simplefilter("ignore")
...     model = MLPRegressor(hidden_layer_sizes=(5,), max_iter=20, random_state=0).fit(X, X.sum(1))
>>> spec_from_sklearn(model).dims
[3, 5, 1]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import InvalidTargetError, UnsupportedActivationError
from .mlp import MLPSpec

__all__ = ["is_sklearn_mlp", "spec_from_sklearn", "predict", "predict_proba"]

_MLP_CLASSES = ("MLPClassifier", "MLPRegressor")


def is_sklearn_mlp(obj: Any) -> bool:
    """True for an instance of scikit-learn's ``MLPClassifier`` or ``MLPRegressor`` (fitted or not).

    >>> is_sklearn_mlp(object())
    False
    """
    return any(
        base.__module__.startswith("sklearn.neural_network") and base.__name__ in _MLP_CLASSES
        for base in type(obj).__mro__
    )


def is_classifier(model: Any) -> bool:
    """True for an ``MLPClassifier`` (its outputs are logits), False for an ``MLPRegressor``."""
    return getattr(model, "out_activation_", "identity") != "identity"


def spec_from_sklearn(model: Any) -> MLPSpec:
    """The ``MLPSpec`` of a fitted ReLU ``MLPClassifier``/``MLPRegressor``, in float64 (pre-output-activation map).

    Parameters
    ----------
    model
        A fitted ``sklearn.neural_network.MLPClassifier`` or ``MLPRegressor`` with ``activation="relu"``.

    Returns
    -------
    MLPSpec
        Weights ``coefs_[i].T`` and biases ``intercepts_[i]``: the classifier's logits, the regressor's output.

    Raises
    ------
    UnsupportedActivationError
        ``activation`` is not ``"relu"``.
    InvalidTargetError
        The model is not fitted.
    """
    name = type(model).__name__
    activation = getattr(model, "activation", None)
    if activation != "relu":
        raise UnsupportedActivationError(
            f"{name}: expected activation='relu', found activation={activation!r}; onlynorm reconstructs ReLU "
            "networks only — refit the model with activation='relu'"
        )
    coefs, intercepts = getattr(model, "coefs_", None), getattr(model, "intercepts_", None)
    if coefs is None or intercepts is None:
        raise InvalidTargetError(
            f"{name}: expected a fitted model (with coefs_ and intercepts_), found an unfitted "
            "one; call model.fit(X, y) first"
        )
    weights = tuple(torch.as_tensor(np.asarray(c, dtype=np.float64).T.copy()) for c in coefs)
    biases = tuple(torch.as_tensor(np.asarray(b, dtype=np.float64).copy()) for b in intercepts)
    return MLPSpec(weights, biases)


def predict_proba(model: Any, logits: np.ndarray) -> np.ndarray:
    """The classifier's ``predict_proba`` computed from logits (e.g. a reconstructed network's outputs).

    Multi-class: softmax; binary: ``[1 − σ, σ]``; multi-label: ``σ`` per label.
    """
    z = np.asarray(logits, dtype=np.float64)
    if model.out_activation_ == "softmax":
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    if model.out_activation_ != "logistic":
        raise InvalidTargetError(
            f"{type(model).__name__} has no predict_proba (output activation "
            f"{model.out_activation_!r}); expected a classifier"
        )
    p = 1.0 / (1.0 + np.exp(-z))
    return np.hstack([1.0 - p, p]) if p.shape[1] == 1 and len(model.classes_) == 2 else p


def predict(model: Any, logits: np.ndarray) -> np.ndarray:
    """The model's ``predict`` computed from its pre-activation outputs ``logits``."""
    z = np.asarray(logits, dtype=np.float64)
    if not is_classifier(model):
        return z.ravel() if z.shape[1] == 1 else z
    proba = predict_proba(model, z)
    if model.out_activation_ == "softmax":
        return model.classes_[proba.argmax(axis=1)]
    if z.shape[1] == 1 and len(model.classes_) == 2:  # binary: LabelBinarizer's 0.5 threshold
        return model.classes_[(proba[:, 1] > 0.5).astype(int)]
    return (proba > 0.5).astype(int)  # multi-label indicator matrix


def compare_predictions(model: Any, x: np.ndarray, outputs: np.ndarray) -> dict[str, float | None]:
    """Compare ``model``'s own ``predict``/``predict_proba`` on ``x`` with those computed from ``outputs`` (a
    reconstructed network's values at ``x``).

    Returns ``prediction_agreement`` (fraction of samples with the same ``predict``; classifiers),
    ``max_proba_error`` (``max |Δ predict_proba|``; classifiers) and ``max_predict_error``
    (``max |Δ predict|``; regressors); the entries that do not apply are ``None``.
    """
    x = np.asarray(x, dtype=np.float64)
    if not is_classifier(model):
        mine = predict(model, outputs)
        theirs = np.asarray(model.predict(x), dtype=np.float64).reshape(mine.shape)
        return {
            "prediction_agreement": None,
            "max_proba_error": None,
            "max_predict_error": float(np.abs(mine - theirs).max()),
        }
    same = predict(model, outputs) == model.predict(x)
    agreement = float((same.all(axis=1) if same.ndim == 2 else same).mean())
    proba_error = float(np.abs(predict_proba(model, outputs) - model.predict_proba(x)).max())
    return {"prediction_agreement": agreement, "max_proba_error": proba_error, "max_predict_error": None}
