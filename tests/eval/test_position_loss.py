import dataclasses

import pytest
import torch
import torch.nn.functional as F

from kimivl import KimiVL
from kimivl.eval.position_loss import position_loss

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 12, "What colour is the square? It is red. " * 3]


def by_hand(model, documents: list[list[int]], edges) -> dict[str, float]:
    """Every predicted token's loss, averaged per range of its position (positions in no range are left out)."""
    sums, counts = {}, {}
    for doc in documents:
        ids = torch.tensor([doc])
        with torch.no_grad():
            nll = F.cross_entropy(model(input_ids=ids).logits[0, :-1].float(), ids[0, 1:], reduction="none")
        for pos in range(1, len(doc)):
            key = next((f"{a}-{b}" for a, b in zip(edges, edges[1:]) if a <= pos < b), None)
            if key is None:
                continue
            sums[key] = sums.get(key, 0.0) + nll[pos - 1].item()
            counts[key] = counts.get(key, 0) + 1
    return {k: sums[k] / counts[k] for k in sums}


def test_loss_by_position_range_is_the_mean_of_each_tokens_loss(small_model, small_processor):
    edges = (0, 8, 40, 100000)
    got = position_loss(small_model, small_processor, TEXTS, edges)
    assert list(got) == ["0-8", "8-40", "40-100000"]
    assert got == pytest.approx(
        by_hand(small_model, [small_processor.encode_text(t).input_ids for t in TEXTS], edges), rel=1e-5
    )


def test_positions_outside_the_edges_are_left_out(small_model, small_processor):
    """Ranges need not start at 0 nor reach the document's end: tokens before the first edge or past the last one
    count in no range (those before the first edge were counted in the first range)."""
    edges = (8, 20, 40)
    got = position_loss(small_model, small_processor, TEXTS, edges)
    assert list(got) == ["8-20", "20-40"]
    assert got == pytest.approx(
        by_hand(small_model, [small_processor.encode_text(t).input_ids for t in TEXTS], edges), rel=1e-5
    )


def test_documents_are_cut_to_the_context_and_unreached_ranges_left_out(small_model, small_processor):
    ids = small_processor.encode_text(TEXTS[0]).input_ids
    n = len(ids)
    config = dataclasses.replace(
        small_model.config,
        text_config=dataclasses.replace(small_model.config.text_config, max_position_embeddings=n // 2),
    )
    short = KimiVL(config).eval()
    short.load_state_dict(small_model.state_dict())
    edges = (0, n // 4, n // 2, n, 2 * n)
    got = position_loss(short, small_processor, TEXTS[:1], edges)
    assert list(got) == [f"0-{n // 4}", f"{n // 4}-{n // 2}"]
    assert got == pytest.approx(by_hand(short, [ids[: n // 2]], edges), rel=1e-5)


def test_a_document_past_the_context_is_not_tokenized_whole(small_model, small_processor, monkeypatch):
    """A document cut to the context was tokenized whole first (megabytes: seconds, and its ids held); now only the
    tokenizer's first piece (``MAX_ENCODE_CHARS`` characters) is, and the loss is that of the same cut."""
    from kimivl.processing.tokenizer import MAX_ENCODE_CHARS

    config = dataclasses.replace(
        small_model.config,
        text_config=dataclasses.replace(small_model.config.text_config, max_position_embeddings=64),
    )
    short = KimiVL(config).eval()
    short.load_state_dict(small_model.state_dict())
    huge = TEXTS[0] * 3000  # 1.6 MB
    cut = small_processor.encode_text(huge).input_ids[:64]
    pieces, encode = [], small_processor.tokenizer._enc.encode_ordinary
    monkeypatch.setattr(small_processor.tokenizer._enc, "encode_ordinary", lambda t: pieces.append(len(t)) or encode(t))
    edges = (0, 32, 64)
    assert position_loss(short, small_processor, [huge], edges) == pytest.approx(by_hand(short, [cut], edges), rel=1e-5)
    assert sum(pieces) <= MAX_ENCODE_CHARS < len(huge)
