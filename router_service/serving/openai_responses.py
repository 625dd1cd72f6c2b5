"""The JSON of OpenAI responses: a whole completion, or its server-sent-event chunks.

    /v1/completions        object "text_completion" (stream: the same object per chunk), choices[].text,
                           logprobs {tokens, token_logprobs, top_logprobs, text_offset}
    /v1/chat/completions   object "chat.completion" / "chat.completion.chunk", choices[].message / .delta,
                           logprobs {content: [{token, logprob, bytes, top_logprobs}]}

Every response carries `usage` (prompt, completion, total tokens; a stream sends it in a last chunk
with no choices when stream_options.include_usage is set) and `system_fingerprint`: the placement
version the router used, so a client can tell two answers came from different expert placements.
A token's text is its own decoding, or "token_id:N" with return_tokens_as_token_ids (or without a
tokenizer), which names the id exactly.
"""
from __future__ import annotations

import itertools
import time
import uuid

from router_service.model.tokenizer import Tokenizer
from router_service.serving.openai_choices import Delta
from router_service.serving.openai_schema import Plan


class Responses:
    def __init__(self, plan: Plan, model: str, placement_version: int, tokenizer: Tokenizer | None,
                 prompt_logprobs: list[list[float]]):
        self.plan, self.model, self.tokenizer = plan, model, tokenizer
        self.chat = plan.kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.fingerprint = f"placement-v{placement_version}"
        self.prompt_logprobs = prompt_logprobs
        self._choices = {i: {"text": [], "ids": [], "logprobs": [], "top": [], "finish": None, "offset": 0}
                         for i, _, _ in plan.choices()}

    # ---- streaming ----

    def opening_chunks(self) -> list[dict]:
        """Before any token: chat's role delta per choice; a completion's echoed prompt per choice."""
        out = []
        for index, p, _ in self.plan.choices():
            if self.chat:
                out.append(self._chunk({"index": index, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}))
            elif self.plan.echo:
                prompt = self.plan.prompts[p]
                out.append(self._chunk({"index": index, "text": prompt.text, "finish_reason": None,
                                        "logprobs": self._echo_logprobs(index, p)}))
        return out

    def chunk(self, d: Delta) -> dict:
        logprobs = self._logprobs(d.index, d.token_ids, d.logprobs, d.top_logprobs) if self.plan.logprobs else None
        if self.chat:
            delta = {"content": d.text} if d.text or d.finish_reason is None else {}
            return self._chunk({"index": d.index, "delta": delta, "logprobs": logprobs,
                                "finish_reason": d.finish_reason})
        return self._chunk({"index": d.index, "text": d.text, "logprobs": logprobs, "finish_reason": d.finish_reason})

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._head(self._object(stream=True)), "choices": [], "usage": usage}

    # ---- whole response ----

    def add(self, d: Delta) -> None:
        c = self._choices[d.index]
        c["text"].append(d.text)
        c["ids"] += d.token_ids
        c["logprobs"] += d.logprobs
        c["top"] += d.top_logprobs
        c["finish"] = d.finish_reason or c["finish"]

    def whole(self, usage: dict) -> dict:
        choices = []
        for index, p, _ in self.plan.choices():
            c = self._choices[index]
            text, head, logprobs = "".join(c["text"]), None, None
            c["offset"] = 0
            if self.plan.echo:  # the prompt's text and tokens ahead of the completion's
                text = self.plan.prompts[p].text + text
                head = self._echo_logprobs(index, p)
            if self.plan.logprobs:
                logprobs = self._logprobs(index, c["ids"], c["logprobs"], c["top"])
                if head is not None:
                    logprobs = {k: head[k] + logprobs[k] for k in logprobs}
            if self.chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                "logprobs": logprobs, "finish_reason": c["finish"]})
            else:
                choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": c["finish"]})
        return {**self._head(self._object(stream=False)), "choices": choices, "usage": usage}

    # ---- parts ----

    def _object(self, stream: bool) -> str:
        return ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def _chunk(self, choice: dict) -> dict:
        head = self._head(self._object(stream=True))
        return {**head, "choices": [choice], **({"usage": None} if self.plan.include_usage else {})}

    def token(self, token_id: int) -> str:
        if self.plan.tokens_as_ids or self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])

    def _logprobs(self, index: int, ids: list[int], logprobs: list[float], top: list) -> dict:
        tops = top if top else [[] for _ in ids]
        if self.chat:
            def entry(t, lp):
                text = self.token(t)
                return {"token": text, "logprob": lp, "bytes": list(text.encode())}

            return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in alts]}
                                for t, lp, alts in zip(ids, logprobs, tops)]}
        tokens = [self.token(t) for t in ids]
        c = self._choices[index]
        offsets = []
        for text in tokens:  # where each token starts in the choice's text (continues across chunks)
            offsets.append(c["offset"])
            c["offset"] += len(text)
        return {"tokens": tokens, "token_logprobs": list(logprobs),
                "top_logprobs": [{self.token(a): alp for a, alp in alts} for alts in tops],
                "text_offset": offsets}

    def _echo_logprobs(self, index: int, p: int) -> dict | None:
        """The prompt's tokens ahead of the completion's: the first has no logprob, the others Score's
        (its alternatives are not computed: empty)."""
        if not self.plan.logprobs:
            self._choices[index]["offset"] = len(self.plan.prompts[p].text)
            return None
        ids = self.plan.prompts[p].ids
        tokens = [self.token(t) for t in ids]
        offsets = list(itertools.accumulate((len(t) for t in tokens), initial=0))  # where each token starts
        self._choices[index]["offset"] = offsets.pop()  # the prompt's whole length
        return {"tokens": tokens, "token_logprobs": [None] + list(self.prompt_logprobs[p]),
                "top_logprobs": [{} for _ in ids], "text_offset": offsets}
