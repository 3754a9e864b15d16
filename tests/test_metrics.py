"""The GLUE metrics (plain functions and the local evaluate modules) equal sklearn/scipy on fixed inputs."""

from __future__ import annotations

import random

import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from lmssl import evaluation

rng = random.Random(1234)
BINARY_TRUE = [rng.randint(0, 1) for _ in range(200)]
BINARY_PRED = [t if rng.random() < 0.7 else 1 - t for t in BINARY_TRUE]
THREE_TRUE = [rng.randint(0, 2) for _ in range(150)]
THREE_PRED = [t if rng.random() < 0.6 else rng.randint(0, 2) for t in THREE_TRUE]
SCORES_TRUE = [round(rng.uniform(0, 5), 1) for _ in range(120)]  # rounded: many ties for Spearman
SCORES_PRED = [round(s + rng.gauss(0, 1.2), 1) for s in SCORES_TRUE]


def test_plain_functions_equal_sklearn_and_scipy():
    assert evaluation.accuracy(BINARY_PRED, BINARY_TRUE) == pytest.approx(accuracy_score(BINARY_TRUE, BINARY_PRED))
    assert evaluation.f1(BINARY_PRED, BINARY_TRUE) == pytest.approx(f1_score(BINARY_TRUE, BINARY_PRED))
    assert evaluation.matthews_correlation(BINARY_PRED, BINARY_TRUE) == pytest.approx(
        matthews_corrcoef(BINARY_TRUE, BINARY_PRED))
    assert evaluation.matthews_correlation(THREE_PRED, THREE_TRUE) == pytest.approx(
        matthews_corrcoef(THREE_TRUE, THREE_PRED))
    assert evaluation.pearson(SCORES_PRED, SCORES_TRUE) == pytest.approx(pearsonr(SCORES_PRED, SCORES_TRUE)[0])
    assert evaluation.spearman(SCORES_PRED, SCORES_TRUE) == pytest.approx(spearmanr(SCORES_PRED, SCORES_TRUE)[0])


def test_degenerate_inputs_score_zero_like_sklearn():
    constant = [1] * 10
    truth = [0, 1] * 5
    assert evaluation.matthews_correlation(constant, truth) == matthews_corrcoef(truth, constant) == 0.0
    assert evaluation.f1([0] * 10, truth) == f1_score(truth, [0] * 10, zero_division=0) == 0.0
    with pytest.raises(ValueError, match="empty"):
        evaluation.accuracy([], [])
    with pytest.raises(ValueError, match="3 predictions for 2"):
        evaluation.f1([0, 1, 1], [0, 1])


@pytest.mark.parametrize("task, pred, true, expected", [
    ("cola", BINARY_PRED, BINARY_TRUE, {"matthews_correlation": matthews_corrcoef(BINARY_TRUE, BINARY_PRED)}),
    ("sst2", BINARY_PRED, BINARY_TRUE, {"accuracy": accuracy_score(BINARY_TRUE, BINARY_PRED)}),
    ("mrpc", BINARY_PRED, BINARY_TRUE, {"f1": f1_score(BINARY_TRUE, BINARY_PRED),
                                        "accuracy": accuracy_score(BINARY_TRUE, BINARY_PRED)}),
    ("qqp", BINARY_PRED, BINARY_TRUE, {"f1": f1_score(BINARY_TRUE, BINARY_PRED),
                                       "accuracy": accuracy_score(BINARY_TRUE, BINARY_PRED)}),
    ("mnli", THREE_PRED, THREE_TRUE, {"accuracy": accuracy_score(THREE_TRUE, THREE_PRED)}),
    ("stsb", SCORES_PRED, SCORES_TRUE, {"pearson": pearsonr(SCORES_PRED, SCORES_TRUE)[0],
                                        "spearmanr": spearmanr(SCORES_PRED, SCORES_TRUE)[0]}),
])
def test_glue_evaluate_module_runs_offline_and_equals_sklearn(task, pred, true, expected):
    metric = evaluation.metric_module("glue", task)
    result = metric.compute(predictions=pred, references=true)
    assert result == pytest.approx(expected)
    assert evaluation.glue_metrics(task, pred, true) == pytest.approx(expected)


def test_single_metric_modules_equal_sklearn_and_scipy():
    mcc = evaluation.metric_module("matthews_correlation").compute(predictions=THREE_PRED, references=THREE_TRUE)
    assert mcc == pytest.approx({"matthews_correlation": matthews_corrcoef(THREE_TRUE, THREE_PRED)})
    corr = evaluation.metric_module("pearson_spearman").compute(predictions=SCORES_PRED, references=SCORES_TRUE)
    assert corr == pytest.approx({"pearson": pearsonr(SCORES_PRED, SCORES_TRUE)[0],
                                  "spearmanr": spearmanr(SCORES_PRED, SCORES_TRUE)[0]})
    f1_acc = evaluation.metric_module("f1_accuracy").compute(predictions=BINARY_PRED, references=BINARY_TRUE)
    assert f1_acc == pytest.approx({"f1": f1_score(BINARY_TRUE, BINARY_PRED),
                                    "accuracy": accuracy_score(BINARY_TRUE, BINARY_PRED)})


def test_unknown_metric_names_the_known_ones():
    with pytest.raises(KeyError, match="f1_accuracy"):
        evaluation.metric_module("bleu")
    with pytest.raises(KeyError, match="unknown GLUE task 'squad'"):
        evaluation.glue_metrics("squad", [1], [1])
