"""The local stack's node agent: a GPU-less Node whose pods run as local processes.

`kubeinfer up` runs one of these beside the control plane. It stands in for the kubelet of one node
(``kubeinfer-local``) so that ``kubectl apply`` of an LLMModel ends in a real engine answering
through the gateway, on a laptop without Docker or a GPU. See docs/local-stack.md.

What it does, as a kubelet would:

- registers the Node (capacity from this machine, ``nvidia.com/gpu: 0``), renews its Lease in
  ``kube-node-lease`` and posts node status, authenticated as ``system:node:<name>`` so the Node
  authorizer and NodeRestriction admission hold it to a kubelet's permissions;
- runs each container of a pod bound to the node as a local process: the engine images map to the
  cached llama-server binary and to vLLM in this Python, the kubeinfer image to ``python -m
  kubeinfer.cli`` (``podplan.Runtime``); volume mount paths in
  args and env map to local directories (a claim's hostPath PersistentVolume, temp dirs for
  emptyDir); each pod gets its own loopback address (127.0.0.10, .11, ...) as its pod IP, and
  ``--host 0.0.0.0`` becomes that address;
- runs the startup, readiness and liveness probes (httpGet, tcpSocket) and writes the pod status
  (phase, podIP, conditions, containerStatuses with waiting/running/terminated, restartCount);
- restarts exited containers per restartPolicy with the kubelet's back-off (CrashLoopBackOff);
- on deletion runs the preStop hook (sleep, httpGet), sends SIGTERM, waits out the grace period,
  SIGKILLs, then deletes the pod with grace period 0;
- reports what cannot run here (an unknown image, a GPU-only vLLM quantization, a missing volume)
  as a waiting reason with a message and a Warning Event, and retries with back-off;
- runs Jobs' pods to the end (restartPolicy Never/OnFailure): the pod's phase becomes Succeeded or
  Failed with each container's ``state.terminated.exitCode``, what the Job controller and a
  podFailurePolicy act on;
- with ``--provisioner-kubeconfig``, also runs the stack's volume provisioner
  (:mod:`~kubeinfer_devkit.devcluster.provisioner`, under its own credentials): claims of the
  default StorageClass get a hostPath volume under ``--volumes-dir``;
- writes each container's output to ``<state>/pods/<ns>_<pod>_<uid>/<container>/<restart>.log``
  and serves it to ``kubectl logs`` (the apiserver's kubelet port, TLS, 127.0.0.1 only).

What it does not do: no container runtime or image pulls, no cgroups or namespaces (limits are not
enforced, every process sees the whole machine), no exec/attach/port-forward, no init containers,
no exec probes. Engine processes die with the agent (process group + watchdog); a restarted agent
kills any that are left and starts its pods' containers again (restartCount + 1).

Modules: :mod:`~kubeinfer_devkit.devcluster.podplan` (pure: a pod spec to local command lines),
:mod:`~kubeinfer_devkit.devcluster.containers` (a container's process, probes, restarts),
:mod:`~kubeinfer_devkit.devcluster.pods` (a pod: admission, pod IP, status, deletion),
:mod:`~kubeinfer_devkit.devcluster.node` (Node, Lease, pod watch, status writes, Events),
:mod:`~kubeinfer_devkit.devcluster.logserver` (``kubectl logs``),
:mod:`~kubeinfer_devkit.devcluster.provisioner` (claims to hostPath volumes); this one puts them together.

CLI::

    python -m kubeinfer_devkit.devcluster.nodeagent --kubeconfig NODE_KUBECONFIG --state-dir DIR \
        [--provisioner-kubeconfig KUBECONFIG --volumes-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

from kubeinfer import kube
from kubeinfer.render.config import load_config
from kubeinfer_devkit.devcluster.logserver import LogServer
from kubeinfer_devkit.devcluster.node import NodeAgent
from kubeinfer_devkit.devcluster.podplan import NODE_NAME, Runtime

_log = logging.getLogger("kubeinfer.nodeagent")


async def run_agent(args: argparse.Namespace) -> None:
    from kubeinfer_devkit.devcluster.build import KUBERNETES_VERSION

    state = Path(args.state_dir)
    (state / "pods").mkdir(parents=True, exist_ok=True)
    llama = Path(args.llama_server) if args.llama_server else None
    if llama is None:
        from kubeinfer_devkit.engines import llamacpp

        llama = llamacpp.binary_path() if llamacpp.is_cached() else None
    runtime = Runtime(load_config(args.config), llama, args.python)
    cfg = await kube.load_client_config(args.kubeconfig)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with kube.api_client(cfg) as api:
        agent = NodeAgent(api, state, runtime, name=args.name, kubelet_version=KUBERNETES_VERSION)
        agent.clean_leftovers()
        logs = LogServer(agent)
        try:
            agent.kubelet_port = await logs.start()
        except (ImportError, OSError) as exc:  # cryptography is a dev dependency
            _log.warning("kubectl logs will not work: %s", exc)
        await agent.register()
        tasks = [asyncio.create_task(agent.heartbeat()), asyncio.create_task(agent.watch_pods())]
        async with contextlib.AsyncExitStack() as extra:
            if args.provisioner_kubeconfig:  # its own client: it acts as its own user, not as the node
                from kubeinfer_devkit.devcluster.provisioner import LocalPathProvisioner

                pcfg = await kube.load_client_config(args.provisioner_kubeconfig)
                papi = await extra.enter_async_context(kube.api_client(pcfg))
                provisioner = LocalPathProvisioner(papi, Path(args.volumes_dir), node=args.name)
                tasks.append(asyncio.create_task(provisioner.run()))
            _log.info("node %s ready (kubelet port %s)", args.name, agent.kubelet_port)
            try:
                await stop.wait()
            finally:
                _log.info("stopping: killing the pods' processes")
                for t in tasks:
                    t.cancel()
                await agent.shutdown()
                await logs.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubeinfer_devkit.devcluster.nodeagent",
        description="Register a GPU-less node and run the pods bound to it as local processes.",
    )
    parser.add_argument("--kubeconfig", required=True, help="credentials of system:node:<name>")
    parser.add_argument("--state-dir", required=True, help="pod logs, scratch volumes, process records")
    parser.add_argument("--name", default=NODE_NAME)
    parser.add_argument("--llama-server", help="llama-server binary (default: the cached build)")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs vLLM")
    parser.add_argument("--config", help="operator configuration file (which images are the engines)")
    parser.add_argument(
        "--provisioner-kubeconfig",
        help="credentials of the volume provisioner (devcluster/provisioner.py); unset: none runs",
    )
    parser.add_argument("--volumes-dir", help="where the provisioner makes the claims' directories")
    args = parser.parse_args(argv)
    if args.provisioner_kubeconfig and not args.volumes_dir:
        parser.error("--provisioner-kubeconfig needs --volumes-dir")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per probe is noise
    asyncio.run(run_agent(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
