"""The finetune stage end to end on real data with a tiny BERT: SST-2 above the majority class, STS-B as
regression, a custom CSV task with seeds, a scratch baseline and label names, and clear errors for bad input."""

from __future__ import annotations

import csv
import json
import lzma
import statistics

import pytest
import torch
import yaml
from scipy.stats import pearsonr

from conftest import shared_file
from lmssl.__main__ import main


def _build_tiny_model(folder, lines: list[str]) -> None:
    """A WordPiece tokenizer trained on `lines` (BERT template) and a 2-layer, 64-wide BertForMaskedLM."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(lines, trainers.WordPieceTrainer(vocab_size=2000, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    ).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=256, pad_token_id=tok.token_to_id("[PAD]"))
    BertForMaskedLM(config).save_pretrained(folder)


def _tsv_rows(relative: str) -> list[list[str]]:
    with lzma.open(shared_file(relative), "rt", encoding="utf-8-sig") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    sst2 = [r[0] for r in _tsv_rows("glue/SST-2/train.tsv.xz")[1:20001]]
    stsb = [s for r in _tsv_rows("glue/STS-B/train.tsv.xz")[1:] for s in r[7:9]]
    folder = tmp_path_factory.mktemp("tiny-bert")
    _build_tiny_model(folder, sst2 + stsb)
    return folder


def _run(tmp_path, stage: dict, command: str = "run") -> int:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "t", "stages": [{"name": "ft", "kind": "finetune", **stage}]}))
    return main([command, str(recipe), "--run-dir", str(tmp_path / "run")] if command == "run"
                else [command, str(recipe)])


SMALL = {"learning_rate": 2.0e-3, "epochs": 2, "batch_size": 32}  # tiny models from scratch like a high rate


@pytest.fixture(scope="module")
def glue_run(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("glue-run")
    glue_dir = shared_file("glue/SST-2/train.tsv.xz").parent.parent
    stage = {"model_from": str(tiny_model), "glue_dir": str(glue_dir), "tasks": ["sst2", "stsb"],
             "max_train_samples": 2000, "seeds": [0], **SMALL}
    assert _run(tmp, stage) == 0
    return tmp / "run" / "ft"


def _results(folder) -> dict:
    rows = json.loads((folder / "results.json").read_text())["results"]
    return {(r["task"], r["init"], r["metric"]): r for r in rows}


def _predict(folder, texts, pairs=None) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(**tokenizer(texts, pairs, padding=True, truncation=True, max_length=128,
                                   return_tensors="pt")).logits
    return logits.squeeze(-1) if model.config.num_labels == 1 else logits.argmax(-1)


def test_tiny_model_fine_tunes_on_sst2_above_the_majority_class(glue_run):
    dev = [int(r[1]) for r in _tsv_rows("glue/SST-2/dev.tsv.xz")[1:]]
    majority = max(dev.count(0), dev.count(1)) / len(dev)  # 444/872 = 0.509
    accuracy = _results(glue_run)[("sst2", "pretrained", "accuracy")]["mean"]
    assert accuracy > majority + 0.05
    assert "| sst2 | accuracy | 1 | " in (glue_run / "results.md").read_text()


def test_sst2_test_predictions_are_written_in_glue_submission_format_by_the_kept_model(glue_run):
    lines = (glue_run / "submission" / "SST-2.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 1 + 1821
    rows = [line.split("\t") for line in lines[1:]]
    assert [int(i) for i, _ in rows] == list(range(1821)) and {p for _, p in rows} == {"0", "1"}
    test_texts = [r[1] for r in _tsv_rows("glue/SST-2/test.tsv.xz")[1:33]]
    assert _predict(glue_run / "sst2", test_texts).tolist() == [int(p) for _, p in rows[:32]]


def test_stsb_trains_as_regression_and_its_pearson_matches_scipy(glue_run):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(glue_run / "stsb")
    assert config.num_labels == 1 and config.problem_type == "regression"
    history = [json.loads(line) for line in (glue_run / "runs" / "stsb-pretrained-seed0" / "metrics.jsonl").open()]
    losses = [h["train/loss"] for h in history if "train/loss" in h]
    assert losses[-1] < losses[0] / 2  # mean squared error on 0-5 scores falls
    dev = _tsv_rows("glue/STS-B/dev.tsv.xz")[1:]
    predicted = _predict(glue_run / "stsb", [r[7] for r in dev], [r[8] for r in dev]).tolist()
    expected = pearsonr(predicted, [float(r[9]) for r in dev])[0]
    assert _results(glue_run)[("stsb", "pretrained", "pearson")]["mean"] == pytest.approx(expected, abs=1e-4)
    test_lines = (glue_run / "submission" / "STS-B.tsv").read_text().splitlines()
    assert len(test_lines) == 1 + 1379 and all(0.0 <= float(l.split("\t")[1]) <= 5.0 for l in test_lines[1:])


def _write_csv(path, rows, header=("review", "sentiment")) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    """SST-2 rows as a user's own CSV: text in `review`, label names in `sentiment`."""
    folder = tmp_path_factory.mktemp("reviews")
    rows = [(r[0], "pos" if r[1] == "1" else "neg") for r in _tsv_rows("glue/SST-2/train.tsv.xz")[30001:31401]]
    return {"train": _write_csv(folder / "train.csv", rows[:1000]),
            "validation": _write_csv(folder / "validation.csv", rows[1000:1300]),
            "test": _write_csv(folder / "test.csv", [(text,) for text, _ in rows[1300:]], header=("review",))}


