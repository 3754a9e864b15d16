"""Unsupervised SimCSE: sentence embeddings from dropout alone (Gao, Yao and Chen 2021, "SimCSE: Simple
Contrastive Learning of Sentence Embeddings", arXiv:2104.08821).

Every sentence goes through the encoder twice in one forward pass; the two dropout masks are its two
views. The pooled embedding of view 1 of sentence i must pick view 2 of sentence i out of view 2 of
every sentence in the batch, the sentences of every process included (InfoNCE at temperature 0.05,
negatives gathered with gradients). Text encoders only (bert, roberta); the saved folder is a plain
`AutoModel` encoder whose config.json records the pooling in `lmssl_pooling`.

Zero-shot STS-B (Spearman of embedding cosines against the dev set's gold scores, no fine-tuning) is
measured on the encoder as loaded and at every evaluation: statistics `stsb_spearman_before` and
`stsb_spearman`.
"""

from __future__ import annotations

import lzma
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional

import torch
import torch.nn.functional as F

from lmssl.collectives import gather_with_grad
from lmssl.errors import LmsslError, RecipeError
from lmssl.models import MASKED_FAMILIES, build_config, encoder_mask, is_padded, warm_start_overrides
from lmssl.objectives.base import TextObjective
from lmssl.objectives.mlm import pad_rows
from lmssl.schema import Range, check_ranges

POOLING_FIELD = "lmssl_pooling"   # config.json key: how the saved encoder turns tokens into one vector
STSB_DEV = "glue/STS-B/dev.tsv.xz"


@dataclass
class Options:
    """Options of the simcse objective (objective_args in a recipe)."""

    temperature: Annotated[float, Range(0.001, 10)] = 0.05
    """InfoNCE temperature tau (the paper's 0.05, best of its table D.1 sweep)."""
    pooling: Literal["cls", "mean"] = "cls"
    """cls: the [CLS] state, through a Linear+Tanh MLP during training only (the paper's unsupervised
    setting); mean: the average of the token states under the attention mask (no MLP)."""
    split_sentences: bool = False
    """Split each row into sentences first (punctuation rules): paragraphs such as WikiText's lines
    become the one-sentence examples the paper trains on, rather than being cut at max_length."""
    stsb_dev: Optional[str] = None
    """The STS-B dev set (GLUE's dev.tsv, .xz read as it is) scored zero-shot before training and at
    every evaluation (held-out data needed: eval_split or eval_fraction > 0); None looks for
    $LMSSL_DATA_DIR/glue/STS-B/dev.tsv.xz, else ../shared/data/glue/STS-B/dev.tsv.xz, and skips the
    score with a notice when it is not there."""

    def check(self, where: str) -> None:
        check_ranges(self, where)
        if self.stsb_dev is not None and not Path(self.stsb_dev).expanduser().is_file():
            raise RecipeError(f"{where}.stsb_dev: no file {self.stsb_dev!r} (relative paths start at "
                              f"{os.getcwd()}); give GLUE's STS-B dev.tsv(.xz), or drop the key to look in the "
                              "shared data folder")


def stsb_path(options: Options) -> Optional[Path]:
    """The STS-B dev file to score with: the option's, else the shared data folder's; None when absent."""
    if options.stsb_dev is not None:
        return Path(options.stsb_dev).expanduser()
    if "LMSSL_DATA_DIR" in os.environ:
        roots = [Path(os.environ["LMSSL_DATA_DIR"])]
    else:   # ../shared/data from the working directory, or from this checkout's root (as the tests find it)
        roots = [Path("..") / "shared" / "data", Path(__file__).resolve().parents[3] / "shared" / "data"]
    return next((root / STSB_DEV for root in roots if (root / STSB_DEV).is_file()), None)


def read_stsb(path: Path) -> tuple[list[str], list[str], list[float]]:
    """(sentence1s, sentence2s, gold scores 0..5) of a GLUE STS-B tsv: tab-separated, a header row, no
    quoting (quotes are text). Rows without a score (the test split) or with too few fields are skipped."""
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        try:
            a, b, s = header.index("sentence1"), header.index("sentence2"), header.index("score")
        except ValueError:
            raise LmsslError(f"{path}: not an STS-B file; its header has no sentence1/sentence2/score "
                             f"columns ({', '.join(header)})") from None
        first, second, gold = [], [], []
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if len(fields) <= max(a, b, s):
                continue
            try:
                score = float(fields[s])
            except ValueError:
                continue
            first.append(fields[a])
            second.append(fields[b])
            gold.append(score)
    if not gold:
        raise LmsslError(f"{path}: no scored sentence pairs")
    return first, second, gold


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states where attention_mask is 1: (batch, seq, d), (batch, seq) -> (batch, d)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)                  # (batch, seq, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """The sentence embedding the saved encoder serves: [CLS] (position 0) or the masked mean."""
    return hidden[:, 0] if pooling == "cls" else mean_pool(hidden, attention_mask)


