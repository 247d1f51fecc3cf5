"""Document masking (data.document_mask): packed documents give the outputs of the documents run
one by one, for every attention kind that supports it and every positional scheme; kinds that
cannot mask documents are refused at load time; decoding recomputes instead of caching."""

from __future__ import annotations

import pytest
import torch

from lmtrain.config import ConfigError
from lmtrain.model.decoder import documents
from tests.helpers import V, make_model, property_config

EOT = 0
KINDS = {
    "softmax": [],
    "sparse": ["model.attention.pattern=window", "model.attention.window=6", "model.attention.block=4"],
    "adaptive_span": ["model.attention.init_span=6", "model.attention.max_span=16", "model.attention.ramp=4",
                      "model.attention.block=4"],
}
POSITIONS = ["alibi", "rope", "sinusoidal", "learned", "none"]


def test_documents_and_positions_within_them():
    idx = torch.tensor([[5, 6, EOT, 7, EOT, EOT, 8, 9]])
    doc, pos = documents(idx, torch.tensor(EOT))
    assert doc.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]  # an end token belongs to its document
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


def packed_docs(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 11, 1, 9]  # each ends with EOT but the last, which the window cuts
    docs = [torch.randint(1, V, (n,), generator=g) for n in lengths]
    for d in docs[:-1]:
        d[-1] = EOT
    return docs


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_packed_documents_equal_the_documents_one_by_one(kind, position):
    model = make_model(f"model.attention.kind={kind}", *KINDS[kind], f"model.position={position}",
                       "data.document_mask=true")
    model.document_eot.fill_(EOT)
    docs = packed_docs()
    packed = torch.cat(docs)[None]
    with torch.no_grad():
        together = model(packed).logits_BLV[0]
        alone = torch.cat([model(d[None]).logits_BLV[0] for d in docs])
    torch.testing.assert_close(together, alone, rtol=1e-9, atol=1e-9)
    if kind == "softmax":  # its document path (the fused kernel per query block), not the reference
        assert all(k.path_counts["documents"] >= 1 for k in model.attention_kernels())
    # Without the mask, documents see each other: the test can fail.
    model.document_mask = False
    with torch.no_grad():
        leaky = model(packed).logits_BLV[0]
    assert not torch.allclose(leaky, alone, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", list(KINDS))
def test_gradients_match_the_reference_with_documents(kind):
    from tests.helpers import fast_vs_reference, kernel_tolerance

    model = make_model(f"model.attention.kind={kind}", *KINDS[kind], "model.position=alibi",
                       "data.document_mask=true", train=True)
    model.document_eot.fill_(EOT)
    x = torch.stack([torch.cat(packed_docs(s)) for s in (0, 1)])
    (fast, g_fast), (ref, g_ref) = fast_vs_reference(model, x)
    tol = kernel_tolerance(model, torch.float64)
    torch.testing.assert_close(fast, ref, **tol)
    for name in g_ref:
        torch.testing.assert_close(g_fast[name], g_ref[name], **tol, msg=name)


def test_kinds_without_document_masks_are_refused_in_one_line():
    with pytest.raises(ConfigError) as err:
        property_config("model.attention.kind=performer", "model.position=rope", "data.document_mask=true")
    msg = str(err.value).strip()
    assert "data.document_mask=true: model.attention.kind=performer" in msg and "softmax" in msg and "\n" not in msg


def test_decoding_recomputes_instead_of_caching():
    from lmtrain.generate import generate

    model = make_model("data.document_mask=true")
    model.document_eot.fill_(EOT)
    assert not model.supports_kv_cache()
    out = generate(model, torch.tensor([[3, 4, EOT, 5]]), max_new_tokens=3, temperature=0.0)
    assert out.shape[-1] >= 7
