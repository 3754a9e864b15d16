"""Matthews correlation coefficient as a local `evaluate` module (CoLA's metric), offline.

The arithmetic lives in lmssl.evaluation (plain Python, any number of classes).
"""

import datasets
import evaluate

from lmssl.evaluation import matthews_correlation

_CITATION = """@article{matthews1975comparison,
  title={Comparison of the predicted and observed secondary structure of T4 phage lysozyme},
  author={Matthews, Brian W.}, journal={Biochimica et Biophysica Acta (BBA) - Protein Structure},
  volume={405}, number={2}, pages={442--451}, year={1975}}"""


class MatthewsCorrelation(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Correlation between predicted and true classes, from -1 to 1; 0 is chance level.",
            citation=_CITATION, inputs_description="predictions, references: class ids.",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        return {"matthews_correlation": matthews_correlation(predictions, references)}
