"""Causal LM on EOS-joined, packed documents (Radford et al. 2019, "Language Models are Unsupervised
Multitask Learners"; Touvron et al. 2023, "LLaMA", arXiv:2302.13971); shifted loss on real tokens only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmssl.data.packing import Packing
from lmssl.errors import LmsslError
from lmssl.models import CAUSAL_FAMILIES, build_config
from lmssl.objectives.base import TextObjective
from lmssl.objectives.mlm import pad_rows


@dataclass
class Options:
    """Options of the causal_lm objective (objective_args in a recipe)."""

    document_attention: bool = False
    """Keep attention inside each document of a packed block (position ids restart after EOS);
    False lets blocks attend across document boundaries, as GPT-2 did."""


def document_positions(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Position ids that restart at 0 after every EOS: (batch, seq) -> (batch, seq)."""
    after_eos = torch.zeros_like(input_ids, dtype=torch.bool)
    after_eos[:, 1:] = input_ids[:, :-1] == eos_id                       # a new document starts here
    index = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    start = torch.where(after_eos, index, torch.zeros_like(index))
    start = torch.cummax(start, dim=1).values                           # start of each token's document
    return index - start


# Rows of the vocabulary head computed at once by the fused head + cross-entropy: a chunk's logits
# (rows x vocab, fp32) stay small enough to live in cache instead of one (batch*seq, vocab) tensor in memory.
HEAD_CHUNK = 128


class LinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(hidden @ weight.T, targets) summed over rows whose target is not -100, and the count of
    correct argmaxes, without ever holding all logits: each chunk's logits are made, scored and turned into
    the gradients of hidden and weight at once (d loss / d logits = softmax - one-hot), then dropped. The
    matmuls are the ones autograd would run; the full-size logits, their softmax and its backward are not."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        n_rows = hidden.shape[0]
        grads = hidden.requires_grad or weight.requires_grad
        w = weight.to(hidden.dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if grads else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads else None
        for start in range(0, n_rows, chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            scored = t != -100
            safe = torch.where(scored, t, 0)
            logits = (h @ w.T).float()                                        # (chunk, vocab)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe[:, None]).squeeze(1)
            total += torch.where(scored, lse - picked, 0.0).sum()
            correct += ((logits.argmax(-1) == t) & scored).sum()
            if grads:
                probs = logits.sub_(lse[:, None]).exp_()                      # softmax, in place of the logits
                probs.scatter_add_(1, safe[:, None], -scored[:, None].float())
                probs.mul_(scored[:, None])                                   # unscored rows give no gradient
                g = probs.to(h.dtype)
                grad_hidden[start:start + chunk] = g @ w
                grad_weight.addmm_(g.T.float(), h.float())                    # no copies in fp32
        if grads:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total, correct

    @staticmethod
    def backward(ctx, grad_total, grad_correct):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), grad_weight * grad_total.to(grad_weight.dtype), None, None


class ShiftedCausalLM(torch.nn.Module):
    """Runs the decoder without `labels`, then the vocabulary head and the shifted cross-entropy fused and in
    chunks (LinearCrossEntropy), on every position with a real next token; padding is masked on the device
    (no boolean indexing, which would read the mask back to the host), so no head compute goes to it either."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids=None):
        # Right padding under a causal mask never reaches a real token, so no attention mask is
        # passed; that (and no cache) lets transformers read packed documents from restarting position ids.
        # The embeddings go in, not the ids: given ids and no mask, transformers looks for padding in them
        # first (a read of the device on every forward), to warn.
        embeds = self.model.get_input_embeddings()(input_ids)
        hidden = self.model.base_model(inputs_embeds=embeds, position_ids=position_ids,
                                       use_cache=False).last_hidden_state
        targets = torch.where(attention_mask[:, 1:].bool(), input_ids[:, 1:], -100).reshape(-1)   # (batch*(seq-1),)
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        head = self.model.get_output_embeddings()
        count = (targets != -100).sum()
        if getattr(head, "bias", None) is None:
            total, correct = LinearCrossEntropy.apply(hidden, head.weight, targets, HEAD_CHUNK)
        else:                                                                # a head with a bias: the plain way
            logits = head(hidden).float()
            total = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
            correct = ((logits.argmax(-1) == targets) & (targets != -100)).sum()
        return total / count.clamp(min=1), correct, count


class CausalLM(TextObjective):
    """Documents end with EOS and are cut into blocks of max_length; the last, shorter block of each
    packing batch is kept (padded at the right, never scored there), not dropped."""

    name = "causal_lm"
    families = CAUSAL_FAMILIES
    stat_names = ("loss", "accuracy")
    headline = ("loss", "perplexity", "accuracy")
    pipeline_tag = "text-generation"
    reports_perplexity = True
    streams = True
    Options = Options

    def __init__(self, options: Options, tokenizer, max_length: int = 128, seed: int = 0):
        if tokenizer.eos_token_id is None:
            raise LmsslError("the causal_lm objective needs a tokenizer with an EOS token to join documents; "
                             "this one has none")
        super().__init__(options, tokenizer, max_length, seed)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def build_model(self, model_cfg):
        from transformers import AutoModelForCausalLM

        if model_cfg.init_from:
            return AutoModelForCausalLM.from_pretrained(model_cfg.init_from, trust_remote_code=model_cfg.trust_remote_code)
        return AutoModelForCausalLM.from_config(build_config(model_cfg, self.tokenizer, self.max_length))

    def packing(self) -> Packing:
        """Every document ends with EOS; blocks are max_length tokens with nothing added."""
        return Packing(self.max_length, append=(self.tokenizer.eos_token_id,))

    def prepare(self, dataset, column: str = "text"):
        return self.packing().prepare(dataset, self.tokenizer, column)

    def collate(self, examples):
        input_ids = pad_rows([e["input_ids"] for e in examples], self.pad_id)
        attention = pad_rows([[1] * len(e["input_ids"]) for e in examples], 0)
        batch = {"input_ids": input_ids, "attention_mask": attention}
        if self.options.document_attention:
            batch["position_ids"] = document_positions(input_ids, self.tokenizer.eos_token_id)
        return batch

    def training_module(self, model):
        return ShiftedCausalLM(model)

    def loss(self, module, batch):
        loss, correct, count = module(**batch)      # all device tensors: nothing is read back here
        return loss, {"loss": (loss.detach() * count, count), "accuracy": (correct, count)}
