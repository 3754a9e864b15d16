"""The local GLUE copy loads with the official row counts and label balance; GLUE task names are
checked before anything runs (unknown names, tasks without training data, offline without glue_dir)."""

from __future__ import annotations

import gzip
import lzma

import pytest
import yaml

from conftest import shared_file
from lmssl.__main__ import main
from lmssl.data.glue import AX, GLUE_TASKS, label_counts, load_split, local_file
from lmssl.data.tasks import check_tasks, expand_tasks
from lmssl.errors import RecipeError

# (task, split): rows, label counts by id (None: regression or unlabeled). Counts as in nyu-mll/glue.
OFFICIAL = {
    ("cola", "train"): (8551, {0: 2528, 1: 6023}),
    ("cola", "validation"): (1043, {0: 322, 1: 721}),
    ("cola", "test"): (1063, None),
    ("sst2", "train"): (67349, {0: 29780, 1: 37569}),
    ("sst2", "validation"): (872, {0: 428, 1: 444}),
    ("sst2", "test"): (1821, None),
    ("mrpc", "train"): (3668, {0: 1194, 1: 2474}),
    ("mrpc", "validation"): (408, {0: 129, 1: 279}),
    ("mrpc", "test"): (1725, None),
    ("stsb", "train"): (5749, None),
    ("stsb", "validation"): (1500, None),
    ("stsb", "test"): (1379, None),
    ("rte", "train"): (2490, {0: 1249, 1: 1241}),
    ("rte", "validation"): (277, {0: 146, 1: 131}),
    ("rte", "test"): (3000, None),
    ("wnli", "train"): (635, {0: 323, 1: 312}),
    ("wnli", "validation"): (71, {0: 40, 1: 31}),
    ("wnli", "test"): (146, None),
    ("qnli", "validation"): (5463, {0: 2702, 1: 2761}),
    ("qnli", "test"): (5463, None),
}


@pytest.fixture(scope="module")
def glue_dir():
    return shared_file("glue/SST-2/train.tsv.xz").parent.parent


@pytest.mark.parametrize("task, split", list(OFFICIAL))
def test_each_local_glue_task_has_official_rows_and_label_balance(glue_dir, task, split):
    rows, balance = OFFICIAL[(task, split)]
    data = load_split(GLUE_TASKS[task], split, glue_dir)
    assert len(data) == rows
    assert data.column_names[0] == "text" and ("text_pair" in data.column_names) == (GLUE_TASKS[task].pair is not None)
    if split == "test":
        assert set(data["label"]) == {-1} and list(data["idx"]) == list(range(rows))
    elif balance is not None:
        assert label_counts(data) == balance
    else:  # STS-B: similarity scores from 0 to 5
        scores = list(data["label"])
        assert min(scores) == 0.0 and max(scores) == 5.0 and len(set(scores)) > 50  # graded, not classes


def test_quirks_of_the_original_layout_are_handled(glue_dir):
    mrpc = load_split(GLUE_TASKS["mrpc"], "validation", glue_dir)  # BOM before the `Quality` header
    assert mrpc[0]["label"] == 1 and mrpc[0]["text"].startswith("He said the foodservice pie business")
    assert mrpc[0]["text_pair"].startswith('"The foodservice pie business')  # a bare quote, not a quoted field
    cola = load_split(GLUE_TASKS["cola"], "train", glue_dir)  # no header: the first row is data
    assert cola[0] == {"text": "Our friends won't buy this analysis, let alone the next one we propose.",
                       "label": 1, "idx": 0}
    rte = load_split(GLUE_TASKS["rte"], "train", glue_dir)  # label names map to the hub's ids
    assert rte[0]["label"] == GLUE_TASKS["rte"].label_names.index("not_entailment") == 1
    ax = load_split(AX, "test", glue_dir)
    assert len(ax) == 1104 and ax[0]["text"] == "The cat sat on the mat."


def test_plain_and_gzip_files_load_like_xz(glue_dir, tmp_path):
    original = local_file(glue_dir, GLUE_TASKS["wnli"], "dev")
    folder = tmp_path / "WNLI"
    folder.mkdir()
    raw = lzma.open(original).read()
    (folder / "train.tsv").write_bytes(raw)
    with gzip.open(folder / "dev.tsv.gz", "wb") as out:
        out.write(raw)
    expected = load_split(GLUE_TASKS["wnli"], "validation", glue_dir).to_dict()
    assert load_split(GLUE_TASKS["wnli"], "train", tmp_path).to_dict() == expected
    assert load_split(GLUE_TASKS["wnli"], "validation", tmp_path).to_dict() == expected


def test_glue_keyword_skips_tasks_without_training_data_with_a_notice(glue_dir):
    notices = []
    tasks = expand_tasks(["glue"], str(glue_dir), notices.append)
    assert tasks == ["cola", "sst2", "mrpc", "stsb", "rte", "wnli"]
    assert [n.split(":")[0] for n in notices] == [f"skipping GLUE task {t}" for t in ("qqp", "mnli", "qnli")]
    check_tasks(["glue"], str(glue_dir), "stages.glue")


def test_naming_a_task_without_training_data_is_a_recipe_error(glue_dir):
    with pytest.raises(RecipeError, match=r"stages.glue.tasks\[1\]: GLUE task 'qnli' has no training data"):
        check_tasks(["rte", "qnli"], str(glue_dir), "stages.glue")


def test_glue_task_offline_without_glue_dir_is_a_recipe_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RecipeError, match="needs `glue_dir`"):
        check_tasks(["sst2"], None, "stages.glue")


def _recipe(tmp_path, **stage) -> str:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    raw = {"name": "t", "stages": [{"name": "glue", "kind": "finetune", "model_from": str(model), **stage}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return str(path)


def test_unknown_task_exits_2_naming_it_and_the_nearest_name(tmp_path, glue_dir, capsys):
    assert main(["validate", _recipe(tmp_path, glue_dir=str(glue_dir), tasks=["sst-2"])]) == 2
    err = capsys.readouterr().err
    assert "stages.glue.tasks[0]: unknown task 'sst-2'; did you mean 'sst2'?" in err
    assert "Traceback" not in err


def test_shipped_glue_recipe_validates():
    from pathlib import Path

    from lmssl import load_recipe

    shared_file("glue/SST-2/train.tsv.xz")
    recipe = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "glue.yaml",
                         [f"stages.glue.glue_dir={shared_file('glue')}"])
    assert recipe.stage("glue").tasks == ["glue"]


def test_hub_splits_are_renamed_to_the_common_layout(monkeypatch):
    """Without glue_dir, nyu-mll/glue is read from the hub; its columns are renamed like the local files'."""
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"premise": ["A man sleeps."], "hypothesis": ["A man rests."],
                                           "label": [0], "idx": [7]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_split(GLUE_TASKS["mnli"], "validation_mismatched", None)
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched")]
    assert data.column_names == ["text", "text_pair", "label", "idx"] and data[0]["text_pair"] == "A man rests."
