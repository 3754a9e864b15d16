"""Pearson and Spearman correlations as one local `evaluate` module (STS-B's metrics), offline.

The arithmetic lives in lmssl.evaluation (plain Python; Spearman ranks ties by their average).
"""

import datasets
import evaluate

from lmssl.evaluation import pearson, spearman

_CITATION = """@inproceedings{cer2017semeval,
  title={{SemEval-2017} Task 1: Semantic Textual Similarity Multilingual and Crosslingual Focused Evaluation},
  author={Cer, Daniel and Diab, Mona and Agirre, Eneko and Lopez-Gazpio, I{\\~n}igo and Specia, Lucia},
  booktitle={Proceedings of SemEval-2017}, year={2017}}"""


class PearsonSpearman(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Linear (Pearson) and rank (Spearman) correlation of predicted and true scores.",
            citation=_CITATION, inputs_description="predictions, references: real numbers.",
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("float64")}),
        )

    def _compute(self, predictions, references):
        return {"pearson": pearson(predictions, references), "spearmanr": spearman(predictions, references)}
