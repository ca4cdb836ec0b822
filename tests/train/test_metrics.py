import numpy as np
import pytest
from sklearn.datasets import load_digits

from fastcluster_cl import metrics


def test_perfect_clustering_up_to_relabelling():
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([5, 5, 3, 3, 9, 9])
    assert metrics.cluster_metrics(y, pred) == {"nmi": 1.0, "acc": 1.0, "ari": 1.0}


def test_acc_hand_made_case():
    # Clusters {0,1,2}->class 0 (2 right), {3,4,5}->class 1 (3 right): best map gives 5/6.
    y = np.array([0, 0, 1, 1, 1, 1])
    pred = np.array([0, 0, 0, 1, 1, 1])
    assert metrics.acc(y, pred) == pytest.approx(5 / 6)


def test_acc_more_clusters_than_classes_leaves_extra_cluster_unmatched():
    y = np.array([0, 0, 1, 1])
    pred = np.array([0, 1, 2, 2])
    assert metrics.acc(y, pred) == pytest.approx(3 / 4)


def test_nmi_and_ari_hand_made_values():
    y = np.array([0, 0, 1, 1])
    pred = np.array([0, 1, 0, 1])  # independent of y
    assert metrics.nmi(y, pred) == pytest.approx(0.0, abs=1e-12)
    assert metrics.ari(y, pred) == pytest.approx(-0.5)


def test_kmeans_on_raw_digits_matches_the_documented_baseline():
    digits = load_digits()
    scores = metrics.kmeans_metrics(digits.data, digits.target, 10, seed=0)
    # k-means on raw digits pixels gives NMI 0.74, ACC 0.79, ARI 0.67 (README's baseline).
    assert scores["nmi"] == pytest.approx(0.74, abs=0.03)
    assert scores["acc"] == pytest.approx(0.79, abs=0.06)
    assert scores["ari"] == pytest.approx(0.67, abs=0.04)


@pytest.mark.parametrize(
    "y_true,y_pred,error",
    [
        ([0, 1], [0], ValueError),
        ([], [], ValueError),
        ([0.5, 1.0], [0, 1], TypeError),
    ],
)
def test_bad_labels_raise(y_true, y_pred, error):
    with pytest.raises(error):
        metrics.nmi(np.array(y_true), np.array(y_pred))


def test_kmeans_rejects_bad_cluster_count():
    with pytest.raises(ValueError, match="n_clusters"):
        metrics.kmeans_metrics(np.zeros((4, 2)), [0, 1, 0, 1], 1)
