"""The model runner: one scheduled batch -> one forward pass over the KV pool -> sampled tokens.

    prepare   token ids, positions and slots of the batch (host lists -> device tensors), and
              which rows need logits: the last row of every sequence that samples, every row
              of a Score chunk
    forward   DenseModel over PagedAttention (one batched attention call per layer)
    sample    on the device, vectorized over rows; logprob math only if a request wants it
    transfer  one device-to-host copy of everything the step reports (tokens, logprobs, scores)

Knows nothing of queues or clients: engine.py decides what runs and what is emitted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from router_service.engine.sequence import Sequence
from router_service.model.attention import PagedAttention, PagedStep
from router_service.model.dense import DenseModel, ExpertsFn
from router_service.model.paged_cache import KVPool
from router_service.model.sampling import sample, top_logprobs


@dataclass
class StepOutput:
    """Per batch entry: the sampled token and its logprob (None where nothing was sampled:
    a prefill chunk short of the end, a Score chunk), and the Score logprobs it adds; the most
    likely (token, logprob) pairs where the request asked for top_logprobs, else None."""

    tokens: list[int | None]
    logprobs: list[float | None]
    scores: list[list[float]]
    top: list[list[tuple[int, float]] | None] | None = None


class ModelRunner:
    def __init__(self, dense: DenseModel, experts: ExpertsFn, pool: KVPool):
        self.dense, self.experts, self.pool = dense, experts, pool
        self.spec, self.device = dense.spec, dense.device
        # The Triton decode kernel reads block tables itself; elsewhere decode keys are gathered.
        self._gather = self.device.type != "cuda"

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]]) -> StepOutput:
        ids, segments, sample_rows, score_rows, sampled, scored = [], [], [], [], [], []
        row = 0
        for i, (seq, n) in enumerate(batch):
            ids += seq.next_tokens(n)
            segments.append((seq.block_table, seq.num_computed, n))
            if seq.score_only:
                scored.append((i, n))
                score_rows.extend(range(row, row + n))
            elif seq.num_computed + n == seq.length:  # the chunk reaches the end: the next token is drawn
                sampled.append(i)
                sample_rows.append(row + n - 1)  # its last row
            row += n
        rows = sample_rows + score_rows  # logits: the sampled rows first, then every Score row
        step = PagedStep.build(segments, self.pool.block_size, self.spec.sliding_window, self.device, self._gather)
        input_ids = torch.tensor(ids, dtype=torch.int64).to(self.device, non_blocking=True)
        logit_rows = torch.tensor(rows, dtype=torch.int64).to(self.device, non_blocking=True)
        logits = self.dense.forward(input_ids, PagedAttention(self.pool, step, self.spec.sliding_window),
                                    self.experts, logit_rows)  # [R, V]
        for seq, n in batch:
            seq.num_computed += n
        parts = []  # what comes back to the host, as one float64 tensor
        want_logprobs = any(batch[i][0].params.logprobs for i in sampled)
        if sampled:
            seqs = [batch[i][0] for i in sampled]
            tokens, logprobs = sample(logits[:len(sampled)], [s.params for s in seqs],
                                      [s.generator for s in seqs], want_logprobs)
            parts += [tokens.to(torch.float64)] + ([logprobs.to(torch.float64)] if want_logprobs else [])
            k = max(s.params.top_logprobs for s in seqs)
            if k:  # the k best of every sampled row, in the same transfer; each request keeps its own count
                top_values, top_ids = top_logprobs(logits[:len(sampled)], k)  # [S, k] each
                parts += [top_ids.flatten().to(torch.float64), top_values.flatten().to(torch.float64)]
        if scored:
            parts.append(self._score_rows(logits[len(sampled):], batch, scored))
        host = torch.cat(parts).tolist() if parts else []  # the step's one device-to-host transfer
        out = StepOutput([None] * len(batch), [None] * len(batch), [[] for _ in batch])
        for j, i in enumerate(sampled):
            out.tokens[i] = int(host[j])
            out.logprobs[i] = host[len(sampled) + j] if want_logprobs else None
        offset = len(sampled) * (2 if want_logprobs else 1)
        k = max((batch[i][0].params.top_logprobs for i in sampled), default=0)
        if k:
            out.top = [None] * len(batch)
            ids_at, values_at = offset, offset + len(sampled) * k
            for j, i in enumerate(sampled):
                if batch[i][0].params.top_logprobs:
                    row = range(j * k, j * k + batch[i][0].params.top_logprobs)
                    out.top[i] = [(int(host[ids_at + r]), host[values_at + r]) for r in row]
            offset += 2 * len(sampled) * k
        for i, n in scored:
            seq = batch[i][0]
            start = seq.num_computed - n
            count = max(0, min(n, len(seq.prompt) - 1 - start))  # the last token has nothing to score
            out.scores[i] = host[offset: offset + count][max(0, len(seq.scores) - start):]  # a recompute adds nothing twice
            offset += n
        return out

    def _score_rows(self, logits: torch.Tensor, batch, scored) -> torch.Tensor:
        """logits [sum n, V] of the Score chunks -> log p(next prompt token) of every row, flat
        [sum n] (0 where there is none)."""
        targets = []
        for i, n in scored:
            seq = batch[i][0]
            start = seq.num_computed - n
            nxt = seq.prompt[start + 1: start + n + 1]
            targets += nxt + [0] * (n - len(nxt))
        logp = torch.log_softmax(logits.float(), dim=-1)
        index = torch.tensor(targets, dtype=torch.int64, device=logits.device)
        return logp.gather(1, index[:, None]).squeeze(1).to(torch.float64)
