"""`capray serve`: run the online protection endpoint on Ray Serve (or print its Serve config).

Exit codes: 0 served until interrupted (or deployed with --detach, printed the config, or wrote the
OpenAPI document); 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from capray.exit_codes import EXIT_OK, EXIT_USAGE

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from capray.config_args import add_config_options

    add_config_options(parser, set_example="serve.max_replicas=2")
    parser.add_argument("--host", help="HTTP host (default: serve.host)")
    parser.add_argument("--port", type=int, help="HTTP port (default: serve.port)")
    parser.add_argument("--route-prefix", default="/", help="URL prefix of the API (default /)")
    parser.add_argument("--detach", action="store_true",
                        help="deploy and return (the app keeps running on the cluster)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the Serve config YAML (serve deploy / RayService serveConfigV2) and exit")
    parser.add_argument("--openapi", metavar="FILE",
                        help="write the API's OpenAPI document to FILE ('-': stdout) and exit (docs/openapi.json)")


def serve_args(args: argparse.Namespace):
    """What the Serve app is built from, by the precedence rule of every front door (`overrides_from_args`)."""
    from capray.config_args import overrides_from_args
    from capray.serve.app import ServeArgs

    flags = {key: value for key, value in (("host", args.host), ("port", args.port)) if value}
    overrides = overrides_from_args(args, {"serve": flags} if flags else None)
    return ServeArgs(config_path=args.config, preset=args.preset, overrides=overrides)


def write_openapi(path: str) -> None:
    """The document the app serves at /openapi.json, as committed in docs/openapi.json (stable key order)."""
    import json
    import sys

    from capray.serve.app import openapi_document

    text = json.dumps(openapi_document(), indent=2, ensure_ascii=False) + "\n"
    if path == "-":
        sys.stdout.write(text)
    else:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)


def run(args: argparse.Namespace) -> int:
    from capray.errors import describe, expected_errors, report

    if args.openapi:  # the document depends on the code alone, not on a config or a cluster
        write_openapi(args.openapi)
        return EXIT_OK
    try:
        sargs = serve_args(args)
        cfg = sargs.load()
        if not args.print_config:  # the printed config is deployed elsewhere, next to that cluster's weights
            from capray.models.preflight import preflight

            preflight(cfg.model)  # a model that cannot load would only crash-loop the replicas
    except expected_errors() as exc:
        report("serve", args, describe(exc), exc)
        return EXIT_USAGE
    if not args.print_config:
        from capray.serve.auth import KeyRing, check_exposure

        keys = KeyRing(cfg.serve.api_keys_file)
        try:
            check_exposure(cfg.serve.host, keys, cfg.serve.allow_unauthenticated)
        except ValueError as exc:
            report("serve", args, describe(exc), exc)
            return EXIT_USAGE
        if not keys.configured:
            log.warning("no API keys configured: anyone who can reach %s may call it", cfg.serve.host)
    if args.print_config:
        import yaml

        from capray.serve.app import deploy_config

        print(yaml.safe_dump(deploy_config(sargs, route_prefix=args.route_prefix), sort_keys=False), end="")
        return EXIT_OK

    import os

    if args.detach and not (args.address or os.environ.get("RAY_ADDRESS")):
        report("serve", args, "--detach needs a cluster (--address or $RAY_ADDRESS)")
        return EXIT_USAGE
    import ray
    from ray import serve

    from capray.cluster import connect_ray
    from capray.serve.app import APP_NAME, app_from_config

    if not (args.address or os.environ.get("RAY_ADDRESS")):  # the Ray we start gets the proxy's body limit
        from capray.serve.body_limit import proxy_env

        os.environ.update(proxy_env(cfg.serve.max_request_bytes))
    started = connect_ray(args.address)
    if started and cfg.serve.gpus_per_replica > 0 and not ray.cluster_resources().get("GPU"):
        log.warning("no GPU on this machine; the Protector runs on the CPU")
        cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"gpus_per_replica": 0.0})})
    s = cfg.serve
    try:
        serve.start(http_options={"host": s.host, "port": s.port, "request_timeout_s": s.request_timeout_s})
        serve.run(app_from_config(cfg), name=APP_NAME, route_prefix=args.route_prefix)
        prefix = args.route_prefix.rstrip("/")
        print(f"capray serving on http://{s.host}:{s.port}{prefix}/v1/protect "
              f"(jobs: GET {prefix}/v1/jobs/<id>)", flush=True)
        for note in cfg.model.notes:
            log.warning("%s", note)
        if args.detach:
            return EXIT_OK
        stop = threading.Event()  # SIGTERM (a container stopping) ends the server as cleanly as Ctrl-C
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):
            pass
        return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        if not args.detach:
            serve.shutdown()
        if started:
            ray.shutdown()
