"""What the machine is: python, torch, CUDA and the GPU, asked in a child process (torch is never imported here)."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from typing import Mapping

PROBE = r"""
import json, platform, sys
out = {"python": platform.python_version(), "executable": sys.executable}
try:
    import torch
except Exception as e:
    out["torch_error"] = f"{type(e).__name__}: {e}"
else:
    out.update(torch=torch.__version__, cuda_runtime=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if out["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        out.update(device_count=torch.cuda.device_count(), gpu=p.name, compute_capability=f"{p.major}.{p.minor}",
                   memory_bytes=p.total_memory, multiprocessors=p.multi_processor_count,
                   bf16_supported=torch.cuda.is_bf16_supported(), cudnn=torch.backends.cudnn.version())
    try:
        import pynvml
        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        out["driver"] = driver.decode() if isinstance(driver, bytes) else driver
    except Exception:
        pass
print("PROBE " + json.dumps(out))
"""


def probe_machine(env: Mapping[str, str], timeout: float) -> dict:
    """The machine as the steps will see it: torch's version or import error, CUDA, the GPU and its driver."""
    probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=dict(env),
                           timeout=timeout)
    found = [ln for ln in probe.stdout.splitlines() if ln.startswith("PROBE ")]
    if found:
        machine = json.loads(found[-1][len("PROBE "):])
    else:
        machine = {"probe_error": (probe.stderr.strip().splitlines() or [f"exit {probe.returncode}"])[-1]}
    if machine.get("cuda_available") and not machine.get("driver") and shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        machine["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    machine["platform"] = platform.platform()
    return machine
