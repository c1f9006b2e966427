"""Padding-free (packed) forwards give the padded forward's numbers, on CPU.

The CUDA path packs every batch (backends/packing.py); CI has no GPU, so these tests run the same
packing, the same transformers attention hook and the same heads on CPU, where attention takes the
padded fallback inside the hook. Every other layer runs on the packed row exactly as on the GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from reranker.backends.packing import DevicePacked, PackedEncoder, pack

PAIRS = [
    ("what is machine learning", "Machine learning is a subset of artificial intelligence that learns from data."),
    ("capital of france", "The capital of France is Paris, a city on the Seine. " * 3),
    ("redis", "Redis is an in-memory data store."),
    ("kubernetes pods", "Kubernetes schedules containers onto nodes and restarts them when they fail. " * 2),
    ("a", "b"),
]


def on_cpu(packed) -> DevicePacked:  # type: ignore[no-untyped-def]
    def t(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(a)

    return DevicePacked(input_ids=t(packed.input_ids), token_type_ids=t(packed.token_type_ids),  # type: ignore[arg-type]
                        position_ids=t(packed.position_ids), cu_seqlens=t(packed.cu_seqlens).int(),  # type: ignore[union-attr]
                        slots=t(packed.slots), max_len=packed.max_len)  # type: ignore[arg-type]


def test_pack_layout() -> None:
    packed = pack([[5, 6, 7], [8], [9, 10]], [[0, 0, 1], [0], [1, 1]], position_offset=2)
    assert packed.input_ids.tolist() == [5, 6, 7, 8, 9, 10]
    assert packed.token_type_ids is not None and packed.token_type_ids.tolist() == [0, 0, 1, 0, 1, 1]
    assert packed.position_ids.tolist() == [2, 3, 4, 2, 2, 3]  # restart at each pair, from the offset
    assert packed.cu_seqlens.tolist() == [0, 3, 4, 6]
    assert packed.max_len == 3 and packed.rows == 3 and packed.tokens == 6
    assert packed.slots.tolist() == [0, 1, 2, 3, 6, 7]  # row * max_len + position in the row
    assert pack([[1, 2]], [None]).token_type_ids is None  # segment ids only when every row has them


@pytest.mark.parametrize("model_fixture", ["tiny_bert", "tiny_xlmr"])
def test_packed_cross_encoder_matches_padded(model_fixture: str, request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(model_fixture)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    enc = tokenizer([q for q, _ in PAIRS], [d for _, d in PAIRS], truncation=True, max_length=128)
    with torch.inference_mode():
        padded = tokenizer.pad(enc, return_tensors="pt")
        want = model(**padded).logits[:, 0]
        encoder = PackedEncoder(model, cross_encoder=True)
        packed = pack(enc["input_ids"], enc.get("token_type_ids"), position_offset=encoder.position_offset)
        batch = on_cpu(packed)
        got = encoder.logits(encoder.hidden(batch), batch)[:, 0]
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
        # The same model still answers padded batches (SDPA) after packing was switched on.
        again = model(**padded).logits[:, 0]
    assert torch.allclose(again, want, atol=1e-6)
    assert len(set(np.round(want.numpy(), 4))) == len(PAIRS)  # distinct scores: a real comparison


def test_packed_bi_encoder_matches_padded(minilm: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(minilm))
    model = AutoModel.from_pretrained(str(minilm)).eval()
    texts = [t for pair in PAIRS for t in pair]
    enc = tokenizer(texts, truncation=True, max_length=128)
    with torch.inference_mode():
        padded = tokenizer.pad(enc, return_tensors="pt")
        hidden = model(**padded).last_hidden_state
        mask = padded["attention_mask"]
        encoder = PackedEncoder(model, cross_encoder=False)
        batch = on_cpu(pack(enc["input_ids"], enc.get("token_type_ids"), position_offset=encoder.position_offset))
        block, got_mask = encoder.unpack(encoder.hidden(batch), batch)
    assert torch.equal(got_mask, mask)
    real = mask.bool()
    assert torch.allclose(block[real], hidden[real], atol=1e-5), (block[real] - hidden[real]).abs().max()
    assert not block[~real].any()  # padding slots stay empty


def test_unknown_head_is_not_packed(tmp_path: Path) -> None:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    model = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2,
                                                                 hidden_dim=32, num_labels=1))
    assert not PackedEncoder.supports(model, cross_encoder=True)


def test_segment_ids_of_any_shape_survive_packing() -> None:
    rows = [[1, 2, 3, 4], [5, 6, 7], [8, 9]]
    for types in ([[0, 0, 1, 1], [0, 1, 1], [0, 0]], [[0, 1, 0, 1], [2, 2, 2], [1, 0]]):  # pairs; anything else
        packed = pack(rows, types)
        assert packed.token_type_ids is not None
        assert packed.token_type_ids.tolist() == [t for row in types for t in row]
