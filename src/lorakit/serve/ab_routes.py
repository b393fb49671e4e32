"""The A/B endpoints: aliases, feedback, each alias's report, the leaderboard, and the playground page.

    GET    /v1/aliases                 the aliases this key sees, with their targets and shares
    POST   /v1/aliases                 {"alias", "targets": {adapter: weight}}: create (201) or re-weight (200)
    DELETE /v1/aliases/{name}
    GET    /v1/aliases/{name}/report   per variant: completions, mean score and win rate with 95% intervals,
                                       and each variant against the first target (significance.py)
    POST   /v1/feedback                {"id", "score"} or {"id", "preferred", "against"?}: 204
    GET    /v1/feedback/pairs          head-to-head votes by the pair of what served them (the playground's table)
    GET    /v1/leaderboard[?task=T]    adapter versions ranked per task by `lorakit eval` results and by votes
                                       (serve/leaderboard.py); a key sees the versions it may use and its own
                                       tenant's votes, an admin everything; an unknown task is a 404 naming them
    GET    /playground                 the page (playground.html; its API calls carry the key typed into it)

Creating or changing an alias needs a key that may manage adapters (can_load_adapters or admin), not
--allow-runtime-loading: an alias loads nothing. Who sees and changes which alias: serve/aliases.py.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from lorakit.engine.routing import ROUTE_MODEL
from lorakit.errors import ConfigError, UnknownModelError
from lorakit.registry import RegistryError
from lorakit.serve import leaderboard
from lorakit.serve import significance
from lorakit.serve.aliases import name_taken
from lorakit.serve.error_responses import APIError
from lorakit.serve.feedback import base_version
from lorakit.serve.openapi import ADAPTER_MANAGEMENT as MANAGEMENT
from lorakit.serve.openapi import KEYED, POSTED, responses
from lorakit.serve.schemas import AliasRequest, FeedbackRequest
from lorakit.serve.tenancy import unknown_model

if TYPE_CHECKING:
    from lorakit.serve.app import ServeState


def install_ab_routes(app: FastAPI, serve: "ServeState") -> None:
    from lorakit.serve.app import tenant

    aliases = serve.aliases

    @app.get("/v1/aliases", responses=responses(*KEYED, ok={"description": "The aliases this key may use"}))
    async def list_aliases(request: Request):
        return {"object": "list", "data": [a.to_json() for a in aliases.visible(tenant(request))]}

    @app.post("/v1/aliases", responses={**responses(*MANAGEMENT, ok={"description": "The alias, re-weighted"}),
                                        201: {"description": "The alias, created"}})
    async def put_alias(body: AliasRequest, request: Request):
        caller = tenant(request)
        if not caller.may_load:
            raise APIError(403, "this API key may not create or change aliases (it needs can_load_adapters)",
                           code="alias_management_not_allowed")
        if body.alias == ROUTE_MODEL:
            raise APIError(400, f"{ROUTE_MODEL!r} asks for routing by prompt; choose another name for the alias",
                           param="alias")
        if body.alias == serve.base_name or _served(serve, body.alias) or body.alias in serve.tenancy.loading:
            raise name_taken(body.alias)
        targets = tuple((resolve_target(serve, caller, name), weight) for name, weight in body.targets.items())
        alias, new = aliases.put(caller, body.alias, targets)
        return JSONResponse(alias.to_json(), status_code=201 if new else 200)

    @app.delete("/v1/aliases/{name}", status_code=204, responses=responses(*MANAGEMENT))
    async def delete_alias(name: str, request: Request):
        aliases.delete(tenant(request), name)
        return Response(status_code=204)

    @app.get("/v1/aliases/{name}/report", responses=responses(*KEYED, 403, 404,
                                                              ok={"description": "Each variant's evidence"}))
    async def report(name: str, request: Request):
        alias = aliases.find(tenant(request), name)
        return alias_report(serve, alias)

    @app.post("/v1/feedback", status_code=204, responses=responses(*POSTED, 404))
    async def feedback(body: FeedbackRequest, request: Request):
        caller = tenant(request)
        for id, param in ((body.id, "id"), (body.against, "against")):
            if id is not None and serve.feedback.served(id, caller.name) is None:
                raise APIError(404, f"no completion {id!r} was served to this key", param=param,
                               code="completion_not_found")
        serve.feedback.add(body.id, caller.name, body.score, body.preferred, body.against)
        return Response(status_code=204)

    @app.get("/v1/feedback/pairs", responses=responses(*KEYED, ok={"description": "Win rates per pair"}))
    async def pairs(request: Request):
        wins = {(a, b): n for a, b, n in serve.feedback.pairs(tenant(request).name)}
        rows = []
        for a, b in sorted({tuple(sorted(pair)) for pair in wins}):
            a_wins, b_wins = wins.get((a, b), 0), wins.get((b, a), 0)
            interval = significance.wilson(a_wins, a_wins + b_wins)
            rows.append({"a": a, "b": b, "a_wins": a_wins, "b_wins": b_wins, "a_win_rate": a_wins / (a_wins + b_wins),
                         "ci95": list(interval)})
        return {"object": "list", "data": rows}

    @app.get("/v1/leaderboard", responses=responses(*KEYED, 404, ok={
        "description": "Adapter versions ranked per task and by votes, with the numbers behind each rank"}))
    async def ranks(request: Request, task: Optional[str] = None):
        caller = tenant(request)
        served = served_versions(serve, caller)
        runs = serve.feedback.eval_runs()
        if not caller.admin:  # another tenant's adapters, and versions this key may not use, do not exist for it
            runs = [r for r in runs if r.version in served]
        votes = serve.feedback.version_votes(None if caller.admin else caller.name)
        try:
            return leaderboard.leaderboard(runs, votes, served, task)
        except ConfigError as exc:
            raise APIError(404, str(exc), param="task", code="task_not_found") from None

    @app.get("/playground", response_class=HTMLResponse, include_in_schema=False)
    async def playground():
        return HTMLResponse(PLAYGROUND, headers={"Cache-Control": "no-cache"})


PLAYGROUND = resources.files("lorakit.serve").joinpath("playground.html").read_text(encoding="utf-8")


def resolve_target(serve: "ServeState", caller, target: str) -> str:
    """The served adapter a target names: an adapter the caller sees, or (with a registry) the served adapter
    of the registry version `target` references; the one 404 otherwise."""
    if _served(serve, target):
        serve.tenancy.find(caller, target, f"targets.{target}")
        return target
    registry = serve.policy.registry
    if registry is None or target == serve.base_name:
        raise unknown_model(target, f"targets.{target}")
    try:
        reference = registry.resolve(target).reference
    except RegistryError:
        raise unknown_model(target, f"targets.{target}") from None
    for name, trust in serve.trust.items():
        if trust.registry == reference and serve.tenancy.sees(caller, name):
            return name
    raise APIError(404, f"the registry version {reference} is not served here; load it first (lora_path "
                        f"\"registry:{reference}\")", param=f"targets.{target}", code="model_not_found")


def served_versions(serve: "ServeState", caller) -> dict[str, list[str]]:
    """{version: the names it is served under} over what `caller` may use: its adapters and the base model."""
    served: dict[str, list[str]] = {}
    if serve.tenancy.sees(caller, serve.base_name):
        served[base_version(serve.base_name)] = [serve.base_name]
    for info in serve.engine.adapters():
        if serve.tenancy.sees(caller, info.name):
            served.setdefault(info.digest, []).append(info.name)
    return served


def _served(serve: "ServeState", name: str) -> bool:
    try:
        serve.engine.adapter(name)
    except UnknownModelError:
        return False
    return True


def alias_report(serve: "ServeState", alias) -> dict:
    """Each variant's evidence, and each against the first target (the control) at significance.ALPHA."""
    total = sum(w for _, w in alias.targets)
    evidence = {name: serve.feedback.evidence(alias.name, name) for name, _ in alias.targets}
    variants = []
    for name, weight in alias.targets:
        e = evidence[name]
        mean = sum(e.scores) / len(e.scores) if e.scores else None
        variants.append({"variant": serve.served_by(name), "adapter": name, "weight": weight, "share": weight / total,
                         "completions": e.completions,
                         "score": {"count": len(e.scores), "mean": mean,
                                   "ci95": _pair(significance.mean_interval(e.scores))},
                         "preference": {"count": e.votes, "wins": e.wins,
                                        "win_rate": e.wins / e.votes if e.votes else None,
                                        "ci95": _pair(significance.wilson(e.wins, e.votes))}})
    control, comparisons = alias.targets[0][0], []
    for name, _ in alias.targets[1:]:
        a, b = evidence[name], evidence[control]
        score_p = significance.welch_p(a.scores, b.scores)
        vote_p = significance.two_proportion_p(a.wins, a.votes, b.wins, b.votes)
        comparisons.append({"variant": name, "against": control,
                            "score": {"test": "welch_t", "p_value": score_p, "significant": _significant(score_p)},
                            "preference": {"test": "two_proportion_z", "p_value": vote_p,
                                           "significant": _significant(vote_p)}})
    return {"alias": alias.name, "alpha": significance.ALPHA, "variants": variants, "comparisons": comparisons,
            "significant": any(c["score"]["significant"] or c["preference"]["significant"] for c in comparisons)}


def _pair(interval):
    return list(interval) if interval is not None else None


def _significant(p_value) -> bool:
    return p_value is not None and p_value < significance.ALPHA
