"""GLUE's official scores as a local `evaluate` module: evaluate.load("<this folder>", "sst2"), offline.

The arithmetic lives in lmssl.evaluation (plain Python); this file only describes inputs and outputs.
"""

import datasets
import evaluate

from lmssl.evaluation import GLUE_METRICS, glue_metrics

_CITATION = """@inproceedings{wang2018glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={Proceedings of the 2018 EMNLP Workshop BlackboxNLP}, year={2018}}"""
_DESCRIPTION = ("The scores the GLUE leaderboard reports per task: Matthews correlation (cola, ax), Pearson and "
                "Spearman (stsb), F1 and accuracy (mrpc, qqp), accuracy (sst2, mnli, qnli, rte, wnli).")
_INPUTS = """predictions: class ids (or floats for stsb); references: the same kind, one per prediction.
Returns a dict of the task's scores, e.g. {"f1": 0.88, "accuracy": 0.84} for mrpc."""


class Glue(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in GLUE_METRICS:
            raise KeyError(f"choose a GLUE task as the configuration name: {', '.join(GLUE_METRICS)}")
        kind = "float64" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value(kind), "references": datasets.Value(kind)}),
            reference_urls=["https://gluebenchmark.com/"],
        )

    def _compute(self, predictions, references):
        return glue_metrics(self.config_name, predictions, references)
