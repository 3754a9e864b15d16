"""Training FLOPs per token and MFU (lmssl/flops.py) against hand counts of real model shapes."""

from __future__ import annotations

import pytest
import torch


def _meta(build):
    with torch.device("meta"):       # the real shapes, without allocating 100M parameters
        return build()


def test_gpt2_124m_flops_per_token_is_the_hand_count():
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmssl.flops import counted_parameters, flops_per_token

    model = _meta(lambda: GPT2LMHeadModel(GPT2Config()))  # 12 x 768, vocabulary 50,257, 1,024 positions
    d, layers, vocab = 768, 12, 50257
    # tied embedding (the head's matmul), 12 d^2 + 13 d per block, the final LayerNorm; no position embeddings
    n = vocab * d + layers * (12 * d * d + 13 * d) + 2 * d
    assert n == 123_653_376 == counted_parameters(model)
    assert flops_per_token(model, 1024) == 6 * n + 12 * layers * d * 1024 == 855_166_464


def test_bert_base_mlm_flops_per_token_is_the_hand_count():
    from transformers import BertConfig, BertForMaskedLM

    from lmssl.flops import counted_parameters, flops_per_token

    model = _meta(lambda: BertForMaskedLM(BertConfig()))
    d, layers, vocab = 768, 12, 30522
    embeddings = vocab * d + 2 * d + 2 * d                    # words, 2 token types, LayerNorm
    head = d * d + d + 2 * d + vocab                          # transform, its LayerNorm, the decoder bias (tied)
    n = embeddings + layers * (12 * d * d + 13 * d) + head
    assert n == 109_121_082 == counted_parameters(model)
    assert flops_per_token(model, 128) == 6 * n + 12 * layers * d * 128 == 668_882_268


def test_counted_parameters_are_all_but_the_position_embeddings_of_a_real_model():
    from transformers import RobertaConfig, RobertaForMaskedLM

    from lmssl.flops import counted_parameters

    torch.manual_seed(0)
    model = RobertaForMaskedLM(RobertaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64, max_position_embeddings=40))
    everything = sum(p.numel() for p in model.parameters())   # shared (tied) tensors once
    positions = model.roberta.embeddings.position_embeddings.weight.numel()
    assert counted_parameters(model) == everything - positions == everything - 40 * 32


def test_an_image_is_its_patch_tokens_and_the_class_token():
    from transformers import ViTConfig, ViTModel

    from lmssl.flops import flops_per_token, flops_per_unit, tokens_per_image

    config = ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=128)
    model = _meta(lambda: ViTModel(config))
    assert tokens_per_image(config) == 65
    assert flops_per_unit(model, "images", None) == 65 * flops_per_token(model, 65)
    assert flops_per_unit(model, "tokens", None) is None       # a text unit needs a sequence length


def test_peaks_come_from_the_table_or_nowhere():
    from lmssl.flops import device_peak, known_peak

    assert known_peak("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert known_peak("NVIDIA H200", "fp32") == 67e12
    assert known_peak("NVIDIA A100-SXM4-80GB", "tf32") == 156e12
    assert known_peak("NVIDIA GeForce RTX 3090", "bf16") is None   # unknown: measured on the device instead
    assert device_peak(torch.device("cpu"), "no") is None          # CPUs report FLOP/s only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_measured_peak_is_a_plausible_matmul_rate():
    from lmssl.flops import measured_peak

    assert 1e12 < measured_peak(torch.device("cuda"), "bf16", size=4096, repeats=3) < 5e15