def simcse_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(InfoNCE of the paper's eq. 1, whether each anchor's nearest candidate is its partner) for views
    z1, z2 (n, d) of n sentences: -log softmax over j of cos(z1_i, z2_j) / tau at j = i, averaged over i.
    While training (gradients on) the candidates are view 2 of every process's sentences; without
    gradients (evaluation, sharded over processes) the batch's own. fp32 (fp64 stays), outside autocast."""
    with torch.autocast(z1.device.type, enabled=False):
        wide = z1.dtype if z1.dtype == torch.float64 else torch.float32
        z1, z2 = F.normalize(z1.to(wide), dim=1), F.normalize(z2.to(wide), dim=1)
        candidates, offset = gather_with_grad(z2) if torch.is_grad_enabled() else (z2, 0)   # (n * world, d)
        logits = z1 @ candidates.T / temperature                              # (n, n * world)
        partner = offset + torch.arange(z1.shape[0], device=z1.device)        # view 2 of the same sentence
        loss = F.cross_entropy(logits, partner)
        hits = (logits.detach().argmax(1) == partner)
    return loss, hits


class SentenceEncoder(torch.nn.Module):
    """The module SimCSE trains: the encoder, its pooling, and (cls pooling) the training-only MLP."""

    def __init__(self, encoder, pooling: str):
        super().__init__()
        self.encoder, self.pooling = encoder, pooling
        width = encoder.config.hidden_size
        # The paper's MLPLayer (dense + tanh, as BERT's pooler), freshly initialized and dropped at save.
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh()) if pooling == "cls" else None

    def forward(self, input_ids, attention_mask, token_type_ids=None, project: bool = True,
                padded: bool = True) -> torch.Tensor:
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        mask = encoder_mask(self.encoder, attention_mask, padded)        # built without reading the device
        hidden = self.encoder(input_ids=input_ids, attention_mask=mask, **kwargs).last_hidden_state
        pooled = pool(hidden, attention_mask, self.pooling)                   # (batch, d)
        return self.mlp(pooled) if project and self.mlp is not None else pooled


