"""The Hub emulator, driven by the real huggingface_hub client and transformers (no mocked HfApi)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
import torch
from huggingface_hub import (EvalResult, HfApi, ModelCard, ModelCardData, constants, create_branch, create_repo,
                             hf_hub_download, list_repo_refs, upload_folder)
from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError,
                                    RevisionNotFoundError)
from transformers import AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertForMaskedLM, BertTokenizer

from hub_emulator import hub  # noqa: F401

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "the", "a", "model"]
# What the client constants were before any `hub` test: the fixture must put them back.
OFFLINE_STATE = (constants.ENDPOINT, constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE)
ENV_STATE = {name: os.environ.get(name) for name in ("HF_ENDPOINT", "HF_TOKEN", "HF_HUB_OFFLINE", "PYTHONPATH")}


def save_tiny_bert(folder: Path, seed: int) -> dict[str, torch.Tensor]:
    """A 1-layer BERT and its tokenizer saved with save_pretrained; returns the weights."""
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                        vocab_size=99)
    model = BertForMaskedLM(config)
    model.save_pretrained(folder)
    BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(folder)
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(model, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_private_upload_loads_identical_model_from_a_fresh_cache(hub, tmp_path):
    repo_id = create_repo("tiny-bert", private=True).repo_id
    assert repo_id == f"{hub.user}/tiny-bert"
    weights = save_tiny_bert(tmp_path / "model", seed=0)
    upload_folder(repo_id=repo_id, folder_path=tmp_path / "model", commit_message="add model")

    model = AutoModelForMaskedLM.from_pretrained(repo_id, cache_dir=tmp_path / "fresh-cache")
    assert_same_weights(model, weights)
    tokenizer = AutoTokenizer.from_pretrained(repo_id, cache_dir=tmp_path / "fresh-cache")
    assert tokenizer("hello world")["input_ids"] == [2, 5, 6, 3]
    assert ("GET", f"/{repo_id}/resolve/main/model.safetensors") in hub.requests

    info = HfApi().model_info(repo_id, files_metadata=True)
    assert info.private and info.sha == HfApi().list_repo_refs(repo_id).branches[0].target_commit
    sizes = {s.rfilename: s.size for s in info.siblings}
    assert sizes["model.safetensors"] == len(hub.files(repo_id)["model.safetensors"])
    assert ".gitattributes" in sizes  # the Hub's initial commit
    with pytest.raises(RepositoryNotFoundError):  # private: anonymous callers see no repo
        HfApi(token=False).model_info(repo_id)


def test_branch_upload_is_what_from_pretrained_loads_at_that_revision(hub, tmp_path):
    repo_id = create_repo("branched").repo_id
    main_weights = save_tiny_bert(tmp_path / "main", seed=0)
    upload_folder(repo_id=repo_id, folder_path=tmp_path / "main")
    create_branch(repo_id, branch="step-10")
    step_weights = save_tiny_bert(tmp_path / "step", seed=1)
    upload_folder(repo_id=repo_id, folder_path=tmp_path / "step", revision="step-10", commit_message="step 10")

    assert_same_weights(AutoModelForMaskedLM.from_pretrained(repo_id, revision="step-10"), step_weights)
    assert_same_weights(AutoModelForMaskedLM.from_pretrained(repo_id), main_weights)
    refs = {ref.name: ref.target_commit for ref in list_repo_refs(repo_id).branches}
    assert set(refs) == {"main", "step-10"} and refs["main"] != refs["step-10"]
    assert hub.commit_titles(repo_id, "step-10")[0] == "step 10"
    # A commit sha works as a revision too, and a branch that exists already is a 409.
    assert_same_weights(AutoModelForMaskedLM.from_pretrained(repo_id, revision=refs["step-10"]), step_weights)
    with pytest.raises(HfHubHTTPError) as conflict:
        create_branch(repo_id, branch="step-10")
    assert conflict.value.response.status_code == 409
    create_branch(repo_id, branch="step-10", exist_ok=True)


def test_model_card_validation_accepts_hub_metadata_and_rejects_an_unknown_license(hub, tmp_path):
    repo_id = create_repo("carded").repo_id
    data = ModelCardData(license="apache-2.0", tags=["lmssl", "fill-mask"], pipeline_tag="fill-mask",
                         datasets=["wikitext"], model_name="tiny", eval_results=[EvalResult(
                             task_type="fill-mask", dataset_type="wikitext", dataset_name="WikiText",
                             metric_type="perplexity", metric_value=12.5)])
    (tmp_path / "README.md").write_text(ModelCard.from_template(data).content)
    HfApi().upload_file(path_or_fileobj=tmp_path / "README.md", path_in_repo="README.md", repo_id=repo_id)

    card = ModelCard.load(repo_id)
    assert card.data.license == "apache-2.0"
    card.validate()  # posts to https://huggingface.co/api/validate-yaml, routed to the emulator
    assert ("POST", "/api/validate-yaml") in hub.requests
    assert HfApi().model_info(repo_id).card_data.license == "apache-2.0"

    card.data.license = "apache-3.0"
    with pytest.raises(ValueError, match="license"):
        card.validate()
    card.data.license = "mit"
    card.data.eval_results = None
    card.data.model_name = None
    card.data.tags = "not-a-list"
    with pytest.raises(ValueError, match="tags"):
        card.validate()
    # create_commit checks a README's metadata before uploading anything
    (tmp_path / "README.md").write_text("---\nlicense: apache-3.0\n---\n# bad\n")
    with pytest.raises(ValueError, match="Invalid metadata"):
        HfApi().upload_file(path_or_fileobj=tmp_path / "README.md", path_in_repo="README.md", repo_id=repo_id)
    assert b"apache-2.0" in hub.files(repo_id)["README.md"]


def test_a_wrong_token_is_refused_with_401(hub):
    wrong = HfApi(token="hf_" + "x" * 34)
    with pytest.raises(HfHubHTTPError) as refused:
        wrong.whoami()
    assert refused.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as refused:
        wrong.create_repo("nope")
    assert refused.value.response.status_code == 401
    assert HfApi().whoami()["name"] == hub.user


def test_an_injected_500_fails_one_commit_and_the_next_one_lands(hub, tmp_path):
    repo_id = create_repo("flaky").repo_id
    (tmp_path / "a.txt").write_text("first")
    hub.fail_next(1, status=500, paths="/commit/")
    with pytest.raises(HfHubHTTPError) as failed:
        HfApi().upload_file(path_or_fileobj=tmp_path / "a.txt", path_in_repo="a.txt", repo_id=repo_id)
    assert failed.value.response.status_code == 500
    assert "a.txt" not in hub.files(repo_id)
    HfApi().upload_file(path_or_fileobj=tmp_path / "a.txt", path_in_repo="a.txt", repo_id=repo_id)
    assert hub.files(repo_id)["a.txt"] == b"first"


def test_upload_folder_rides_out_one_500_by_retrying_the_commit(hub, tmp_path):
    # With hf_xet installed, upload_folder commits through a pipeline that retries 5xx with backoff (1 s).
    repo_id = create_repo("retried").repo_id
    (tmp_path / "b.txt").write_text("second")
    hub.fail_next(1, status=503, paths="/commit/")
    upload_folder(repo_id=repo_id, folder_path=tmp_path)
    assert hub.files(repo_id)["b.txt"] == b"second"
    assert [m for m, p in hub.requests if p.endswith("/commit/main")] == ["POST", "POST"]


def test_a_stopped_hub_is_a_connection_error_until_it_starts_again(hub):
    repo_id = create_repo("outage").repo_id
    url = hub.url
    hub.stop()
    with pytest.raises(httpx.ConnectError):
        HfApi().model_info(repo_id)
    hub.start()
    assert hub.url == url
    assert HfApi().model_info(repo_id).id == repo_id  # the data survived the outage


def test_missing_file_revision_and_repo_raise_the_client_errors(hub):
    repo_id = create_repo("sparse").repo_id
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.txt")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, ".gitattributes", revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"{hub.user}/no-such-repo", "config.json")
    with pytest.raises(RevisionNotFoundError):  # committing needs an existing branch
        HfApi().upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id, revision="ghost")
    assert Path(hf_hub_download(repo_id, ".gitattributes")).read_text().startswith("*.bin filter=lfs")


def test_a_subprocess_reaches_the_hub_through_the_environment(hub):
    create_repo("from-child")
    script = textwrap.dedent(f"""
        from huggingface_hub import HfApi, ModelCard
        api = HfApi()
        print(api.whoami()["name"], api.model_info("{hub.user}/from-child").private)
        ModelCard("---\\nlicense: mit\\n---\\n# card\\n").validate()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [hub.user, "False"]
    assert hub.requests[-1] == ("POST", "/api/validate-yaml")


def test_the_fixture_leaves_the_client_offline_again():
    assert (constants.ENDPOINT, constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE) == OFFLINE_STATE
    assert {name: os.environ.get(name) for name in ENV_STATE} == ENV_STATE
    assert constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"  # as tests/conftest.py set it
