"""Images for the node without a registry: the pause (sandbox) image, built here, and
importing image archives into the node's containerd.

The pause image is the upstream `build/pause/linux/pause.c` from the pinned k8s.io/kubernetes
module, compiled with `gcc -static` and packed by buildah into a docker-archive in the cache.
`up` imports it and every archive under <cache>/images (what `make images` writes) that
changed since its last import; `load-images` imports given archives into a running node.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterable
from pathlib import Path

from .console import die, log
from .containerd import ctr, root
from .paths import KUBE_MOD, cache_root


def images_dir() -> Path:
    """Where `make images` leaves its docker-archive tars."""
    return cache_root() / "images"


def _kubernetes_source() -> Path:
    r = subprocess.run(["go", "list", "-m", "-f", "{{.Dir}}", "k8s.io/kubernetes"], cwd=KUBE_MOD,
                       capture_output=True, text=True, env=dict(os.environ, GOFLAGS="-mod=mod"))
    if r.returncode != 0 or not r.stdout.strip():
        die(f"cannot locate the k8s.io/kubernetes module source: {r.stderr.strip()}")
    return Path(r.stdout.strip())


def pause_tag(src: Path) -> str:
    m = re.search(r"^TAG \?= (\S+)", (src / "build" / "pause" / "Makefile").read_text(), re.M)
    if not m:
        die(f"no TAG in {src / 'build' / 'pause' / 'Makefile'}")
    return m.group(1)


def pause_binary() -> tuple[Path, str]:
    """The static pause binary (compiled once per pause version) and that version."""
    src = _kubernetes_source()
    tag = pause_tag(src)
    out = cache_root() / "pause" / tag / "pause"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        r = subprocess.run(["gcc", "-Os", "-Wall", "-Werror", "-static",
                            f"-DVERSION=v{tag}-reranker-dev", "-o", str(tmp),
                            str(src / "build" / "pause" / "linux" / "pause.c")],
                           capture_output=True, text=True)
        if r.returncode != 0:
            die(f"compiling pause.c failed: {r.stderr.strip()}")
        tmp.replace(out)
    return out, tag


def pause_image() -> tuple[str, Path]:
    """(image name, docker-archive path) of the pause image, built when missing."""
    binary, tag = pause_binary()
    name = f"reranker-fleet/pause:{tag}"
    tar = binary.parent / "pause.tar"
    if tar.exists():
        return name, tar
    ctx = binary.parent / "context"
    shutil.rmtree(ctx, ignore_errors=True)
    ctx.mkdir()
    shutil.copy2(binary, ctx / "pause")
    (ctx / "Containerfile").write_text(
        'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n')
    for cmd in (["buildah", "build", "--quiet", "--isolation", "chroot", "-f",
                 str(ctx / "Containerfile"), "-t", name, str(ctx)],
                ["buildah", "push", "--quiet", name, f"docker-archive:{tar}.tmp:{name}"]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            die(f"{' '.join(cmd[:2])} of the pause image failed: {r.stderr.strip()[-500:]}")
    Path(f"{tar}.tmp").replace(tar)
    shutil.rmtree(ctx, ignore_errors=True)
    log(f"built the pause image {name} ({tar})")
    return name, tar


def import_archives(d: Path, tars: Iterable[Path]) -> list[str]:
    """`ctr images import` each archive (docker-archive or OCI) into the CRI namespace;
    return the image names imported."""
    names: list[str] = []
    for tar in tars:
        r = ctr(d, "images", "import", str(tar), check=False)
        if r.returncode != 0:
            die(f"importing {tar} failed: {(r.stderr or r.stdout).strip()[-500:]}")
        names += re.findall(r"^unpacking (\S+) \(", r.stdout, re.M)
    return names


def _stamps_path() -> Path:
    return root() / "imported.json"


def import_changed(d: Path, tars: Iterable[Path], *, force: bool = False) -> list[str]:
    """Import the archives that changed since they were last imported into this containerd
    root (its content outlives `down`), so a warm `up` imports nothing; all with force.
    A stamp counts only while the images it imported are still in the store (a full disk or
    a pruned store loses them: they are imported again). Tars that are no image archive are
    skipped (and remembered as such)."""
    try:
        stamps = dict(json.loads(_stamps_path().read_text()))
    except (OSError, ValueError):
        stamps = {}
    present = set(ctr(d, "images", "ls", "-q", check=False).stdout.split())
    names = []
    for tar in tars:
        st = tar.stat()
        stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        old = stamps.get(str(tar))
        if (not force and isinstance(old, dict)
                and {k: old.get(k) for k in stamp} == stamp
                and set(old.get("images", [])) <= present):
            continue
        if isinstance(old, dict) and old.get("images"):
            # the replaced images go first, with a synchronous garbage collection: containerd
            # keeps unreferenced content and snapshots until its next GC, and the store grew
            # by a server image (~9 GB with its snapshot) per rebuild
            ctr(d, "images", "rm", "--sync", *old["images"], check=False)
        imported = import_archives(d, [tar]) if is_image_archive(tar) else []
        names += imported
        stamps[str(tar)] = {**stamp, "images": imported}
        _stamps_path().write_text(json.dumps(stamps, indent=2) + "\n")
    return names


def is_image_archive(tar: Path) -> bool:
    """A docker-archive or OCI layout tar (not, e.g., a root filesystem tar kept next to them)."""
    try:
        with tarfile.open(tar) as tf:
            return any(m.name.lstrip("./") in ("manifest.json", "index.json") for m in tf)
    except (OSError, tarfile.TarError):
        return False


def cached_archives() -> list[Path]:
    """The tars `make images` left in images_dir() (image archives, and maybe others)."""
    return sorted(images_dir().glob("*.tar")) if images_dir().is_dir() else []
