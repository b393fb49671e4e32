"""HTTP serving: one base model and many adapters behind OpenAI's API (`lorakit serve`).

    app.py              the endpoints, and the gate in front of /v1/ (draining, API keys, request metrics)
    front_door.py       what every request must be first: its Host, a JSON body, the body's size and time
    connections.py      the HTTP protocol's own limits: time for the headers, connections at once
    openapi.py          the OpenAPI document, with every status and body each endpoint answers
    schemas.py          the request bodies accepted, strictly
    prompts.py          prompts and chat messages to token ids
    generation.py       waiting on the engine: deadline, client disconnects, how a request ended
    openai_format.py    responses and server-sent event chunks in OpenAI's shape
    error_responses.py  every error as {"error": {message, type, param, code}} with its status code
    auth.py             API keys, tenants and what each may use
    tenancy.py          who owns which adapter, who sees and manages it
    adapter_sources.py  where runtime loads may read adapters from (roots, the hub, the registry)
    adapter_policy.py   which adapters may be served at all (signed by a trusted key, vetted), start-up and runtime
    metrics.py          Prometheus metrics in the app's own registry
    server.py           uvicorn, SIGTERM draining, exit status
"""

from lorakit.serve.adapter_sources import AdapterSources
from lorakit.serve.app import ServeState, build_app
from lorakit.serve.auth import KeyRing, Tenant
from lorakit.serve.server import serve_forever

__all__ = ["AdapterSources", "KeyRing", "ServeState", "Tenant", "build_app", "serve_forever"]
