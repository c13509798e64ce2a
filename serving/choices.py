"""A request's choices (its ``n`` for each of its prompts, each one engine request): their outputs
merged as they come, and what the response says of them together (``usage``, ``speculative``)."""

from __future__ import annotations

import asyncio

from fastapi import Request

from onlinespec.decode.engine import GenerationStats, StepOutput
from onlinespec.errors import InvalidRequestError
from serving.engine_loop import RequestHandle
from serving.errors import ApiError

__all__ = ["ClientGone", "outputs", "speculative", "usage"]


def _spec_of(gen, stats) -> dict:
    drafter = gen.drafter if gen else None
    return {
        "mean_accepted_length": stats.mean_accepted_length if stats else None,
        "drafted_tokens": stats.drafted if stats else 0,
        "accepted_tokens": stats.accepted if stats else 0,
        "draft_steps": stats.spec_steps if stats else 0,  # steps that verified drafts
        # drafts copied by suffix speculation (counted in drafted/accepted above)
        "copied_tokens": stats.copied if stats else 0,
        "copied_accepted_tokens": stats.copied_accepted if stats else 0,
        "drafter_id": drafter.drafter_id if drafter else None,
        "drafter_version": drafter.version if drafter else None,
        # the drafter model's own drafts and suffix copies, apart
        "own": {"drafted_tokens": stats.own_drafted if stats else 0,
                "accepted_tokens": stats.own_accepted if stats else 0,
                "draft_steps": stats.own_steps if stats else 0,
                # up to each block's first rejection: accepted / judged is its acceptance per position
                "judged_tokens": stats.own_judged if stats else 0,
                "mean_accepted_length": stats.own_accepted_length if stats else None},
        "copied": {"drafted_tokens": stats.copied if stats else 0,
                   "accepted_tokens": stats.copied_accepted if stats else 0,
                   "draft_steps": stats.copy_steps if stats else 0,
                   "mean_accepted_length": stats.copied_accepted_length if stats else None},
        # of the copies, those drafted from the request's predicted output (OpenAI's prediction)
        "predicted": {"drafted_tokens": stats.predicted if stats else 0,
                      "accepted_tokens": stats.predicted_accepted if stats else 0},
    }


def speculative(handles: list[RequestHandle]) -> dict:
    """What drafts did for the request: its choices' counts summed (the drafter: choice 0's),
    and with several choices (``n`` > 1, or several prompts) each one's under ``choices``."""
    gens = [h.generation for h in handles]
    if len(gens) == 1:
        return _spec_of(gens[0], gens[0].stats if gens[0] else None)
    stats = GenerationStats.combine(g.stats for g in gens if g is not None)
    return {**_spec_of(gens[0], stats), "choices": [_spec_of(g, g.stats if g else None) for g in gens]}


def usage(handles: list[RequestHandle], prompt_len: int, completion: int, n: int = 1) -> dict:
    """``prompt_len``: the prompts' tokens, each prompt counted once for its ``n`` choices."""
    # OpenAI's cached_tokens: prompt tokens whose keys and values came from the prefix cache
    # (each prompt's: the fewest any of its choices read)
    cached = sum(min(getattr(h.generation, "cached_tokens", 0) or 0 for h in handles[i:i + n])
                 for i in range(0, len(handles), n))
    out = {"prompt_tokens": prompt_len, "completion_tokens": completion, "total_tokens": prompt_len + completion,
           "prompt_tokens_details": {"cached_tokens": cached}}
    if any(h.params.prediction for h in handles):  # OpenAI's: what came of the predicted output
        stats = [h.generation.stats for h in handles if h.generation is not None]
        accepted = sum(s.predicted_accepted for s in stats)
        out["completion_tokens_details"] = {"accepted_prediction_tokens": accepted,
                                            "rejected_prediction_tokens": sum(s.predicted for s in stats) - accepted}
    return out


class ClientGone(Exception):
    """The client closed its connection before its answer was complete: its requests were
    cancelled (the engine drops them), and nobody is left to answer."""


async def _next(handle: RequestHandle, request: Request) -> list[StepOutput]:
    """The handle's next outputs: one step's, or (not streamed) all of them in one list."""
    while True:
        try:
            item = await asyncio.wait_for(handle.outputs.get(), timeout=1.0)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                handle.cancel()
                raise ClientGone from None
            continue
        if isinstance(item, InvalidRequestError):
            raise ApiError(400, str(item))
        if isinstance(item, Exception):
            raise ApiError(500, f"generation failed: {item}", type_="server_error")
        return item if isinstance(item, list) else [item]


async def outputs(handles: list[RequestHandle], request: Request):
    """(choice index, output) as the choices' steps come, until every choice finished."""
    if len(handles) == 1:
        while True:
            for out in await _next(handles[0], request):
                yield 0, out
                if out.finished:
                    return
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, handle: RequestHandle):
        try:
            while True:
                outs = await _next(handle, request)
                for out in outs:
                    merged.put_nowait((i, out))
                if outs[-1].finished:
                    return
        except (Exception, asyncio.CancelledError) as exc:
            merged.put_nowait((i, exc))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        left = len(handles)
        while left:
            i, item = await merged.get()
            if isinstance(item, BaseException):
                raise item
            yield i, item
            left -= item.finished
    finally:
        for task in tasks:
            task.cancel()
