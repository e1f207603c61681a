"""GET /v1/models, GET /v1/models/{model_id} (Anthropic's and OpenAI's list/retrieve shapes in one: see
wire.ModelInfo) and GET /health."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kawai.api.errors import InvalidRequestError
from kawai.api.state import LoadedModel, server_state
from kawai.api.wire import ModelInfo, ModelList

MAX_PAGE = 1000
DEFAULT_PAGE = 20


def model_info(m: LoadedModel) -> ModelInfo:
    return ModelInfo(
        id=m.id,
        display_name=m.display_name,
        created_at=m.created_at.strftime("%Y-%m-%dT%H:%M:%SZ"),  # RFC 3339, UTC
        created=int(m.created_at.timestamp()),
        max_input_tokens=m.llm.n_ctx,
        max_tokens=m.llm.n_ctx,
    )


async def list_models(request: Request) -> Response:
    models = sorted(server_state(request).models.values(), key=lambda m: m.id)
    q = request.query_params
    limit = _page_size(q.get("limit"))
    ids = [m.id for m in models]
    if q.get("after_id"):
        start = _cursor(ids, q["after_id"]) + 1
        page = models[start : start + limit]
        has_more = start + limit < len(models)
    elif q.get("before_id"):
        end = _cursor(ids, q["before_id"])
        page = models[max(0, end - limit) : end]
        has_more = end - limit > 0
    else:
        page, has_more = models[:limit], len(models) > limit
    data = [model_info(m) for m in page]
    listing = ModelList(
        data=data, has_more=has_more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
    )
    return JSONResponse(listing.model_dump())


async def get_model(request: Request) -> Response:
    """An alias (or, with one model served, any id) retrieves the model that serves it, under its own id."""
    found = server_state(request).model(request.path_params["model_id"])
    return JSONResponse(model_info(found).model_dump())


async def health(request: Request) -> Response:
    """Liveness only, no details: 200 while every engine thread runs, else 503."""
    ok = server_state(request).healthy
    return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)


def _page_size(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_PAGE
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE:
        raise InvalidRequestError(f"limit: must be an integer in 1..{MAX_PAGE}")
    return int(raw)


def _cursor(ids: list[str], model_id: str) -> int:
    try:
        return ids.index(model_id)
    except ValueError:
        raise InvalidRequestError("after_id/before_id: no such model") from None