def _custom(tiny_model, files, **task) -> dict:
    spec = {"name": "reviews", "data": {"path": "csv", "files": files, "eval_split": "validation"},
            "text_column": "review", "label_column": "sentiment", **task}
    return {"model_from": str(tiny_model), "tasks": [spec], **SMALL}


def test_custom_csv_task_runs_end_to_end_with_seeds_scratch_and_label_names(tiny_model, reviews, tmp_path):
    from transformers import AutoModelForSequenceClassification

    stage = dict(_custom(tiny_model, reviews, test_split="test"), seeds=[0, 1], scratch_baseline=True)
    assert _run(tmp_path, stage) == 0
    out = tmp_path / "run" / "ft"
    model = AutoModelForSequenceClassification.from_pretrained(out / "reviews")
    assert model.config.id2label == {0: "neg", 1: "pos"} and model.config.label2id == {"neg": 0, "pos": 1}
    results = _results(out)
    for init in ("pretrained", "scratch"):
        row = results[("reviews", init, "accuracy")]
        assert len(row["scores"]) == 2 and row["mean"] == pytest.approx(statistics.fmean(row["scores"]))
        assert row["std"] == pytest.approx(statistics.stdev(row["scores"]))
    best = results[("reviews", "pretrained", "accuracy")]
    assert best["scores"][best["seeds"].index(best["best_seed"])] == max(best["scores"])
    table = (out / "results.md").read_text()
    assert "| task | metric | seeds | pretrained | scratch |" in table and "| reviews | accuracy | 2 |" in table
    lines = (out / "submission" / "reviews.tsv").read_text().splitlines()
    assert len(lines) == 101 and {line.split("\t")[1] for line in lines[1:]} <= {"neg", "pos"}


def test_csv_without_the_named_column_fails_validation_naming_it(tiny_model, reviews, tmp_path, capsys):
    assert _run(tmp_path, _custom(tiny_model, reviews, text_column="body"), "validate") == 2
    err = capsys.readouterr().err
    assert "stages.ft.tasks[0].text_column:" in err and "train.csv (train split) has no column 'body'" in err
    assert "its columns are: review, sentiment" in err and "Traceback" not in err


def test_json_without_the_named_column_exits_2_at_run_time(tiny_model, tmp_path, capsys):
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps({"review": f"film {i}", "sentiment": "pos"}) + "\n" for i in range(40)))
    stage = {"model_from": str(tiny_model), "tasks": [{"name": "reviews", "data": {"path": "json", "files": str(path)},
                                                       "text_column": "review", "label_column": "stars"}]}
    assert _run(tmp_path, stage) == 2
    err = capsys.readouterr().err
    assert "'train' split of task 'reviews' has no column 'stars' (named by label_column)" in err
    assert "review, sentiment" in err and "Traceback" not in err


def test_label_outside_the_label_set_exits_2(tiny_model, reviews, tmp_path, capsys):
    rows = [("a fine film", "pos"), ("dull", "neg"), ("so so", "neutral")]
    files = dict(reviews, validation=_write_csv(tmp_path / "validation.csv", rows))
    assert _run(tmp_path, _custom(tiny_model, files, labels=["neg", "pos"])) == 2
    err = capsys.readouterr().err
    assert "'validation' split, row 3: label 'neutral' is outside the label set ['neg', 'pos']" in err


def test_empty_split_exits_2(tiny_model, reviews, tmp_path, capsys):
    files = dict(reviews, validation=_write_csv(tmp_path / "validation.csv", []))
    assert _run(tmp_path, _custom(tiny_model, files)) == 2
    err = capsys.readouterr().err
    assert "the 'validation' split of task 'reviews' is empty" in err and "Traceback" not in err


