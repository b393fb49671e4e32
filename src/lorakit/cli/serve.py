"""`lorakit serve`: one base model and many adapters behind OpenAI's HTTP API (see lorakit.serve)."""

from __future__ import annotations

import argparse
import os
import re
import sys

from lorakit.cli.generate import add_model_flags, add_quantize_flags
from pathlib import Path

from lorakit.errors import ConfigError, LorakitError

_NAME = re.compile(r"^[A-Za-z0-9][\w.:-]*$")


def parse_adapter_flags(values: list[str], flag: str = "--adapter") -> list[tuple[str, str]]:
    """["NAME=DIR", ...] -> [(name, dir)]; a missing '=', an odd name or a repeated name is a ConfigError."""
    pairs, seen = [], set()
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or not name or not folder:
            raise ConfigError(f"{flag} takes NAME=DIR (e.g. {flag} reverse=runs/reverse), got {value!r}")
        if not _NAME.match(name):
            raise ConfigError(f"{flag} {value!r}: the name {name!r} must start with a letter or digit and hold only "
                              "letters, digits and . _ : -")
        if name in seen:
            raise ConfigError(f"{flag}: the name {name!r} is given twice")
        seen.add(name)
        pairs.append((name, folder))
    return pairs


def run(args: argparse.Namespace) -> int:
    from lorakit.engine import EngineConfig
    from lorakit.engine.remote import EngineProcess
    from lorakit.serve import AdapterSources, KeyRing, ServeState, serve_forever
    from lorakit.serve.adapter_policy import AdapterPolicy
    from lorakit.serve.aliases import parse_alias_flag
    from lorakit.serve.feedback import FeedbackStore, feedback_path

    # Folders are checked (and hub ids fetched, signatures verified) before the engine spends seconds
    # loading the model.
    adapters = parse_adapter_flags(args.adapter)
    registry = _registry(args.registry)
    located = {name: _adapter_source(name, ref, registry) for name, ref in adapters}
    folders = {name: folder for name, (folder, _) in located.items()}
    if args.model is None and folders:
        args.model = common_base(folders)
    policy = AdapterPolicy(registry, tuple(args.trusted_key), args.require_signed, args.require_vetted,
                           base_model=args.model or "embedded")
    trust = {name: _admitted(policy, name, ref, folders[name], located[name][1]) for name, ref in adapters}
    if args.api_keys:
        keys = KeyRing.from_file(args.api_keys)
    elif args.api_key is not None:
        keys = KeyRing.single(args.api_key)
    else:
        keys = KeyRing.open()
    for name in ("request_timeout", "drain_timeout"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be a number of seconds > 0")
    if not 0 <= args.route_threshold <= 1:
        raise ConfigError(f"--route-threshold is a routing score between 0 and 1, got {args.route_threshold:g}")
    sources = AdapterSources(args.allow_runtime_loading, tuple(args.adapter_root), args.allow_hub_downloads,
                             args.max_adapter_bytes, args.hub_token_for_loads, args.hub_timeout,
                             registry=registry is not None)
    door = _front_door(args)
    aliases = [parse_alias_flag(value) for value in args.alias]
    feedback = FeedbackStore(feedback_path(args.feedback_db, args.registry))
    config = EngineConfig(model=args.model, dtype=args.dtype, max_running=args.max_running, max_queue=args.max_queue,
                          max_loaded_adapters=args.max_loaded_adapters, max_lora_rank=args.max_lora_rank,
                          max_model_len=args.max_model_len, served_model_name=args.served_model_name,
                          switching=args.switching, switching_max_hold=args.switching_max_hold,
                          quantize=args.quantize, quantize_backend=args.quantize_backend,
                          quantize_embeddings=args.quantize_embeddings, adapter_dtype=args.adapter_dtype,
                          trust_pickle=args.trust_pickle, max_adapter_bytes=args.max_adapter_bytes,
                          adapter_memory=args.adapter_memory, stall_timeout=args.stall_timeout,
                          threads=args.engine_threads, kv_cache_memory=args.kv_cache_memory,
                          prefix_cache=not args.no_prefix_cache,
                          share_prefix_cache_across_tenants=args.share_prefix_cache_across_tenants)
    engine = EngineProcess(config)  # the engine steps in its own process, out of the HTTP front end's way
    for name, folder in adapters:
        try:
            info = engine.add_adapter(name, folders[name])
            policy.confirm(trust[name], info.digest)
        except LorakitError as exc:
            engine.shutdown(0)
            raise _flag_error(name, folder, exc) from None
    _check_routing(engine, [name for name, _ in adapters])
    if not keys.required and args.host not in ("127.0.0.1", "localhost", "::1"):
        loading = " and load adapters from the adapter roots" if sources.runtime_loading else ""
        print(f"lorakit serve: warning: no --api-key, so anyone who reaches {args.host}:{args.port} can use every "
              f"model{loading}", file=sys.stderr)
    state = ServeState(engine, keys, door=door, request_timeout=args.request_timeout, sources=sources, policy=policy,
                       trust=trust, route_threshold=args.route_threshold, feedback=feedback)
    _start_up_aliases(state, aliases)
    engine.start()
    code = serve_forever(state, args.host, args.port, drain_timeout=args.drain_timeout, log_level=args.log_level)
    _exit_at_once(code)


def _exit_at_once(code: int) -> None:
    """Exit now that the engine has stopped and every response is sent: the atexit handlers run (logging's
    flush, temporary folders), the rest of the interpreter's teardown, about a second of freeing torch's and
    transformers' state, is skipped."""
    import atexit

    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(code)


def _start_up_aliases(state, aliases: list[tuple[str, dict[str, float]]]) -> None:
    """`--alias` values as start-up aliases; a target that is not a served adapter (or registry version of
    one) is a ConfigError."""
    from lorakit.serve.ab_routes import resolve_target
    from lorakit.serve.auth import OPEN_ACCESS
    from lorakit.serve.error_responses import APIError

    for name, targets in aliases:
        if name in state.aliases or name == state.base_name or name in state.trust:
            state.engine.shutdown(0)
            raise ConfigError(f"--alias {name}: the name is taken by the base model, an adapter or another alias")
        try:
            resolved = tuple((resolve_target(state, OPEN_ACCESS, t), w) for t, w in targets.items())
        except APIError as exc:
            state.engine.shutdown(0)
            raise ConfigError(f"--alias {name}: {exc.message} (a target is a --adapter NAME or, with --registry, "
                              "the registry version of one)") from None
        state.aliases.start_up(name, resolved)


def _check_routing(engine, names: list[str]) -> None:
    """A warning when model "auto" has no start-up adapter to choose: none carries a routing signature."""
    if names and not engine.routable(names):
        print("lorakit serve: warning: no adapter has a routing signature, so model \"auto\" is served by the base "
              "model; `lorakit route-index DIR --data FILE` gives an adapter one (docs/routing.md)", file=sys.stderr)


def common_base(folders: dict[str, str], command: str = "serve"):
    """With no --model: the base the adapters record (None: the embedded model). Adapters that record
    different bases cannot share one model: a ConfigError naming them."""
    from lorakit.cli.generate import recorded_base
    from lorakit.io import Adapter

    recorded = {}
    for name, folder in folders.items():
        adapter = Adapter.read(folder, allow_hub=False)
        if adapter.base is not None and adapter.base.source in ("hub", "local", "embedded"):
            recorded[name] = recorded_base(adapter, shown=f"--adapter {name}")
    bases = set(recorded.values())
    if len(bases) > 1:
        named = ", ".join(f"{name}: {base or 'the embedded model'}" for name, base in recorded.items())
        raise ConfigError(f"the adapters were trained on different base models ({named}); they run on one "
                          "base: pass --model and the adapters trained on it")
    base = next(iter(bases), None)
    if base is not None:
        print(f"lorakit {command}: base model {base} (the one the adapters record; --model chooses another)",
              file=sys.stderr)
    return base


def _adapter_folder(name: str, folder: str) -> str:
    from lorakit.io.peft_format import resolve_adapter_folder

    try:
        return str(resolve_adapter_folder(folder))
    except LorakitError as exc:
        raise _flag_error(name, folder, exc) from None


def _registry(path):
    """The registry --registry names (None without the flag); it must exist: serving never creates one."""
    from lorakit.registry import Registry
    from lorakit.registry.folder_storage import INDEX_NAME

    if path is None:
        return None
    if not (Path(path) / INDEX_NAME).is_file():
        raise ConfigError(f"--registry {path}: not a registry (no {INDEX_NAME}; lorakit registry add creates one)")
    return Registry.open(path)


def _adapter_source(name: str, ref: str, registry):
    """(folder, registry entry or None) of `--adapter NAME=REF`: an existing folder, or a value with a '/' (a
    path or a hub id; registry names hold none), is read as before; otherwise, with --registry, REF is a
    registry reference (`name` or `name@<digest prefix>`)."""
    from lorakit.registry import RegistryError
    from lorakit.serve.adapter_policy import registry_version

    if registry is None or os.path.isdir(ref) or "/" in ref:
        return _adapter_folder(name, ref), None
    try:
        folder, entry = registry_version(registry, ref)
        return str(folder), entry
    except RegistryError as exc:
        raise _flag_error(name, ref, exc) from None


def _admitted(policy, name: str, ref: str, folder: str, entry):
    """The start-up adapter's Trust, or the policy's refusal as a ConfigError (one line, exit 2)."""
    from lorakit.serve.adapter_policy import AdapterRefused

    try:
        return policy.admit(Path(folder), entry, f"--adapter {name}={ref}")
    except AdapterRefused as exc:
        raise ConfigError(str(exc)) from None


def _flag_error(name: str, folder: str, exc: LorakitError) -> ConfigError:
    return ConfigError(f"--adapter {name}={folder}: {exc}")


def _front_door(args: argparse.Namespace):
    from lorakit.serve.front_door import FrontDoor

    for name in ("max_request_bytes", "max_connections", "header_timeout", "body_timeout"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0")
    hosts = tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip()) if args.allowed_hosts else ()
    return FrontDoor(host=args.host, allowed_hosts=hosts, cors_origins=tuple(args.cors_origin),
                     max_request_bytes=args.max_request_bytes, body_timeout=args.body_timeout,
                     header_timeout=args.header_timeout, max_connections=args.max_connections)


def _byte_size(text: str) -> int:
    """'2GB', '512MiB', '1e9' -> bytes (for argparse)."""
    from lorakit.estimate.report import parse_size

    try:
        return parse_size(text, "--adapter-memory")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(commands) -> None:
    parser = commands.add_parser("serve", help="serve the base model and adapters over OpenAI's HTTP API")
    add_model_flags(parser)
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="serve the adapter folder DIR as model NAME (repeatable); with --registry, a value that "
                             "is not an existing folder is a registry reference (name or name@<digest prefix>)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free port)")
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument("--api-key", help="require this key (Authorization: Bearer KEY); it has full access")
    auth.add_argument("--api-keys", metavar="FILE",
                      help="YAML/JSON mapping key -> {tenant, models, can_load_adapters, admin, max_running, "
                           "max_queued}; keys may be sha256:<hex>")
    parser.add_argument("--served-model-name", help="the base model's name in the API (default: its id or folder)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                        help="weights' precision; auto: bf16 on CUDA, fp32 on a CPU (where it decodes as fast, and "
                             "makes every request's greedy output independent of what it is batched with)")
    parser.add_argument("--adapter-dtype", default="auto", choices=["auto", "fp32", "bf16"],
                        help="precision of resident adapters; auto: bf16 or fp16 while every one is exact in it "
                             "(saved in 16 bits), else fp32, so no adapter is rounded; bf16 rounds fp32 adapters and "
                             "halves what a mixed-adapter decode step reads")
    add_quantize_flags(parser)
    parser.add_argument("--switching", default="auto", choices=["auto", "off", "merged"],
                        help="merged or unmerged decoding: auto: adapters take turns while requests contend for the "
                             "rows, a turn on merged weights where the measured costs say it pays; off: always "
                             "unmerged; merged: merged whenever a batch is on one adapter, in arrival order (merging "
                             "costs one more copy of an adapter's adapted projections; default: auto)")
    parser.add_argument("--switching-max-hold", type=float, metavar="SECONDS",
                        help="the most seconds a request of another adapter is held back while one adapter runs merged "
                             "(default: 8 times a request's measured decode time, at least 1)")
    parser.add_argument("--max-running", type=int, default=16, help="sequences decoded together (default: 16)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests waiting beyond those; past it: 429 with Retry-After (default: 64)")
    parser.add_argument("--max-loaded-adapters", type=int, default=256,
                        help="the most adapters resident at once; slots grow up to it while --adapter-memory allows, "
                             "beyond it the least recently used idle one is replaced (default: 256)")
    parser.add_argument("--adapter-memory", type=_byte_size, metavar="BYTES",
                        help="memory the resident adapters may take, e.g. 2GB (default: an eighth of the memory "
                             "available at start, at least 64 MiB)")
    parser.add_argument("--kv-cache-memory", type=_byte_size, metavar="BYTES",
                        help="size of the paged KV cache, e.g. 4GB: one pool of blocks for the running sequences' "
                             "keys and values and the prefix cache (on a CPU its pages are committed as written; "
                             "default: a quarter of the memory available at start, at least one sequence of "
                             "--max-model-len)")
    parser.add_argument("--no-prefix-cache", action="store_true",
                        help="prefill every prompt whole instead of reusing the keys and values of beginnings seen "
                             "before")
    parser.add_argument("--share-prefix-cache-across-tenants", action="store_true",
                        help="let one tenant's requests reuse another's cached prompt beginnings (off: each tenant's "
                             "cache is its own, since a cache hit is observable in timing)")
    parser.add_argument("--engine-threads", type=int, metavar="N",
                        help="CPU threads of the engine process (default: one per 16M model parameters, at most the "
                             "cores; the embedded model decodes fastest on one)")
    parser.add_argument("--stall-timeout", type=float, default=60.0,
                        help="seconds one engine step may take before /health reports the engine stuck (default: 60)")
    parser.add_argument("--max-lora-rank", type=int, default=64, help="largest adapter rank accepted (default: 64)")
    parser.add_argument("--max-model-len", type=int, help="context length (default: the model's, at most 4096)")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds a request may run before it is cancelled (default: 600)")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="on SIGTERM, seconds to let running requests finish (default: 30)")
    parser.add_argument("--route-threshold", type=float, default=0.4, metavar="SCORE",  # routing.DEFAULT_THRESHOLD
                        help="model \"auto\": the routing score (0-1) an adapter needs to serve a prompt; below it the "
                             "base model serves (default: 0.4; docs/routing.md)")
    parser.add_argument("--alias", action="append", default=[], metavar="NAME=A:W,B:W",
                        help="an alias split between adapters by weight, sticky by the request's user (repeatable; "
                             "e.g. support=support-v1:90,support-v2:10; docs/ab-testing.md)")
    parser.add_argument("--feedback-db", metavar="PATH",
                        help="the SQLite file completions and their feedback are kept in (default: feedback.sqlite "
                             "in the --registry folder, else ~/.local/share/lorakit/feedback.sqlite)")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                        help="uvicorn's log level; info shows every request (default: warning)")
    loads = parser.add_argument_group("runtime adapter loading (off by default; see docs/trust-model.md)")
    loads.add_argument("--allow-runtime-loading", action="store_true",
                       help="let keys with can_load_adapters load and unload adapters over HTTP")
    loads.add_argument("--adapter-root", action="append", default=[], metavar="DIR",
                       help="a folder runtime loads may read adapters from (repeatable); symlinks are followed and "
                            "must stay inside it")
    loads.add_argument("--allow-hub-downloads", action="store_true",
                       help="runtime loads may also fetch Hugging Face hub ids (lora_source: hub)")
    loads.add_argument("--max-adapter-bytes", type=int, default=2 * 10**9, metavar="N",
                       help="largest adapter this server reads from a folder or downloads, in bytes "
                            "(default: 2000000000)")
    loads.add_argument("--hub-token-for-loads", action="store_true",
                       help="send the server's own hub token with runtime downloads (default: anonymous)")
    loads.add_argument("--hub-timeout", type=float, default=300.0, metavar="SECONDS",
                       help="seconds a runtime hub download may take (default: 300)")
    trust = parser.add_argument_group("which adapters are served: registry, signatures, vetting (see "
                                      "docs/trust-model.md)")
    trust.add_argument("--registry", metavar="PATH",
                       help="an adapter registry that --adapter values and runtime loads (lora_path "
                            "\"registry:NAME[@VERSION]\") may name versions from")
    trust.add_argument("--require-signed", action="store_true",
                       help="serve only adapters whose signature verifies with a --trusted-key, signed for this "
                            "server's base model (at start-up and at every runtime load)")
    trust.add_argument("--trusted-key", action="append", default=[], metavar="PUBLIC.pem",
                       help="an EC public key adapter signatures are verified with (repeatable); /v1/models names "
                            "the key that verified each adapter")
    trust.add_argument("--require-vetted", action="store_true",
                       help="serve only registry adapters whose vet report's verdict is \"pass\"")
    door = parser.add_argument_group("the front door: limits every request meets (see docs/serving.md)")
    door.add_argument("--max-request-bytes", type=int, default=2 * 1024 * 1024,
                      help="largest request body; past it: 413 (default: 2097152, 2 MiB)")
    door.add_argument("--header-timeout", type=float, default=10.0,
                      help="seconds a connection may take to send a request's line and headers; past it the "
                           "connection is closed (default: 10)")
    door.add_argument("--body-timeout", type=float, default=30.0,
                      help="seconds a request's body may take to arrive after its headers; past it: 408 "
                           "(default: 30)")
    door.add_argument("--max-connections", type=int, default=512,
                      help="connections (and requests in flight) served at once; past it: 503 (default: 512)")
    door.add_argument("--allowed-hosts", metavar="H1,H2",
                      help="host names the Host header may carry besides IP addresses, localhost and --host "
                           "(DNS-rebinding protection); '*': any (default: none)")
    door.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                      help="let browser pages from ORIGIN (e.g. https://app.example.com) call the API; repeatable "
                           "(default: no CORS headers)")
    parser.set_defaults(run=run)
