"""engine.cpu_alloc: glibc told to keep freed memory (mmap and trim thresholds), checked on glibc itself."""
import json
import os
import platform
import subprocess
import sys

import pytest

from engine import cpu_alloc
from engine.config import load_config
from engine.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# In a fresh process: malloc 24 MiB, read glibc's chunk header (the IS_MMAPPED bit, 0x2, of the
# size word just before the pointer), free it, and see whether the program break moved back.
_PROBE = """
import ctypes, json, sys
sys.path.insert(0, {root!r})
from engine.cpu_alloc import apply_allocator_mode
applied = apply_allocator_mode({mode!r}, "cpu")
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.sbrk.restype = ctypes.c_void_p
libc.sbrk.argtypes = [ctypes.c_ssize_t]
p = libc.malloc(24 << 20)
mmapped = bool(ctypes.c_size_t.from_address(p - ctypes.sizeof(ctypes.c_size_t)).value & 2)
brk = libc.sbrk(0)
libc.free(p)
print(json.dumps({{"applied": applied, "mmapped": mmapped, "returned": brk - libc.sbrk(0)}}))
"""


def _probe(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    proc = subprocess.run([sys.executable, "-c", _PROBE.format(root=ROOT, mode=mode)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tuned_malloc_keeps_freed_memory():
    default, tuned = _probe("default"), _probe("tuned")
    # glibc's defaults: a 24 MiB block gets its own mmap, unmapped (returned to the OS) on free
    assert not default["applied"] and default["mmapped"], default
    # tuned: it comes from the heap, and freeing it keeps the heap (no trim) for the next step
    assert tuned["applied"] and not tuned["mmapped"] and tuned["returned"] == 0, tuned


def test_allocator_mode_is_checked():
    with pytest.raises(ValueError, match="tuned"):
        cpu_alloc.apply_allocator_mode("jemalloc", "cpu")
    with pytest.raises(UserError, match="train.cpu_malloc"):
        load_config(None, ["train.cpu_malloc=fast"])