@pytest.mark.parametrize("problem, expected", [
    ("regression-with-text-labels", "label 'neg' is not a number, and the task is a regression"),
    ("one-class", "task 'reviews' has one class only ('pos') in its training split"),
    ("empty-text", "has 2 rows without text in column 'review' (first: row 3)"),
], ids=lambda p: p if " " not in p else "")
def test_finetune_data_problems_exit_2_before_training_and_leave_nothing_behind(tiny_model, reviews, tmp_path, capsys,
                                                                                problem, expected):
    rows = [(f"a film, take {i}", "pos" if problem == "one-class" else ["neg", "pos"][i % 2]) for i in range(60)]
    if problem == "empty-text":
        rows[2], rows[7] = ("", "neg"), ("   ", "pos")
    files = dict(reviews, train=_write_csv(tmp_path / "train.csv", rows))
    task = {"num_labels": 1} if problem == "regression-with-text-labels" else {}
    assert _run(tmp_path, _custom(tiny_model, files, **task)) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err
    run = tmp_path / "run"
    assert not (run / "ft").exists() and not (run / ".partial").exists(), sorted(map(str, run.rglob("*")))


def test_conflicting_labels_and_num_labels_fail_validation(tiny_model, reviews, tmp_path, capsys):
    assert _run(tmp_path, _custom(tiny_model, reviews, labels=["neg", "pos"], num_labels=3), "validate") == 2
    assert "num_labels: 3 disagrees with the 2 names in labels" in capsys.readouterr().err


def test_mnli_layout_scores_matched_and_mismatched_and_submits_ax(tiny_model, tmp_path):
    """No MNLI copy is local: an MNLI-layout folder is built from RTE's real pairs (labels cycled) and the
    real AX diagnostic set, to exercise the two validation splits and the three submission files."""
    rte = _tsv_rows("glue/RTE/train.tsv.xz")[1:]
    names = ["entailment", "neutral", "contradiction"]
    folder = tmp_path / "glue" / "MNLI"
    folder.mkdir(parents=True)

    def write(stem, rows, labeled=True):
        header = ["index", "genre", "sentence1", "sentence2"] + (["gold_label"] if labeled else [])
        body = [[str(i), "fiction", r[1], r[2]] + ([names[i % 3]] if labeled else []) for i, r in enumerate(rows)]
        (folder / f"{stem}.tsv").write_text("\n".join("\t".join(x) for x in [header, *body]) + "\n")

    write("train", rte[:320])
    write("dev_matched", rte[400:460])
    write("dev_mismatched", rte[500:550])
    write("test_matched", rte[600:630], labeled=False)
    write("test_mismatched", rte[700:720], labeled=False)
    (tmp_path / "glue" / "AX").mkdir()
    (tmp_path / "glue" / "AX" / "diagnostic.tsv.xz").write_bytes(shared_file("glue/AX/diagnostic.tsv.xz").read_bytes())
    stage = {"model_from": str(tiny_model), "glue_dir": str(tmp_path / "glue"), "tasks": ["mnli"], **SMALL,
             "epochs": 1}
    assert _run(tmp_path, stage) == 0
    out = tmp_path / "run" / "ft"
    assert {m for (_, _, m) in _results(out)} == {"accuracy_matched", "accuracy_mismatched"}
    for name, rows in (("MNLI-m", 30), ("MNLI-mm", 20), ("AX", 1104)):
        lines = (out / "submission" / f"{name}.tsv").read_text().splitlines()
        assert len(lines) == rows + 1 and {line.split("\t")[1] for line in lines[1:]} <= set(names)


@pytest.mark.parametrize("fmt", ["json", "parquet"])
def test_json_and_parquet_tasks_load_with_float_labels_as_regression(tmp_path, fmt):
    import datasets

    from lmssl.data.tasks import TaskSpec, load_task
    from lmssl.recipe import DataConfig

    rows = _tsv_rows("glue/STS-B/train.tsv.xz")[1:201]
    table = datasets.Dataset.from_dict({"a": [r[7] for r in rows], "b": [r[8] for r in rows],
                                        "similarity": [float(r[9]) for r in rows]})
    path = tmp_path / f"pairs.{fmt}"
    table.to_json(path) if fmt == "json" else table.to_parquet(path)
    spec = TaskSpec(name="pairs", data=DataConfig(path=fmt, files=str(path)), text_column="a", pair_column="b",
                    label_column="similarity")
    task = load_task(spec, None, 0, "stages.ft")
    assert task.label_names is None and task.metrics == ("pearson", "spearmanr")
    assert len(task.train) == 180 and len(task.evals["validation"]) == 20  # 10% held out
    assert task.train.column_names == ["text", "text_pair", "label", "idx"]
    assert sorted(list(task.train["label"]) + list(task.evals["validation"]["label"])) == pytest.approx(
        sorted(float(r[9]) for r in rows))
