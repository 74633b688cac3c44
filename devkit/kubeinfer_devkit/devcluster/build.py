"""Build, once, and cache the binaries of a local Kubernetes control plane.

Everything is built from Go module sources fetched through the Go module proxy with the local
``go`` toolchain; nothing prebuilt is downloaded. Each binary lands in its own versioned folder::

    ${XDG_CACHE_HOME:-~/.cache}/kubeinfer/bin/<component>-<version>/<component>

so bumping a version below builds the new one next to the old one, and a binary that is there is
never rebuilt. A binary is only put in place (renamed from a temporary name) after ``go build``
succeeded, so an interrupted build leaves nothing that looks cached.

Why a wrapper module: ``go install k8s.io/kubernetes/cmd/kube-apiserver@vX`` is refused because
k8s.io/kubernetes's go.mod ``replace``s its staging modules (k8s.io/api, k8s.io/client-go, ...) with
local paths and requires them at the fake version v0.0.0. Dependencies' replace directives are
ignored anyway, so we generate a throw-away main module that requires ``k8s.io/kubernetes vX`` and
replaces each of those staging modules with its published tag (``v0.X.Y`` for ``v1.X.Y``), then
``go build`` the command package from there. etcd's server module has the same shape (its sibling
modules are replaced by ``../api`` etc.); every component goes through the same path.

CLI::

    python -m kubeinfer_devkit.devcluster.build                 # build whatever is missing
    python -m kubeinfer_devkit.devcluster.build --only etcd,kwok
    python -m kubeinfer_devkit.devcluster.build --print-dir     # print the cache's bin dir, build nothing
    python -m kubeinfer_devkit.devcluster.build --print-paths   # build if needed, print name=path lines

Python::

    from kubeinfer_devkit.devcluster.build import ensure_binaries
    bins = ensure_binaries(["etcd", "kube-apiserver"])   # -> {"etcd": Path, ...}
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# --- Pinned versions: the one place to bump them. -------------------------------------------------
KUBERNETES_VERSION = "v1.34.10"  # kube-apiserver, kube-controller-manager, kube-scheduler, kubectl
ETCD_VERSION = "v3.6.16"
KWOK_VERSION = "v0.8.0"
HELM_VERSION = "v3.19.5"
# Not built: only KEDA's CRDs are read from its module (keda_crd), to test ScaledObjects against them.
KEDA_VERSION = "v2.20.2"

# `go build -p`: the machines this runs on have 2 cores; more only adds memory pressure.
BUILD_JOBS = 2
# How often a long build says it is still alive.
HEARTBEAT_SECONDS = 60.0


class BuildError(RuntimeError):
    """A component could not be built (the message carries the tail of the Go output)."""


@dataclass(frozen=True)
class ModuleInfo:
    """What `go mod download -json` tells about the upstream module of a component."""

    path: str
    version: str
    time: str  # commit time of the tag, RFC 3339; used as a reproducible build date
    dir: Path  # extracted source in the module cache
    gomod: str  # text of the upstream go.mod


@dataclass(frozen=True)
class Component:
    name: str  # binary name, also the cache folder prefix
    module: str  # Go module that holds the main package
    version: str  # version of that module
    package: str  # main package to build
    # Version to pin for each module that the upstream go.mod `replace`s with a local path
    # (k8s staging modules, etcd's sibling modules). None: the upstream has no such replaces.
    local_replace_version: str | None = None
    ldflags: Callable[[ModuleInfo], list[str]] = field(default=lambda info: [])
    # Files of the module's source tree copied next to the binary (into <dir>/<dest>).
    data_files: tuple[tuple[str, str], ...] = ()

    @property
    def dirname(self) -> str:
        return f"{self.name}-{self.version}"


def _kube_ldflags(info: ModuleInfo) -> list[str]:
    # The same -X flags as hack/lib/version.sh, so `--version` and /version report the real release.
    major, minor = info.version.lstrip("v").split(".")[:2]
    values = {
        "gitVersion": info.version,
        "gitMajor": major,
        "gitMinor": minor,
        "gitTreeState": "clean",
        "buildDate": info.time,
    }
    return [
        f"-X {pkg}.{key}={value}"
        for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
        for key, value in values.items()
    ]


def _helm_ldflags(info: ModuleInfo) -> list[str]:
    flags = [
        f"-X helm.sh/helm/v3/internal/version.version={info.version}",
        "-X helm.sh/helm/v3/internal/version.gitTreeState=clean",
    ]
    # Like helm's Makefile: the default .Capabilities.KubeVersion follows the client-go it uses.
    m = re.search(r"^\s*k8s\.io/client-go\s+v0\.(\d+)\.", info.gomod, re.M)
    if m:
        for pkg in ("helm.sh/helm/v3/pkg/lint/rules", "helm.sh/helm/v3/pkg/chartutil"):
            flags += [f"-X {pkg}.k8sVersionMajor=1", f"-X {pkg}.k8sVersionMinor={m.group(1)}"]
    return flags


def _kube(name: str, package: str | None = None) -> Component:
    return Component(
        name=name,
        module="k8s.io/kubernetes",
        version=KUBERNETES_VERSION,
        package=package or f"k8s.io/kubernetes/cmd/{name}",
        local_replace_version="v0" + KUBERNETES_VERSION[2:],  # v1.34.12 -> v0.34.12
        ldflags=_kube_ldflags,
    )


_KWOK_STAGES = "kustomize/stage"

COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component(
            name="etcd",
            module="go.etcd.io/etcd/server/v3",
            version=ETCD_VERSION,
            package="go.etcd.io/etcd/server/v3",  # server/main.go is the etcd binary
            local_replace_version=ETCD_VERSION,
        ),
        _kube("kube-apiserver"),
        _kube("kube-controller-manager"),
        _kube("kube-scheduler"),
        _kube("kubectl"),
        Component(
            name="kwok",
            module="sigs.k8s.io/kwok",
            version=KWOK_VERSION,
            package="sigs.k8s.io/kwok/cmd/kwok",
            # The bare `kwok` binary has no built-in behaviour: it needs Stage objects in its config.
            # These are the ones `kwokctl` uses by default; controlplane.py feeds them to kwok.
            data_files=tuple(
                (f"{_KWOK_STAGES}/{src}", f"stages/{Path(src).name}")
                for src in (
                    "node/fast/node-initialize.yaml",
                    "node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
                    "pod/fast/pod-ready.yaml",
                    "pod/fast/pod-complete.yaml",
                    "pod/fast/pod-delete.yaml",
                )
            ),
        ),
        Component(
            name="helm",
            module="helm.sh/helm/v3",
            version=HELM_VERSION,
            package="helm.sh/helm/v3/cmd/helm",
            ldflags=_helm_ldflags,
        ),
    )
}

# What ControlPlane needs; kubectl and helm are for tests and people.
CONTROL_PLANE_COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


# --- Paths -----------------------------------------------------------------------------------------


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kubeinfer"


def bin_root() -> Path:
    return cache_root() / "bin"


def component_dir(name: str) -> Path:
    return bin_root() / COMPONENTS[name].dirname


def binary_path(name: str) -> Path:
    return component_dir(name) / name


def is_cached(name: str) -> bool:
    path = binary_path(name)
    return path.is_file() and os.access(path, os.X_OK)


# --- Helpers ---------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[kubeinfer build] {msg}", file=sys.stderr, flush=True)


def fmt_secs(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _go() -> str:
    go = os.environ.get("GO") or shutil.which("go")
    if not go:
        raise BuildError("no `go` toolchain on PATH (set $GO to its path); it builds the binaries")
    return go


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GOTOOLCHAIN", "local")  # never try to fetch another toolchain
    env["CGO_ENABLED"] = "0"  # static, no C toolchain needed
    env["GOWORK"] = "off"  # a go.work somewhere above the temp dir must not interfere
    return env


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def _check_go_version(go: str, required: str, component: str) -> None:
    out = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, env=_go_env(), check=True)
    have = out.stdout.strip()  # e.g. go1.26.8
    if _version_tuple(have) < _version_tuple(required):
        raise BuildError(f"{component} needs Go >= {required} (its go.mod says so); the local Go is {have}")


def _module_info(go: str, module: str, version: str, workdir: Path) -> ModuleInfo:
    # `go mod download -json` fetches the module into the module cache and says where it is.
    proc = subprocess.run(
        [go, "mod", "download", "-json", f"{module}@{version}"],
        cwd=workdir,
        capture_output=True,
        text=True,
        env=_go_env(),
    )
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError:
        data = {}
    if proc.returncode != 0 or "Error" in data or "GoMod" not in data:
        raise BuildError(
            f"cannot download {module}@{version}: {data.get('Error') or proc.stderr.strip() or proc.stdout}"
        )
    return ModuleInfo(
        path=module,
        version=version,
        time=data.get("Time", "1970-01-01T00:00:00Z"),
        dir=Path(data["Dir"]),
        gomod=Path(data["GoMod"]).read_text(),
    )


def _parse_gomod(text: str) -> tuple[str, list[str], list[str]]:
    """Return (go directive, godebug lines, modules replaced by a local path that are also required)."""
    go_m = re.search(r"^go\s+(\S+)", text, re.M)
    go_version = go_m.group(1) if go_m else "1.22"
    godebug = re.findall(r"^godebug\s+.+$", text, re.M)
    # Works for both `replace x => ../y` lines and entries of a `replace ( ... )` block.
    local = re.findall(
        r"^[ \t]*(?:replace[ \t]+)?(\S+)(?:[ \t]+\S+)?[ \t]+=>[ \t]+\.{1,2}/\S*[ \t]*$", text, re.M
    )
    # Only modules in the build graph: k8s.io/kubernetes also replaces e.g. k8s.io/sample-controller,
    # which nothing requires (and whose tags the proxy may not have); etcd "replaces" forbidden
    # modules with ./FORBIDDEN_DEPENDENCY for the same reason.
    required = set(re.findall(r"^[ \t]*(?:require[ \t]+)?(\S+)[ \t]+v\S+(?:[ \t]*//.*)?$", text, re.M))
    return go_version, godebug, [m for m in local if m in required]


def _wrapper_gomod(comp: Component, info: ModuleInfo) -> str:
    go_version, godebug, local = _parse_gomod(info.gomod)
    lines = [f"module kubeinfer.local/build/{comp.name}", "", f"go {go_version}", ""]
    if godebug:  # keep upstream's runtime defaults (e.g. k8s: `godebug default=go1.24`)
        lines += [*godebug, ""]
    lines += [f"require {comp.module} {comp.version}", ""]
    if local:
        if comp.local_replace_version is None:
            raise BuildError(f"{comp.module} replaces {local} locally; set local_replace_version for it")
        lines.append("replace (")
        lines += [f"\t{m} => {m} {comp.local_replace_version}" for m in local]
        lines += [")", ""]
    return "\n".join(lines)


def run_logged(cmd: list[str], cwd: Path, env: dict[str, str], label: str, started: float) -> None:
    """Run a long build command with its output in a temp file; say every minute that it is alive.
    Shared with the llama-server build (kubeinfer_devkit.engines.llamacpp)."""
    with tempfile.TemporaryFile(mode="w+") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        while True:
            try:
                rc = proc.wait(timeout=HEARTBEAT_SECONDS)
                break
            except subprocess.TimeoutExpired:
                log(f"  ... {label} ({fmt_secs(time.monotonic() - started)})")
            except BaseException:  # Ctrl-C: don't leave the compiler running behind us
                proc.kill()
                proc.wait()
                raise
        if rc != 0:
            out.seek(0)
            tail = "\n".join(out.read().splitlines()[-60:])
            raise BuildError(f"{label} failed (exit {rc}): {' '.join(cmd)}\n{tail}")


def build_component(comp: Component) -> Path:
    """Build one component into its cache folder (unconditionally) and return the binary path."""
    go = _go()
    dest_dir = bin_root() / comp.dirname
    dest = dest_dir / comp.name
    started = time.monotonic()
    log(f"building {comp.name} {comp.version} ({comp.package}) ...")
    with tempfile.TemporaryDirectory(prefix=f"kubeinfer-build-{comp.name}-") as tmp:
        work = Path(tmp)
        info = _module_info(go, comp.module, comp.version, work)
        _check_go_version(go, _parse_gomod(info.gomod)[0], comp.name)
        (work / "go.mod").write_text(_wrapper_gomod(comp, info))

        dest_dir.mkdir(parents=True, exist_ok=True)
        tmp_bin = dest_dir / f".{comp.name}.tmp-{os.getpid()}"
        ldflags = " ".join(["-s", "-w", *comp.ldflags(info)])
        cmd = [go, "build", "-mod=mod", f"-p={BUILD_JOBS}", "-trimpath", "-ldflags", ldflags]
        cmd += ["-o", str(tmp_bin), comp.package]
        try:
            # -mod=mod lets go resolve the wrapper's requirements and write its go.sum itself.
            run_logged(cmd, work, _go_env(), f"building {comp.name}", started)
            for src, rel in comp.data_files:
                target = dest_dir / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(info.dir / src, target)  # module cache files are read-only: copy bytes
            tmp_bin.chmod(0o755)
            tmp_bin.replace(dest)  # atomic: only now is the component "cached"
        finally:
            tmp_bin.unlink(missing_ok=True)
    log(f"built {comp.name} {comp.version} in {fmt_secs(time.monotonic() - started)} -> {dest}")
    return dest


@contextlib.contextmanager
def build_lock(name: str = "") -> Iterator[None]:
    """Serialize builds between processes (two test sessions starting at once). Each `name` has its
    own lock, so the control plane and llama-server can build side by side."""
    root = bin_root()
    root.mkdir(parents=True, exist_ok=True)
    what = f"{name} build" if name else "build"
    with open(root / (f".lock-{name}" if name else ".lock"), "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another {what} is running; waiting for it ...")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def keda_crd(name: str = "keda.sh_scaledobjects.yaml", version: str = KEDA_VERSION) -> Path:
    """One of KEDA's CRD manifests (config/crd/bases/<name>), taken from its Go module through the
    module proxy and cached as ${XDG_CACHE_HOME:-~/.cache}/kubeinfer/crds/keda-<version>/<name>.

    Raises BuildError when the module cannot be downloaded (no proxy access) or lacks the file.
    """
    module = "github.com/kedacore/keda/v2"
    dest = cache_root() / "crds" / f"keda-{version}" / name
    if dest.is_file():
        return dest
    go = _go()
    with tempfile.TemporaryDirectory(prefix="kubeinfer-keda-") as tmp:
        proc = subprocess.run(
            [go, "mod", "download", "-json", f"{module}@{version}"],
            cwd=tmp, capture_output=True, text=True, env=_go_env(), timeout=600,
        )  # fmt: skip
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError:
        data = {}
    rel = f"config/crd/bases/{name}"
    text: str | None = None
    if data.get("Dir") and (Path(data["Dir"]) / rel).is_file():
        text = (Path(data["Dir"]) / rel).read_text()
    elif data.get("Zip") and Path(data["Zip"]).is_file():
        # The zip is there even when the local Go is older than KEDA's go.mod asks (no Dir then).
        import zipfile

        with zipfile.ZipFile(data["Zip"]) as zf, contextlib.suppress(KeyError):
            text = zf.read(f"{module}@{version}/{rel}").decode()
    if text is None:
        why = data.get("Error") or proc.stderr.strip() or f"no {rel} in the module"
        raise BuildError(f"cannot get {name} from {module}@{version}: {why}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_dest = dest.with_name(f".{name}.tmp-{os.getpid()}")
    tmp_dest.write_text(text)
    tmp_dest.replace(dest)
    return dest


def ensure_binaries(components: Iterable[str] | None = None, *, force: bool = False) -> dict[str, Path]:
    """Return {name: binary path} for `components` (default: all), building what is not cached.

    Raises BuildError (or KeyError for an unknown name) when a binary cannot be had.
    """
    names = list(COMPONENTS) if components is None else list(dict.fromkeys(components))
    unknown = [n for n in names if n not in COMPONENTS]
    if unknown:
        raise KeyError(f"unknown component(s) {unknown}; known: {sorted(COMPONENTS)}")
    missing = [n for n in names if force or not is_cached(n)]
    if missing:
        with build_lock():
            total = time.monotonic()
            for name in missing:
                if force or not is_cached(name):  # another process may have built it meanwhile
                    build_component(COMPONENTS[name])
            log(f"all built in {fmt_secs(time.monotonic() - total)}")
    return {n: binary_path(n) for n in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubeinfer_devkit.devcluster.build",
        description="Build and cache the local control-plane binaries (etcd, kube-*, kwok, kubectl, helm).",
    )
    parser.add_argument("--only", help=f"comma-separated subset of: {','.join(COMPONENTS)}")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--print-dir", action="store_true", help="print the bin dir and exit (no build)")
    parser.add_argument("--print-paths", action="store_true", help="after building, print name=path lines")
    args = parser.parse_args(argv)

    if args.print_dir:
        print(bin_root())
        return 0
    names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    try:
        paths = ensure_binaries(names, force=args.force)
    except (BuildError, KeyError) as exc:
        log(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}")
        return 1
    for name, path in paths.items():
        print(f"{name}={path}" if args.print_paths else f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