class SimCSE(TextObjective):
    name = "simcse"
    families = MASKED_FAMILIES
    stat_names = ("loss", "pair_accuracy", "stsb_spearman", "stsb_spearman_before")
    headline = ("loss", "pair_accuracy", "stsb_spearman", "stsb_spearman_before")
    pipeline_tag = "feature-extraction"
    Options = Options

    def __init__(self, options: Options, tokenizer, max_length: int = 32, seed: int = 0):
        super().__init__(options, tokenizer, max_length, seed)
        self.stsb: Optional[tuple[dict[str, list], dict[str, list], list[float]]] = None   # tokenized once
        self.scores: dict[str, float] = {}   # the latest STS-B measurements, reported by every `loss`
        self.stale = True                    # weights changed since `stsb_spearman` was measured

    @classmethod
    def check(cls, options, stage, where: str) -> None:
        super().check(options, stage, where)
        if stage.documents != "rows":
            raise RecipeError(f"{where}.documents: simcse trains on sentences, one per row (or split from rows "
                              "with objective_args.split_sentences); documents: blank_lines would join lines "
                              "into documents cut at max_length. Use documents: rows")

    def build_model(self, model_cfg):
        from transformers import AutoModel

        if model_cfg.init_from:   # an MLM folder or a hub encoder; the heads it may hold are not loaded
            from transformers import AutoConfig

            kind = AutoConfig.from_pretrained(model_cfg.init_from,
                                              trust_remote_code=model_cfg.trust_remote_code).model_type
            if kind not in MASKED_FAMILIES:
                raise LmsslError(f"model.init_from: {model_cfg.init_from} holds a {kind} model; the simcse "
                                 f"objective trains {' or '.join(MASKED_FAMILIES)} encoders")
            return AutoModel.from_pretrained(model_cfg.init_from, add_pooling_layer=False,
                                             trust_remote_code=model_cfg.trust_remote_code,
                                             **warm_start_overrides(model_cfg))
        return AutoModel.from_config(build_config(model_cfg, self.tokenizer, self.max_length), add_pooling_layer=False)

    def prepare(self, dataset, column: str = "text"):
        """One example per row (per sentence with split_sentences): its tokens with [CLS]/[SEP], cut at
        max_length; blank rows dropped."""
        tok, limit, split = self.tokenizer, self.max_length, self.options.split_sentences

        def encode(batch):
            from lmssl.data.text import split_sentences

            texts = [t.strip() for t in batch[column] if t and t.strip()]
            if split:
                texts = [s for t in texts for s in split_sentences(t) if s.strip()]
            if not texts:
                return {"input_ids": []}
            return {"input_ids": tok(texts, truncation=True, max_length=limit)["input_ids"]}

        return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="tokenizing sentences")

    def collate(self, examples):
        """Padded sentences; the second view is made in `loss`, where the forward pass draws dropout."""
        input_ids = pad_rows([e["input_ids"] for e in examples], self.tokenizer.pad_token_id)
        attention = pad_rows([[1] * len(e["input_ids"]) for e in examples], 0)
        return {"input_ids": input_ids, "attention_mask": attention,
                "padded": is_padded([e["input_ids"] for e in examples])}

    def training_module(self, model):
        """The encoder with its pooling (and cls's MLP); the STS-B score of the encoder as loaded is taken
        here, before any step (and before a resumed run loads its checkpoint)."""
        module = SentenceEncoder(model, self.options.pooling)
        before = self.measure_stsb(module)
        if before is not None:
            self.scores = {"stsb_spearman_before": before, "stsb_spearman": before}
        self.stale = False
        return module

    def loss(self, module, batch):
        measuring = not module.training
        if measuring and self.stale:   # evaluation: score STS-B once, on its first batch
            score = self.measure_stsb(module)
            if score is not None:
                self.scores["stsb_spearman"] = score
            self.stale = False
        elif not measuring:
            self.stale = True
        ids, mask = batch["input_ids"], batch["attention_mask"]
        n = ids.shape[0]
        was_training = module.training
        module.train()                 # held-out loss too: two dropout masks (seeded by the caller) make the views
        try:
            # (2n, d): rows i and n+i are sentence i
            z = module(ids.repeat(2, 1), mask.repeat(2, 1), padded=batch.get("padded", True))
        finally:
            module.train(was_training)
        loss, hits = simcse_loss(z[:n], z[n:], self.options.temperature)
        count = float(n)
        stats = {"loss": (loss.detach() * count, count), "pair_accuracy": (hits.sum(), count)}
        stats.update({name: (value, 1.0) for name, value in self.scores.items()})
        return loss, stats

    @torch.no_grad()
    def embed(self, module, texts: dict[str, list], batch_size: int = 128) -> torch.Tensor:
        """(len(texts), d) float32 embeddings the saved encoder would give (no MLP, dropout off) of
        tokenized sentences, on module's device."""
        device = next(module.parameters()).device
        out = []
        for start in range(0, len(texts["input_ids"]), batch_size):
            rows = texts["input_ids"][start:start + batch_size]
            ids = pad_rows(rows, self.tokenizer.pad_token_id).to(device)
            mask = pad_rows([[1] * len(r) for r in rows], 0).to(device)
            out.append(module(ids, mask, project=False).float())
        return torch.cat(out)

    def measure_stsb(self, module) -> Optional[float]:
        """Spearman correlation of cos(embedding 1, embedding 2) with the gold scores of the STS-B dev
        pairs, dropout off; None (with a notice, once) when the dev file is absent."""
        from lmssl.evaluation import spearman

        if self.stsb is None:
            path = stsb_path(self.options)
            if path is None:
                warnings.warn("simcse: no STS-B dev set (objective_args.stsb_dev, or glue/STS-B/dev.tsv.xz under "
                              "$LMSSL_DATA_DIR or ../shared/data); stsb_spearman is not reported", stacklevel=2)
                self.stsb = ({}, {}, [])
            else:
                first, second, gold = read_stsb(path)
                encode = lambda texts: {"input_ids": self.tokenizer(texts, truncation=True,  # noqa: E731
                                                                    max_length=self.max_length)["input_ids"]}
                self.stsb = (encode(first), encode(second), gold)
        first, second, gold = self.stsb
        if not gold:
            return None
        was_training = module.training
        module.eval()
        try:
            cosine = F.cosine_similarity(self.embed(module, first), self.embed(module, second), dim=1)   # (pairs,)
        finally:
            module.train(was_training)
        return float(spearman(cosine.cpu().tolist(), gold))

    def save(self, accelerator, model, folder) -> None:
        """The encoder (no MLP: the paper evaluates without it) and its tokenizer; config.json records
        the pooling, so `pooling_of(AutoConfig.from_pretrained(folder))` knows how to embed."""
        setattr(accelerator.unwrap_model(model).config, POOLING_FIELD, self.options.pooling)
        super().save(accelerator, model, folder)


def pooling_of(config) -> str:
    """How a saved SimCSE encoder embeds a sentence: "cls" or "mean" (its config's lmssl_pooling)."""
    pooling = getattr(config, POOLING_FIELD, None)
    if pooling not in ("cls", "mean"):
        raise LmsslError(f"this model's config has no {POOLING_FIELD} of cls or mean ({pooling!r}); it was not "
                         "saved by the simcse objective")
    return pooling
