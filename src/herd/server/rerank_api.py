"""Rerank (`POST /api/rerank`, `POST /v1/rerank`): the request and response shapes of
llama.cpp's server and the Jina and Cohere rerank APIs, for cross-encoder models.

Request: `model`, `query` (a string), `documents` (strings, or Jina's objects with a
`text`), `top_n` (a positive integer; absent: every document; more than there are: every
document, as llama.cpp clamps it), `return_documents` (default false), `keep_alive`,
`options`. Response: `{"model", "object": "list", "results": [{"index",
"relevance_score", "document"?: {"text"}}], "usage": {"prompt_tokens", "total_tokens"}}`,
results best first. `relevance_score` is the classifier's raw logit, as llama.cpp's
server returns it (its sigmoid is the 0..1 score of sentence-transformers' CrossEncoder);
the runner's rule for a pair longer than the context is in `herd.runner.rerank` (the
document is cut, the query never), and a text far longer than any context could hold
(`validate.text_fits`) is refused before it is tokenized. Errors are Ollama's shape on
/api/rerank and OpenAI's on /v1/rerank; a model without a classifier head is a 400
`"<model>" does not support rerank`, as Ollama words its other capabilities.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from herd.errors import BadRequestError
from herd.options import INT32
from herd.server import validate
from herd.server.http import JSON, flag, handles_errors, keep_alive_of, read_json, watch
from herd.server.service import Service


def documents_of(value: Any) -> list[str]:
    """`documents`: a non-empty list of strings or of objects with a string `text`."""
    if value is None or isinstance(value, list) and not value:
        raise BadRequestError("documents must be a non-empty list")
    out = []
    for i, doc in enumerate(validate.items(value, "documents")):
        if isinstance(doc, dict):
            doc = validate.text(doc, "text", f"documents[{i}].text")
        if not isinstance(doc, str):
            raise BadRequestError(f"documents[{i}] must be a string or an object with a text")
        out.append(doc)
    return out


class RerankAPI:
    def __init__(self, service: Service) -> None:
        self.service = service

    def routes(self) -> list[Route]:
        return [
            Route("/api/rerank", handles_errors()(self.rerank), methods=["POST"]),
            Route("/v1/rerank", handles_errors(openai=True)(self.rerank), methods=["POST"]),
        ]

    async def rerank(self, request: Request) -> Response:
        body = await read_json(request)
        name = body.get("model")
        ref = self.service.model(name)
        query = body.get("query")
        if not isinstance(query, str):
            raise BadRequestError("query is required and must be a string")
        docs = documents_of(body.get("documents"))
        top_n = body.get("top_n")
        if top_n is not None:
            validate.integer(top_n, "top_n", 1, INT32 - 1)
        return_documents = flag(body, "return_documents", False)
        keep_alive = keep_alive_of(body)
        if "rerank" not in (await self.service.facts(ref)).capabilities:
            raise BadRequestError(f'"{name}" does not support rerank')
        spec = await self.service.load_spec(ref, body.get("options"))
        for text in (query, *docs):  # far past any context: refused before tokenizing
            validate.text_fits({"prompt": text}, spec.context_length())
        results, count, _ = await watch(
            request, self.service.rerank(spec, keep_alive, query, docs, top_n)
        )
        if return_documents:
            results = [{**r, "document": {"text": docs[int(r["index"])]}} for r in results]
        return JSON(
            {
                "model": name,
                "object": "list",
                "results": results,
                "usage": {"prompt_tokens": count, "total_tokens": count},
            }
        )
