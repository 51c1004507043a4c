"""Head calibration (CCVR): class feature statistics, their pooling and wire form, and the
head retrained on virtual features."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, Error, Message, RecordDict

from fedlsc_flwr.calibration import (
    STATISTICS_RECORD_KEY,
    ClassFeatureStatistics,
    StatisticsError,
    calibrate_head,
    class_feature_statistics,
    pool_statistics,
    read_statistics,
    with_calibrated_head,
)
from fedlsc_flwr.wire import array_from_numpy, array_view, site_record

pytestmark = pytest.mark.usefixtures("task_identity")


def _blobs(rng, counts, dim=6, spread=3.0):
    """Gaussian features per class around class centres ``spread`` apart."""
    centres = rng.normal(0, spread, (len(counts), dim))
    x = np.concatenate([centres[c] + rng.normal(0, 1, (n, dim)) for c, n in enumerate(counts)])
    y = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    return x, y, centres


def test_statistics_are_count_mean_and_covariance_per_class_and_small_classes_stay_out():
    rng = np.random.default_rng(0)
    x, y, _ = _blobs(rng, [30, 4, 12])
    stats = class_feature_statistics(x, y, num_classes=4, min_count=5)
    assert stats.counts.tolist() == [30, 0, 12, 0]  # class 1 has 4 < 5 images, class 3 none
    np.testing.assert_allclose(stats.means[0], x[y == 0].mean(axis=0))
    np.testing.assert_allclose(stats.covariances[2], np.cov(x[y == 2].T, bias=True))
    assert not stats.means[1].any() and not stats.covariances[1].any()


def test_pooled_statistics_of_sites_are_those_of_the_union_of_their_images():
    rng = np.random.default_rng(1)
    x, y, _ = _blobs(rng, [40, 25, 33])
    parts = np.array_split(rng.permutation(len(y)), 3)
    pooled = pool_statistics([class_feature_statistics(x[p], y[p], 3) for p in parts])
    whole = class_feature_statistics(x, y, 3)
    np.testing.assert_array_equal(pooled.counts, whole.counts)
    np.testing.assert_allclose(pooled.means, whole.means, atol=1e-12)
    np.testing.assert_allclose(pooled.covariances, whole.covariances, atol=1e-10)


def test_a_class_only_one_site_reports_pools_to_that_site_s_statistics():
    rng = np.random.default_rng(2)
    x, y, _ = _blobs(rng, [20, 20])
    only_class_0 = class_feature_statistics(x[y == 0], y[y == 0], 2)
    both = class_feature_statistics(x, y, 2)
    pooled = pool_statistics([only_class_0, both])
    assert pooled.counts.tolist() == [40, 20]
    np.testing.assert_allclose(pooled.means[1], both.means[1])
    np.testing.assert_allclose(pooled.covariances[1], both.covariances[1], atol=1e-12)


def test_statistics_travel_as_arrays_and_come_back_equal_to_float32():
    rng = np.random.default_rng(3)
    x, y, _ = _blobs(rng, [10, 9])
    stats = class_feature_statistics(x, y, 2)
    back = ClassFeatureStatistics.from_array_record(stats.to_array_record(), 2, 6)
    np.testing.assert_array_equal(back.counts, stats.counts)
    np.testing.assert_allclose(back.means, stats.means, rtol=1e-6)
    np.testing.assert_allclose(back.covariances, stats.covariances, rtol=1e-5, atol=1e-6)


def _record(counts, means, covs):
    return ArrayRecord({"counts": array_from_numpy(np.asarray(counts)),
                        "means": array_from_numpy(np.asarray(means, dtype=np.float32)),
                        "covariances": array_from_numpy(np.asarray(covs, dtype=np.float32))})


@pytest.mark.parametrize("record, expected", [
    (_record([1, 2], np.zeros((2, 3)), np.zeros((2, 3, 2))), "expected (K,), (K, D), (K, D, D)"),
    (_record([1, -2], np.zeros((2, 3)), np.zeros((2, 3, 3))), "not integers >= 0"),
    (_record([1.0, 2.0], np.zeros((2, 3)), np.zeros((2, 3, 3))), "not integers >= 0"),
    (_record([1, 2], np.full((2, 3), np.nan), np.zeros((2, 3, 3))), "non-finite"),
    (_record([1, 2, 3], np.zeros((3, 3)), np.zeros((3, 3, 3))), "3 classes, expected 2"),
    (_record([1, 2], np.zeros((2, 4)), np.zeros((2, 4, 4))), "dimension 4, expected 3"),
    (ArrayRecord({"counts": array_from_numpy(np.array([1, 2]))}), "lack ['means'"),
])
def test_unusable_statistics_are_refused_with_the_reason(record, expected):
    with pytest.raises(StatisticsError, match=expected.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):
        ClassFeatureStatistics.from_array_record(record, num_classes=2, dim=3)


def _balanced_accuracy(weight, bias, x, y):
    pred = (x @ weight.T + bias).argmax(axis=1)
    return np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)])


def test_calibration_undoes_a_head_biased_towards_one_class():
    """A head that separates the class means but carries a large bias for class 0 (what a
    site holding mostly class 0 pulls the average towards) scores badly on balanced data;
    retrained on virtual features of the classes' statistics, it scores near the best a
    linear head can."""
    rng = np.random.default_rng(4)
    x, y, centres = _blobs(rng, [300, 60, 20], dim=8, spread=1.5)
    stats = class_feature_statistics(x, y, 3)
    weight = centres.copy()
    bias = -0.5 * (centres ** 2).sum(axis=1) + np.array([12.0, 0.0, 0.0])
    test_x, test_y, _ = _blobs(np.random.default_rng(4), [300, 300, 300], dim=8, spread=1.5)
    before = _balanced_accuracy(weight, bias, test_x, test_y)
    new_w, new_b = calibrate_head(weight, bias, stats, samples_per_class=500, steps=400,
                                  lr=0.05, seed=0)
    after = _balanced_accuracy(new_w, new_b, test_x, test_y)
    # the class means with the true (shared, identity) covariance: the optimal rule
    best = _balanced_accuracy(centres, -0.5 * (centres ** 2).sum(axis=1), test_x, test_y)
    assert before < best - 0.2
    assert after > best - 0.03


def test_classes_without_statistics_keep_their_rows_and_calibration_is_reproducible():
    rng = np.random.default_rng(5)
    x, y, _ = _blobs(rng, [50, 50, 0])
    stats = class_feature_statistics(x, y, 3)
    weight, bias = rng.normal(size=(3, 6)), rng.normal(size=3)
    w1, b1 = calibrate_head(weight, bias, stats, samples_per_class=50, steps=20, seed=7)
    w2, b2 = calibrate_head(weight, bias, stats, samples_per_class=50, steps=20, seed=7)
    np.testing.assert_array_equal(w1, w2)
    np.testing.assert_array_equal(w1[2], weight[2])
    assert b1[2] == bias[2] and not np.allclose(w1[:2], weight[:2])


def test_several_draws_give_the_mean_of_the_heads_of_each_draw():
    rng = np.random.default_rng(8)
    x, y, _ = _blobs(rng, [40, 40])
    stats = class_feature_statistics(x, y, 2)
    weight, bias = rng.normal(size=(2, 6)), rng.normal(size=2)
    single = [calibrate_head(weight, bias, stats, samples_per_class=30, steps=10, seed=s)
              for s in (3, 4, 5)]
    mean_w, mean_b = calibrate_head(weight, bias, stats, samples_per_class=30, steps=10,
                                    seed=3, draws=3)
    np.testing.assert_allclose(mean_w, np.mean([w for w, _ in single], axis=0))
    np.testing.assert_allclose(mean_b, np.mean([b for _, b in single], axis=0))
    assert not np.allclose(single[0][0], single[1][0])  # the draws do differ
    with pytest.raises(ValueError, match="draws = 0"):
        calibrate_head(weight, bias, stats, draws=0)


def test_a_head_of_another_shape_than_the_statistics_is_refused():
    stats = class_feature_statistics(np.zeros((4, 5)), np.array([0, 0, 1, 1]), 2)
    with pytest.raises(StatisticsError, match=r"head of shape \(3, 5\)"):
        calibrate_head(np.zeros((3, 5)), np.zeros(3), stats)


def test_only_the_head_arrays_change_and_keep_their_dtype():
    rng = np.random.default_rng(6)
    x, y, _ = _blobs(rng, [30, 30])
    stats = class_feature_statistics(x, y, 2)
    arrays = ArrayRecord({
        "body.weight": array_from_numpy(rng.normal(size=(6, 6)).astype(np.float32)),
        "classifier.weight": array_from_numpy(np.zeros((2, 6), dtype=np.float32)),
        "classifier.bias": array_from_numpy(np.zeros(2, dtype=np.float32)),
    })
    out = with_calibrated_head(arrays, stats, "classifier", samples_per_class=20, steps=5)
    assert list(out) == list(arrays)
    assert out["body.weight"].data == arrays["body.weight"].data
    assert array_view(out["classifier.weight"]).dtype == np.float32
    assert array_view(out["classifier.weight"]).any()
    with pytest.raises(KeyError, match="head"):
        with_calibrated_head(arrays, stats, "head")


def test_error_replies_and_bad_statistics_are_named_failures(task_identity):
    rng = np.random.default_rng(7)
    x, y, _ = _blobs(rng, [10, 10], dim=3)
    good = class_feature_statistics(x, y, 2).to_array_record()
    request = Message(RecordDict(), dst_node_id=1, message_type="query.feature_statistics")

    def reply(name, arrays):
        return Message(RecordDict({STATISTICS_RECORD_KEY: arrays, "site": site_record(name)}),
                       reply_to=request)

    bad = _record([1, 2], np.zeros((2, 4)), np.zeros((2, 4, 4)))
    failed = Message(Error(code=0, reason="SiteFailure: disk gone"), reply_to=request)
    usable, failures = read_statistics([reply("a", good), reply("b", bad), failed], 2, 3)
    assert list(usable) == ["a"]
    assert failures[0]["site"] == "b" and "dimension 4" in failures[0]["reason"]
    assert "disk gone" in failures[1]["reason"]
