"""`vlmpool operator`: run the kopf operator."""

from __future__ import annotations

import argparse
import os
from typing import Any

from vlmpool.adminwire import ADAPTER_ROOT


def configure(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[], metavar="NS",
                       help="watch this namespace (repeatable); default: $VLMPOOL_NAMESPACES (comma-separated) "
                       "or all namespaces")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    parser.add_argument("--kubeconfig", default=None,
                        help="kubeconfig file (default: $KUBECONFIG, then the in-cluster service account, "
                        "then ~/.kube/config)")
    parser.add_argument("--context", default=None, help="kubeconfig context (default: current-context)")
    parser.add_argument("--metrics-port", type=int, default=int(os.environ.get("VLMPOOL_METRICS_PORT", "8080")),
                        help="port of /metrics, /healthz and /readyz; 0 picks a free port, -1 disables "
                        "(default 8080)")
    parser.add_argument("--metrics-host", default="0.0.0.0", help="address of the metrics/health server")
    parser.add_argument("--resync-seconds", type=float, default=float(os.environ.get("VLMPOOL_RESYNC_SECONDS", "60")),
                        help="period of the full-state push to every pod and of adapter re-checks (default 60)")
    parser.add_argument("--push-timeout", type=float, default=10.0,
                        help="timeout of one push to one pod's admin API, seconds (default 10)")
    parser.add_argument("--push-parallelism", type=int, default=16,
                        help="pods pushed to at once per pool (default 16)")
    parser.add_argument("--progress-wait", type=float, default=2.0,
                        help="longest wait of one long poll of a pod's convergence after a push, seconds; status "
                        "is written at most once per adapter per poll round (default 2)")
    parser.add_argument("--max-patch-jobs", type=int,
                        default=int(os.environ.get("VLMPOOL_MAX_PATCH_JOBS", "8")),
                        help="patch Jobs alive at once across the watched namespaces; more wait, namespaces taking "
                        "turns and first created first started within one, with the adapter's Patched condition "
                        "saying so (default 8)")
    parser.add_argument("--patch-image", default=os.environ.get("VLMPOOL_PATCH_IMAGE") or None,
                        help="image of patch and cleanup Jobs (default: this release's patcher image, "
                        "ghcr.io/vlmpool/vlmpool-patcher:<version>; never a pool's image)")
    parser.add_argument("--patch-dora-image", default=os.environ.get("VLMPOOL_PATCH_DORA_IMAGE") or None,
                        help="image of the patch Jobs of adapters whose dora.policy is svd or strip: one with "
                        "torch (the patcher-dora target); default: --patch-image, where svd is refused as NeedsTorch")
    parser.add_argument("--adapter-root", default=os.environ.get("VLMPOOL_ADAPTER_ROOT", ADAPTER_ROOT),
                        help="mount path of the adapter volume in patch Jobs and engine containers; the "
                        f"paths registered with vLLM live under it (default {ADAPTER_ROOT})")
    sec = parser.add_argument_group("tenancy (docs/security.md)")
    sec.add_argument("--source-allow", action="append", default=[], metavar="HOST|CIDR",
                     help="a host name (mirror.corp, *.corp) or CIDR (10.20.0.0/16) that patch Jobs may fetch "
                     "sources from although it is internal (loopback, link-local, private, cluster-internal "
                     "names are refused otherwise); repeatable, or comma-separated $VLMPOOL_SOURCE_ALLOW")
    sec.add_argument("--allow-host-path", action="append", default=[], metavar="DIR",
                     help="a node directory that file:// sources may name (mounted read-only as a hostPath into "
                     "the patch Job); repeatable, or colon-separated $VLMPOOL_ALLOW_HOST_PATHS; default: none, "
                     "file:// sources are refused")
    sec.add_argument("--token-key-file", default=os.environ.get("VLMPOOL_TOKEN_KEY_FILE") or None, metavar="PATH",
                     help="file holding the key the pools' admin tokens are derived from (HMAC of each pool's "
                     "namespace/name/uid); the chart mounts it from a Secret in the operator's namespace. "
                     "Default: $VLMPOOL_TOKEN_KEY, else a random key for this process only (tokens, and so "
                     "the pools' pods, change when the operator restarts)")
    sec.add_argument("--network-policy", default=os.environ.get("VLMPOOL_NETWORK_POLICY") or None, metavar="JSON",
                     help='a NetworkPolicy per pool, named after it, selecting its pods: JSON {"adminFrom": '
                     '[peers allowed on the admin port], "httpFrom": [peers allowed on the http port; empty: '
                     'anyone], "extraIngress": [further ingress rules]} (NetworkPolicyPeer / IngressRule '
                     "objects); the chart sets it. Default: $VLMPOOL_NETWORK_POLICY, else no policy")
    le = parser.add_argument_group("leader election (for more than one replica)")
    le.add_argument("--leader-elect", action="store_true",
                    help="run only while holding a coordination.k8s.io Lease; other replicas stand by "
                    "and take over when the leader goes")
    le.add_argument("--leader-election-namespace", default=None, metavar="NS",
                    help="namespace of the Lease (default: $POD_NAMESPACE, else the in-cluster "
                    "namespace, else the kubeconfig context's namespace, else default)")
    le.add_argument("--leader-election-id", default="vlmpool-operator", metavar="NAME",
                    help="name of the Lease (default vlmpool-operator)")
    le.add_argument("--leader-election-identity", default=None, metavar="ID",
                    help="this replica's identity in the Lease (default: $POD_NAME, else hostname and a "
                    "random suffix)")
    le.add_argument("--lease-duration", type=float, default=15.0,
                    help="seconds a follower waits after the last renewal before taking over (default 15)")
    le.add_argument("--renew-deadline", type=float, default=10.0,
                    help="seconds the leader keeps trying to renew before it gives up (default 10)")
    le.add_argument("--retry-period", type=float, default=2.0,
                    help="seconds between attempts to acquire or renew (default 2)")
    parser.add_argument("--log-level", default=os.environ.get("VLMPOOL_LOG_LEVEL", "INFO"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    from vlmpool.controller.operator import Operator
    from vlmpool.controller.reconciler import OperatorConfig
    from vlmpool.kube.config import KubeConfig, KubeConfigError

    logging.basicConfig(level=getattr(logging, args.log_level),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.resync_seconds <= 0 or args.push_timeout <= 0 or args.push_parallelism < 1:
        print("vlmpool operator: --resync-seconds and --push-timeout must be > 0, --push-parallelism >= 1")
        return 2
    if not 0 < args.progress_wait <= 60 or args.max_patch_jobs < 1:
        print("vlmpool operator: --progress-wait must be in (0, 60], --max-patch-jobs >= 1")
        return 2
    from vlmpool.patcher.egress import EgressPolicy

    source_allow = [e.strip() for v in (args.source_allow or [os.environ.get("VLMPOOL_SOURCE_ALLOW", "")])
                    for e in v.split(",") if e.strip()]
    host_paths = [d for v in (args.allow_host_path or [os.environ.get("VLMPOOL_ALLOW_HOST_PATHS", "")])
                  for d in v.split(":") if d]
    try:
        EgressPolicy.parse(source_allow)
    except ValueError as e:
        print(f"vlmpool operator: --source-allow: {e}")
        return 2
    if any(not d.startswith("/") or ".." in d.split("/") for d in host_paths):
        print("vlmpool operator: --allow-host-path needs absolute paths without '..'")
        return 2
    token_key: bytes | None = None
    if args.token_key_file:
        try:
            token_key = open(args.token_key_file, "rb").read().strip()
        except OSError as e:
            print(f"vlmpool operator: --token-key-file: {e}")
            return 2
    elif os.environ.get("VLMPOOL_TOKEN_KEY"):
        token_key = os.environ["VLMPOOL_TOKEN_KEY"].encode()
    if token_key is not None and len(token_key) < 16:
        print("vlmpool operator: the token key must be at least 16 bytes")
        return 2
    if token_key is None:
        logging.getLogger("vlmpool.operator").warning(
            "no --token-key-file: the pools' admin tokens are derived from a random key of this process; "
            "every operator restart rotates them (and rolls the pools' pods)")
    try:
        network_policy = parse_network_policy(args.network_policy) if args.network_policy else None
    except ValueError as e:
        print(f"vlmpool operator: --network-policy: {e}")
        return 2
    namespaces = list(args.namespace)
    if not namespaces and not args.all_namespaces:
        namespaces = [n.strip() for n in os.environ.get("VLMPOOL_NAMESPACES", "").split(",") if n.strip()]
    try:
        kube_config = KubeConfig.load(args.kubeconfig, args.context)
    except KubeConfigError as e:
        print(f"vlmpool operator: {e}")
        return 2
    op = Operator(
        kube_config=kube_config,
        namespaces=namespaces,
        config=OperatorConfig(resync_seconds=args.resync_seconds, push_timeout=args.push_timeout,
                              push_parallelism=args.push_parallelism, progress_wait=args.progress_wait,
                              max_patch_jobs=args.max_patch_jobs, patch_image=args.patch_image,
                              network_policy=network_policy,
                              patch_dora_image=args.patch_dora_image,
                              adapter_root=args.adapter_root.rstrip("/") or "/",
                              source_allow=tuple(source_allow), host_paths=tuple(host_paths),
                              **({"token_key": token_key} if token_key else {})),
        metrics_host=args.metrics_host,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
    )

    elector_args: dict | None = None
    if args.leader_elect:
        from vlmpool.controller.leader import LeaderElectionError, LeaderElector, check_timings, default_identity

        elector_args = dict(
            namespace=(args.leader_election_namespace or os.environ.get("POD_NAMESPACE", "").strip()
                       or kube_config.namespace or "default"),
            name=args.leader_election_id,
            identity=args.leader_election_identity or default_identity(),
            lease_duration=args.lease_duration, renew_deadline=args.renew_deadline,
            retry_period=args.retry_period)
        try:
            check_timings(args.lease_duration, args.renew_deadline, args.retry_period)
            if not elector_args["name"]:
                raise LeaderElectionError("--leader-election-id must not be empty")
        except LeaderElectionError as e:
            print(f"vlmpool operator: {e}")
            return 2

    async def main() -> bool:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if elector_args is None:
            return await op.run(stop_flag=stop)
        from vlmpool.kube.client import KubeClient

        # Its own client, with requests bounded by the renew deadline and no retries within a round
        # (the next round, retry-period later, is the retry).
        async with KubeClient(kube_config, timeout=max(1.0, args.renew_deadline), attempts=1) as lease_kube:
            return await op.run(stop_flag=stop, leader=LeaderElector(lease_kube, **elector_args))

    if not asyncio.run(main()):
        print("vlmpool operator: lost the leader-election lease; exiting so that this replica restarts "
              "as a follower")
        return 1
    return 0


def parse_network_policy(text: str) -> dict[str, list[dict[str, Any]]]:
    """--network-policy's JSON: lists of objects under adminFrom, httpFrom, extraIngress only."""
    import json

    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ValueError(f"not JSON: {e}") from None
    keys = ("adminFrom", "httpFrom", "extraIngress")
    if not isinstance(doc, dict) or set(doc) - set(keys):
        raise ValueError(f"an object with the keys {', '.join(keys)} only")
    out = {k: doc.get(k) or [] for k in keys}
    for k, v in out.items():
        if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
            raise ValueError(f"{k} must be a list of objects")
    if not out["adminFrom"]:
        raise ValueError("adminFrom must name the operator's pods (none would shut the operator out of the admin port)")
    return out
