"""`tauon` command line: crds, render, operator, run, node, and the SDK's logs, wait and chat."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

REPO_CRDS = Path(__file__).resolve().parents[2] / "crds"
REPO_CHART_CRDS = Path(__file__).resolve().parents[2] / "helm" / "tauon" / "files" / "crds"


def cmd_crds(args: argparse.Namespace) -> int:
    from tauon.api.crds import all_crds, render_yaml

    outs = [Path(args.output)]
    if Path(args.output).resolve() == REPO_CRDS and REPO_CHART_CRDS.parent.is_dir():
        outs.append(REPO_CHART_CRDS)  # the Helm chart ships the same files
    stale = []
    for out in outs:
        for name, crd in all_crds().items():
            text = render_yaml(crd)
            path = out / name
            if args.check:
                if not path.exists() or path.read_text() != text:
                    stale.append(str(path))
            else:
                out.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                print(f"wrote {path}")
    if stale:
        print("stale CRDs (run `tauon crds` or `make crds`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


def load_manifest(path: str) -> dict[str, Any]:
    """Read one FineTuneJob/InferenceService manifest; a clear error names the file and the field."""
    import yaml

    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    except (OSError, yaml.YAMLError) as e:
        raise SystemExit(f"tauon: cannot read {path}: {e}") from e
    if len(docs) != 1:
        raise SystemExit(f"tauon: {path}: expected exactly one object, found {len(docs)}")
    doc: dict[str, Any] = docs[0]
    doc.setdefault("metadata", {}).setdefault("namespace", "default")
    doc["metadata"].setdefault("uid", "00000000-0000-0000-0000-000000000000")
    return doc


def resolve_relative_sources(doc: dict[str, Any], base: Path) -> dict[str, Any]:
    """file://./REL -> file:///ABS relative to the manifest's directory (local runs and dev clusters)."""

    def fix(holder: dict[str, Any] | None, key: str) -> None:
        if holder and isinstance(holder.get(key), str) and holder[key].startswith("file://./"):
            holder[key] = "file://" + str((base / holder[key].removeprefix("file://./")).resolve())

    spec = doc.get("spec") or {}
    fix(spec.get("model"), "source")
    fix(spec.get("model"), "tokenizer")
    fix(spec.get("dataset"), "source")
    fix(spec.get("output"), "storage")
    fix((spec.get("canary") or {}).get("model"), "source")
    return doc


def parse_object(doc: dict[str, Any], where: str) -> Any:
    from pydantic import ValidationError

    from tauon.api import FineTuneJob, InferenceService
    from tauon.api.names import FINETUNEJOB, INFERENCESERVICE

    kinds = {FINETUNEJOB: FineTuneJob, INFERENCESERVICE: InferenceService}
    model = kinds.get(doc.get("kind", ""))
    if model is None:
        raise SystemExit(f"tauon: {where}: kind must be one of {', '.join(kinds)}, got {doc.get('kind')!r}")
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise SystemExit(f"tauon: {where}: invalid {doc['kind']}:\n" + "\n".join(lines)) from e


