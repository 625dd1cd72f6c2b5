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

from router_service.engine.pipeline import forward_overlapped
from router_service.engine.sequence import Sequence
from router_service.model.attention import PagedAttention, PagedStep
from router_service.model.dense import DenseModel, ExpertsFn
from router_service.model.paged_cache import KVPool
from router_service.model.sampling import sample, top_logprobs


@dataclass
class _Part:
    """One micro-batch of a step, ready to run."""

    size: int  # batch entries
    input_ids: torch.Tensor
    attention: PagedAttention
    logit_rows: torch.Tensor
    sampled: list[int]  # its entries (within the part) that sample a token
    scored: list[tuple[int, int]]  # its Score entries (within the part) and their chunk sizes


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
    def __init__(self, dense: DenseModel, experts: ExpertsFn, pool: KVPool, micro_batches: int = 1):
        self.dense, self.experts, self.pool, self.micro_batches = dense, experts, pool, micro_batches
        self.overlapped_steps = 0  # steps run as two micro-batches
        self.spec, self.device = dense.spec, dense.device
        # The Triton decode kernel reads block tables itself; elsewhere decode keys are gathered.
        self._gather = self.device.type != "cuda"

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]]) -> StepOutput:
        parts = [self._prepare(part) for part in self._split(batch)]
        offsets = self._offsets(parts)
        sampled = [i for offset, p in zip(offsets, parts) for i in (offset + j for j in p.sampled)]
        scored = [(offset + j, n) for offset, p in zip(offsets, parts) for j, n in p.scored]
        if len(parts) == 1:
            p = parts[0]
            logits = [self.dense.forward(p.input_ids, p.attention, self.experts, p.logit_rows)]
        else:
            self.overlapped_steps += 1
            logits = forward_overlapped(self.dense, self.experts,
                                        [(p.input_ids, p.attention, p.logit_rows) for p in parts])
        # the sampled rows of every micro-batch first, then every Score row, in batch order
        logits = torch.cat([lg[:len(p.sampled)] for lg, p in zip(logits, parts)]
                           + [lg[len(p.sampled):] for lg, p in zip(logits, parts)])
        for seq, n in batch:
            seq.num_computed += n
        transfer = []  # what comes back to the host, as one float64 tensor
        want_logprobs = any(batch[i][0].params.logprobs for i in sampled)
        k = max((batch[i][0].params.top_logprobs for i in sampled), default=0)  # alternatives: the most any asks
        if sampled:
            seqs = [batch[i][0] for i in sampled]
            tokens, logprobs = sample(logits[:len(sampled)], [s.params for s in seqs],
                                      [s.generator for s in seqs], want_logprobs)
            transfer += [tokens.to(torch.float64)] + ([logprobs.to(torch.float64)] if want_logprobs else [])
            if k:  # the k best of every sampled row, in the same transfer; each request keeps its own count
                top_values, top_ids = top_logprobs(logits[:len(sampled)], k)  # [S, k] each
                transfer += [top_ids.flatten().to(torch.float64), top_values.flatten().to(torch.float64)]
        if scored:
            transfer.append(self._score_rows(logits[len(sampled):], batch, scored))
        host = torch.cat(transfer).tolist() if transfer else []  # the step's one device-to-host transfer
        out = StepOutput([None] * len(batch), [None] * len(batch), [[] for _ in batch])
        for j, i in enumerate(sampled):
            out.tokens[i] = int(host[j])
            out.logprobs[i] = host[len(sampled) + j] if want_logprobs else None
        offset = len(sampled) * (2 if want_logprobs else 1)
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

    def _split(self, batch: list[tuple[Sequence, int]]) -> list[list[tuple[Sequence, int]]]:
        """The step's micro-batches: two halves of about equal tokens when micro_batches is 2 and the
        experts can be waited on asynchronously (RemoteExperts.submit), else the whole batch."""
        if self.micro_batches < 2 or len(batch) < 2 or not hasattr(self.experts, "submit"):
            return [batch]
        total, running = sum(n for _, n in batch), 0
        for cut, (_, n) in enumerate(batch, start=1):
            running += n
            if running * 2 >= total:
                break
        cut = min(cut, len(batch) - 1)
        return [batch[:cut], batch[cut:]]

    @staticmethod
    def _offsets(parts) -> list[int]:
        offsets, at = [], 0
        for p in parts:
            offsets.append(at)
            at += p.size
        return offsets

    def _prepare(self, batch: list[tuple[Sequence, int]]) -> "_Part":
        """Token ids, the attention context and the rows that need logits of (part of) a batch: the last
        row of every sequence that samples, every row of a Score chunk; sampled rows first."""
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
        step = PagedStep.build(segments, self.pool.block_size, self.spec.sliding_window, self.device, self._gather)
        return _Part(len(batch), torch.tensor(ids, dtype=torch.int64).to(self.device, non_blocking=True),
                     PagedAttention(self.pool, step, self.spec.sliding_window),
                     torch.tensor(sample_rows + score_rows, dtype=torch.int64).to(self.device, non_blocking=True),
                     sampled, scored)

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
