"""sk.sklearn: scikit-learn's own estimator checks, GridSearchCV and Pipeline; sk imports without sklearn."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
from sklearn.datasets import make_blobs, make_regression  # noqa: E402
from sklearn.model_selection import GridSearchCV, KFold  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import sk  # noqa: E402
from sk.sklearn import SparseKernelClassifier, SparseKernelRegressor  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# No check is marked as expected to fail: both estimators pass all of scikit-learn 1.9's checks (those
# that need the array API are skipped by scikit-learn itself unless SCIPY_ARRAY_API is set).
EXPECTED_FAILED_CHECKS: dict[str, dict[str, str]] = {}


@parametrize_with_checks([SparseKernelRegressor(), SparseKernelClassifier(), SparseKernelClassifier(normalize=True)],
                         expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS.get(type(est).__name__, {}))
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_grid_search_over_k_matches_a_manual_cross_validation():
    """GridSearchCV picks the k that a hand-written 4-fold cross-validation with sk.sparse_krr picks, with
    the same scores."""
    X, y = make_blobs(n_samples=240, centers=5, n_features=6, cluster_std=3.0, random_state=0)
    ks = [1, 4, 16, 64]
    cv = KFold(4, shuffle=True, random_state=0)
    search = GridSearchCV(SparseKernelClassifier(lengthscale=2.0), {"k": ks}, cv=cv).fit(X, y)
    manual = {}
    for k in ks:
        accs = []
        for fit, val in cv.split(X):
            xf, xv = torch.tensor(X[fit]), torch.tensor(X[val])
            scores = sk.sparse_krr(xv, xf, torch.tensor(y[fit]), k=k, lengthscale=2.0, num_classes=5)
            accs.append(float((scores.argmax(1).numpy() == y[val]).mean()))
        manual[k] = float(np.mean(accs))
    assert np.allclose(search.cv_results_["mean_test_score"], [manual[k] for k in ks])
    assert search.best_params_["k"] == max(ks, key=lambda k: (manual[k], -ks.index(k)))
    assert len(set(manual.values())) > 1                       # the grid matters on this data


def test_pipeline_and_regression_match_the_functional_api():
    X, y = make_regression(n_samples=150, n_features=5, noise=0.5, random_state=1)
    model = make_pipeline(StandardScaler(), SparseKernelRegressor(k=12, kernel="matern52", lengthscale=1.5, ridge=0.1))
    pred = model.fit(X, y).predict(X[:20])
    Xs = StandardScaler().fit(X).transform(X)
    expect = sk.sparse_krr(torch.tensor(Xs[:20]), torch.tensor(Xs), torch.tensor(y), k=12, kernel="matern52",
                           lengthscale=1.5, ridge=0.1)
    assert pred.shape == (20,) and np.allclose(pred, expect.numpy())
    reg = SparseKernelRegressor(k=12).fit(X, np.stack([y, -y], 1))  # multi-output, auto lengthscale
    assert reg.predict(X[:3]).shape == (3, 2)
    assert abs(reg.lengthscale_ - sk.auto_lengthscale(torch.tensor(X), k=12)) < 1e-12


def test_classifier_probabilities_and_string_classes():
    X, y = make_blobs(n_samples=90, centers=3, n_features=4, random_state=2)
    names = np.array(["cat", "dog", "emu"])[y]
    clf = SparseKernelClassifier(k=10).fit(X, names)
    proba = clf.predict_proba(X)
    assert proba.shape == (90, 3) and np.allclose(proba.sum(1), 1) and (proba >= 0).all()
    assert (clf.predict(X) == names).mean() > 0.95
    assert list(clf.classes_) == ["cat", "dog", "emu"]
    far = clf.predict_proba(X[:2] + 1e4)                       # no evidence far from the data: uniform
    assert np.allclose(far, 1 / 3)


def test_sk_imports_with_torch_alone():
    """``import sk`` must not import scikit-learn; the estimators say what is missing."""
    code = ("import sys; sys.modules['sklearn'] = None; import sk, torch; "
            "sk.sparse_krr(torch.randn(3, 2), torch.randn(9, 2), torch.randn(9), k=3); "
            "assert 'sklearn' not in [m for m in sys.modules if sys.modules[m] is not None]; "
            "\ntry:\n    sk.SparseKernelRegressor\nexcept ImportError:\n    print('ok')")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