def cmd_render(args: argparse.Namespace) -> int:
    import yaml

    from tauon.api.names import FINETUNEJOB
    from tauon.render.common import InvalidSpec
    from tauon.render.config import OperatorConfig

    doc = load_manifest(args.file)
    if args.allow_host_paths:
        resolve_relative_sources(doc, Path(args.file).resolve().parent)
    obj = parse_object(doc, args.file)
    cfg = OperatorConfig(allow_host_paths=args.allow_host_paths, gang_scheduler=args.gang_scheduler)
    try:
        if obj.kind == FINETUNEJOB:
            from tauon.render.finetunejob import render_attempt

            children = render_attempt(obj, cfg, args.attempt)
        else:
            from tauon.render.inferenceservice import ModelLocation, Models, render

            def loc(model: Any, label: str) -> ModelLocation:
                if model.source:
                    return ModelLocation(model.source)
                # without a cluster the job's (or the sweep's best trial's) output is unknown: show where
                # it would be
                if model.fine_tune_sweep_ref:
                    sweep = model.fine_tune_sweep_ref.name
                    return ModelLocation(
                        f"pvc://<model of the best trial of FineTuneSweep {sweep}>", fine_tune_sweep=sweep
                    )
                return ModelLocation(
                    f"pvc://<output of FineTuneJob {model.fine_tune_job_ref.name}>/model", label
                )

            canary = obj.spec.canary
            models = Models(loc(obj.spec.model, "predictor"), loc(canary.model, "canary") if canary else None)
            children = render(obj, models, cfg)
    except InvalidSpec as e:
        print(f"tauon: {args.file}: {e}", file=sys.stderr)
        return 1
    print(yaml.safe_dump_all(children, sort_keys=False), end="")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    if not args.local:
        print("tauon run: only --local is supported (on a cluster, kubectl apply the file)", file=sys.stderr)
        return 2
    from tauon.api.names import FINETUNEJOB, FINETUNESWEEP
    from tauon.local.process import Unsupported
    from tauon.local.run import run_finetunejob, serve_inferenceservice
    from tauon.render.common import InvalidSpec

    doc = load_manifest(args.file)
    if doc.get("kind") == FINETUNESWEEP:
        return run_sweep_file(doc, args)
    resolve_relative_sources(doc, Path(args.file).resolve().parent)
    obj = parse_object(doc, args.file)
    try:
        if obj.kind == FINETUNEJOB:
            output = Path(args.output or Path("runs") / obj.metadata.name)
            return run_finetunejob(obj, output, quiet=args.quiet)
        return serve_inferenceservice(obj, Path(args.output or "runs"), args.port)
    except (InvalidSpec, Unsupported) as e:
        print(f"tauon: {args.file}: {e}", file=sys.stderr)
        return 1


def run_sweep_file(doc: dict[str, Any], args: argparse.Namespace) -> int:
    """`tauon run --local` of a FineTuneSweep: its trials under --output (default ./runs/<name>)."""
    from pydantic import ValidationError

    from tauon.api import FineTuneSweep
    from tauon.local.sweep import SweepMismatch, run_sweep

    template = (doc.get("spec") or {}).get("template")
    if isinstance(template, dict):  # the template's file://./ sources, relative to the manifest
        resolve_relative_sources(template, Path(args.file).resolve().parent)
    try:
        sweep = FineTuneSweep.model_validate(doc)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise SystemExit(f"tauon: {args.file}: invalid FineTuneSweep:\n" + "\n".join(lines)) from e
    try:
        return run_sweep(sweep, Path(args.output or Path("runs") / sweep.metadata.name), quiet=args.quiet)
    except SweepMismatch as e:
        print(f"tauon: {args.file}: {e}", file=sys.stderr)
        return 1


def cmd_node(args: argparse.Namespace) -> int:
    from tauon.local.node import main as node_main

    return node_main(
        args.name,
        args.root,
        args.cpus,
        args.memory_gi,
        network=args.network,
        pod_cidr=args.pod_cidr,
        dns=args.dns,
    )


