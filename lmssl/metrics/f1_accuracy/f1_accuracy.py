"""Binary F1 (of class 1) and accuracy as one local `evaluate` module (MRPC's and QQP's metrics), offline.

The arithmetic lives in lmssl.evaluation (plain Python).
"""

import datasets
import evaluate

from lmssl.evaluation import accuracy, f1

_CITATION = """@inproceedings{dolan2005automatically,
  title={Automatically Constructing a Corpus of Sentential Paraphrases},
  author={Dolan, William B. and Brockett, Chris}, booktitle={Proceedings of IWP 2005}, year={2005}}"""


class F1Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="F1 of the positive class (1) and the share of correct predictions.",
            citation=_CITATION, inputs_description="predictions, references: class ids (1 is positive).",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        return {"f1": f1(predictions, references), "accuracy": accuracy(predictions, references)}
