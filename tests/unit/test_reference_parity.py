"""ReferenceModel against transformers' own classes, fp32, on random-weight checkpoints."""
from __future__ import annotations

import pytest
import torch

from router_service.model.reference import ReferenceModel

TOL = 1e-4


def _ids(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_logits_match_transformers(hf_checkpoint):
    family, path, hf = hf_checkpoint
    ref = ReferenceModel.from_pretrained(path, dtype=torch.float32)
    assert ref.spec.family == family
    ids = _ids(2, 20, ref.spec.vocab_size)
    with torch.no_grad():
        expected = hf(ids).logits
    got = ref(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOL


def test_incremental_decoding_equals_full_forward(hf_checkpoint):
    _, path, _ = hf_checkpoint
    ref = ReferenceModel.from_pretrained(path)
    ids = _ids(3, 16, ref.spec.vocab_size, seed=1)
    full = ref(ids)
    caches = ref.new_caches(3)
    parts = [ref(ids[:, :6], caches), ref(ids[:, 6:9], caches)]
    parts += [ref(ids[:, i : i + 1], caches) for i in range(9, 16)]
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= TOL
    assert all(c.length == 16 for c in caches)


def test_greedy_generation_matches_transformers(hf_checkpoint):
    _, path, hf = hf_checkpoint
    ref = ReferenceModel.from_pretrained(path)
    prompt = _ids(1, 5, ref.spec.vocab_size, seed=2)[0].tolist()
    ours = ref.generate_greedy(prompt, max_new_tokens=8)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                             pad_token_id=0)[0, 5:].tolist()
    assert ours == theirs


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moectl_checkpoints_load_in_transformers(family, tmp_path):
    """Our checkpoint writer produces what transformers reads, and both models agree."""
    import transformers  # the test extra: missing is a failure, not a skip

    from cluster.checkpoint.make import make_checkpoint

    path = make_checkpoint(family, "tiny", tmp_path, seed=3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref = ReferenceModel.from_pretrained(path)
    ids = _ids(1, 12, ref.spec.vocab_size, seed=4)
    with torch.no_grad():
        expected = hf(ids).logits
    assert (ref(ids) - expected).abs().max().item() <= TOL


def test_make_checkpoint_is_deterministic(tmp_path):
    from cluster.checkpoint.make import make_checkpoint

    a = ReferenceModel.from_pretrained(make_checkpoint("qwen3_moe", "tiny", tmp_path / "a", seed=7))
    b = ReferenceModel.from_pretrained(make_checkpoint("qwen3_moe", "tiny", tmp_path / "b", seed=7))
    c = ReferenceModel.from_pretrained(make_checkpoint("qwen3_moe", "tiny", tmp_path / "c", seed=8))
    ids = _ids(1, 6, a.spec.vocab_size)
    assert torch.equal(a(ids), b(ids))
    assert not torch.equal(a(ids), c(ids))


def test_out_of_vocabulary_ids_are_rejected(tiny_checkpoint):
    ref = ReferenceModel.from_pretrained(tiny_checkpoint)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 319\]"):
        ref(torch.tensor([[1, 320]]))