def cmd_operator(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    import kopf

    from tauon import metrics
    from tauon.handlers.runtime import RT
    from tauon.render.config import OperatorConfig

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("kopf.objects", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    RT.cfg = OperatorConfig(
        default_image=args.default_image,
        gang_scheduler=args.gang_scheduler,
        gang_scheduler_name=args.gang_scheduler_name,
        cluster_domain=args.cluster_domain,
        allow_host_paths=args.allow_host_paths,
        vllm_image=args.vllm_image,
    )
    RT.period_seconds = args.period
    RT.progress_period_seconds = args.progress_period
    import tauon.handlers  # noqa: F401 - registers the handlers

    if args.metrics_port:
        metrics.serve(args.metrics_port, args.metrics_address)
    liveness = f"http://{args.health_address}:{args.health_port}/healthz" if args.health_port else None
    asyncio.run(
        kopf.operator(
            clusterwide=not args.namespace,
            namespaces=args.namespace or [],
            standalone=True,
            liveness_endpoint=liveness,
        )
    )
    return 0


NODE_DESCRIPTION = """\
A process-backed node agent for the local control plane (development and tests only): it registers a
Node (label tauon.dev/node-agent=process) and runs every pod bound to it as a local process, reporting
status as a kubelet would. It is not a kubelet: no images, no isolation, no resource limits, no PVCs;
logs are files under --root. See tauon.local.node for the details."""


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--namespace", default=None, help="namespace (default: the context's)")
    p.add_argument("--kubeconfig", default=None)
    p.add_argument("--context", default=None)


def _client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from tauon.client import Client

    if getattr(args, "local", False):
        return Client(local=True, workdir=args.workdir)
    return Client(kubeconfig=args.kubeconfig, namespace=args.namespace, context=args.context)


def cmd_logs(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        for line in client.job(args.job).logs(follow=args.follow):
            print(line, flush=True)
    finally:
        client.close()
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    from tauon.client import NotFound

    client = _client(args)
    try:
        try:
            job = client.job(args.name)
        except NotFound as e:
            try:
                svc = client.service(args.name)
            except NotFound:
                try:
                    sweep = client.get_sweep(args.name)
                except NotFound:
                    raise NotFound(
                        "FineTuneJob, InferenceService or FineTuneSweep", args.name, e.where
                    ) from None
                best = sweep.wait(timeout=args.timeout, progress=None if not args.quiet else False).best
                print(
                    f"FineTuneSweep {args.name} Succeeded: best trial {best.trial} ({best.objective}), "
                    f"{best.model}"
                    if best is not None
                    else f"FineTuneSweep {args.name} Succeeded"
                )
                return 0
            st = svc.wait_ready(timeout=args.timeout)
            print(f"InferenceService {args.name} Ready ({st.ready_replicas}/{st.replicas} replicas)")
            return 0
        status = job.wait(timeout=args.timeout, progress=None if not args.quiet else False)
        metrics = ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in status.output.metrics.items()
            if k in ("steps", "trainLoss", "evalAccuracy", "evalLoss", "evalPerplexity")
        )
        print(
            f"FineTuneJob {args.name} Succeeded: {status.output.model}" + (f" ({metrics})" if metrics else "")
        )
    finally:
        client.close()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from tauon.client import InferenceServiceHandle
    from tauon.client.url import UrlBackend

    client: Any = UrlBackend(args.url) if args.url else _client(args)
    try:
        svc = InferenceServiceHandle(client, args.isvc) if args.url else client.service(args.isvc)
        svc.wait_ready(timeout=args.timeout)
        messages: list[dict[str, str]] = []
        if args.system:
            messages.append({"role": "system", "content": args.system})
        # the OpenAI API of either runtime: status.openai.baseURL's path (/v1) on a reachable URL
        print(f"chatting with {args.isvc} at {svc.openai_base_url} (Ctrl-D to quit)", file=sys.stderr)
        while True:
            try:
                prompt = input("> ")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return 0
            if not prompt.strip():
                continue
            messages.append({"role": "user", "content": prompt})
            answer = []
            for piece in svc.chat(messages, stream=True, max_tokens=args.max_tokens):
                answer.append(piece)
                print(piece, end="", flush=True)
            print()
            messages.append({"role": "assistant", "content": "".join(answer)})
    finally:
        client.close()


def add_sdk_commands(sub: Any) -> None:
    lg = sub.add_parser("logs", help="logs of every rank of a FineTuneJob, merged, [rank N]-prefixed")
    lg.add_argument("job")
    lg.add_argument("-f", "--follow", action="store_true", help="stream until the job ends")
    lg.add_argument("--local", action="store_true", help="a job run with Client(local=True) / tauon run")
    lg.add_argument("--workdir", default="runs", help="local run directory (with --local)")
    _cluster_args(lg)
    lg.set_defaults(func=cmd_logs)

    w = sub.add_parser(
        "wait", help="wait for a FineTuneJob or FineTuneSweep to succeed or an InferenceService to be Ready"
    )
    w.add_argument("name")
    w.add_argument("--timeout", type=float, default=None, help="seconds (default: no limit)")
    w.add_argument("--quiet", action="store_true", help="no progress bar")
    w.add_argument("--local", action="store_true", help="an object run with Client(local=True) / tauon run")
    w.add_argument("--workdir", default="runs", help="local run directory (with --local)")
    _cluster_args(w)
    w.set_defaults(func=cmd_wait)

    ch = sub.add_parser("chat", help="interactive streaming chat with an InferenceService (OpenAI API)")
    ch.add_argument("isvc")
    ch.add_argument("--system", default=None, help="a system message")
    ch.add_argument("--max-tokens", type=int, default=256)
    ch.add_argument("--timeout", type=float, default=600, help="seconds to wait for Ready")
    ch.add_argument(
        "--url", default=None, help="a model server's base URL instead (e.g. from tauon run --local)"
    )
    _cluster_args(ch)
    ch.set_defaults(func=cmd_chat)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tauon", description="Fine-tune and serve models on Kubernetes.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("crds", help="write (or --check) the CRDs generated from the API models")
    c.add_argument("--output", default=str(REPO_CRDS), help="directory (default: the repo's crds/)")
    c.add_argument("--check", action="store_true", help="exit 1 when the files differ from the models")
    c.set_defaults(func=cmd_crds)

    from tauon.render.config import DEFAULT_IMAGE, DEFAULT_VLLM_IMAGE

    r = sub.add_parser("render", help="print the children the operator would create, as a YAML stream")
    r.add_argument("file")
    r.add_argument("--attempt", type=int, default=0, help="gang attempt number (FineTuneJob)")
    r.add_argument("--allow-host-paths", action="store_true", help="render file:// sources as hostPath")
    r.add_argument("--gang-scheduler", choices=["volcano", "scheduler-plugins"], default=None)
    r.set_defaults(func=cmd_render)

    run = sub.add_parser(
        "run",
        help="run a FineTuneJob (trains), FineTuneSweep (searches) or InferenceService (serves) locally",
    )
    run.add_argument("file")
    run.add_argument("--local", action="store_true", help="run as local processes (required)")
    run.add_argument(
        "--output",
        help="FineTuneJob or FineTuneSweep output dir (default ./runs/<name>); InferenceService runs dir",
    )
    run.add_argument(
        "--port", type=int, default=None, help="InferenceService: local port (default: a free one)"
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar or table")
    run.set_defaults(func=cmd_run)

    n = sub.add_parser(
        "node",
        help="process-backed node agent for a local control plane (dev/test only, not a kubelet)",
        description=NODE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    n.add_argument("--name", default="tauon-node-0")
    n.add_argument("--root", default="/tmp/tauon-node", help="where pod files and logs go")
    n.add_argument("--cpus", type=int, default=None)
    n.add_argument("--memory-gi", type=int, default=16)
    n.add_argument(
        "--network",
        choices=("shared", "netns"),
        default="shared",
        help="shared: pods use the host's network (addresses and ports rewritten); netns: each pod gets its "
        "own network namespace and IP on a bridge shared by every node of this machine (needs CAP_NET_ADMIN)",
    )
    n.add_argument(
        "--pod-cidr",
        default=None,
        help="netns: this node's pod CIDR (a /24 inside the bridge's network; default derived from --name)",
    )
    n.add_argument(
        "--dns",
        default=None,
        help="netns: the cluster DNS server's IP written into every pod's /etc/resolv.conf",
    )
    n.set_defaults(func=cmd_node)

    o = sub.add_parser("operator", help="run the operator (all namespaces unless --namespace)")
    o.add_argument("--namespace", action="append", help="watch only this namespace (repeatable)")
    o.add_argument("--metrics-port", type=int, default=8080, help="Prometheus metrics port (0: off)")
    o.add_argument("--metrics-address", default="0.0.0.0")
    o.add_argument("--health-port", type=int, default=8081, help="liveness endpoint port (0: off)")
    o.add_argument("--health-address", default="0.0.0.0")
    o.add_argument(
        "--default-image", default=DEFAULT_IMAGE, help="trainer/server image when a spec names none"
    )
    o.add_argument(
        "--vllm-image", default=DEFAULT_VLLM_IMAGE, help="server image of InferenceServices with runtime vllm"
    )
    o.add_argument("--gang-scheduler", choices=["volcano", "scheduler-plugins"], default=None)
    o.add_argument("--gang-scheduler-name", default=None, help="schedulerName for gang-scheduled pods")
    o.add_argument("--cluster-domain", default="cluster.local")
    o.add_argument("--allow-host-paths", action="store_true", help="dev clusters: allow file:// as hostPath")
    o.add_argument("--period", type=float, default=5.0, help="seconds between time-based passes")
    o.add_argument(
        "--progress-period",
        type=float,
        default=10.0,
        help="seconds between reads of each running job's /progress (status.progress, sweeps' curves)",
    )
    o.add_argument("-v", "--verbose", action="store_true")
    o.set_defaults(func=cmd_operator)
    add_sdk_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("logs", "wait", "chat"):
        from tauon.client import JobFailed, TauonError

        try:
            rc: int = args.func(args)
        except JobFailed as e:
            print(f"tauon: {e}", file=sys.stderr)
            return 1
        except (TauonError, TimeoutError) as e:  # one line, not a traceback
            print(f"tauon: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
        return rc
    rc = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
