"""The CPU budget the runtimes size their threads for: affinity mask capped by the cgroup quota."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from reranker.backends import cpus

SERVER = Path(__file__).resolve().parents[1] / "server"


def test_quota_read_from_cgroup_v2_and_v1_files(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cpus.quota(v2) == 1.5
    assert cpus.budget(v2) == min(2, cpus.visible())  # rounded up, never above the visible CPUs
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpus.quota(v2) is None and cpus.budget(v2) == cpus.visible() and cpus.capped(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus.quota(v1) is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    assert cpus.quota(v1) == 0.5 and cpus.budget(v1) == 1
    assert cpus.quota(tmp_path / "absent") is None


def _real_cgroup_with_quota(quota_us: int) -> tuple[Path, Path]:
    """A real cgroup with a CFS quota of quota_us per 100 ms: (its folder, the file taking pids)."""
    name = f"reranker-test-{uuid.uuid4().hex[:8]}"
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    if v2.is_file() and "cpu" in v2.read_text().split():
        folder = Path("/sys/fs/cgroup") / name
        folder.mkdir()
        (folder / "cpu.max").write_text(f"{quota_us} 100000")
        return folder, folder / "cgroup.procs"
    v1 = Path("/sys/fs/cgroup/cpu")
    if (v1 / "cpu.cfs_quota_us").is_file():
        folder = v1 / name
        folder.mkdir()
        (folder / "cpu.cfs_period_us").write_text("100000")
        (folder / "cpu.cfs_quota_us").write_text(str(quota_us))
        return folder, folder / "tasks"
    pytest.skip("no writable cgroup cpu controller on this machine")


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a cgroup needs root")
def test_a_process_under_a_cpu_limit_sizes_torch_and_openvino_for_it(tiny_bert: Path, tmp_path: Path) -> None:
    """A real cgroup allowing one CPU's time (a pod's limits.cpu: 1): the budget is 1, and the
    PyTorch and OpenVINO backends loaded there run one thread, though the process sees every core."""
    if cpus.visible() < 2:
        pytest.skip("one visible CPU: a 1-CPU limit changes nothing")
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import torch; "
        "from reranker.backends import cpus, load_backend; from reranker.settings import Settings; "
        "kw = dict(model=sys.argv[2], model_cache_dir=sys.argv[3], device='cpu', quantization='none', warmup_on_start=False); "
        "load_backend(Settings(runtime='torch', **kw)); "
        "ov = load_backend(Settings(runtime='openvino', **kw)); "
        "print(cpus.quota(), cpus.budget(), torch.get_num_threads(), ov.compiled.get_property('INFERENCE_NUM_THREADS'), "
        "ov.sizing().max_parallel)"
    )
    folder, procs = _real_cgroup_with_quota(100_000)
    try:
        r = subprocess.run([sys.executable, "-c", probe, str(SERVER), str(tiny_bert), str(tmp_path)],
                           capture_output=True, text=True, timeout=300,
                           preexec_fn=lambda: procs.write_text(str(os.getpid())))
    finally:
        folder.rmdir()
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-5:] == ["1.0", "1", "1", "1", "1"], r.stdout
