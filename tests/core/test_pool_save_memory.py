"""Saving a pool streams it to the file: no second copy of the pool in memory (a server's
pool is gigabytes, and its periodic saves once doubled the process's peak), and loading
holds one copy of the file. Measured in a fresh interpreter (ru_maxrss is per process)."""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, resource, sys, tempfile
    import torch
    from kvcomm import AnchorPool, PoolConfig

    def peak_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    pool = AnchorPool(PoolConfig(capacity=64))
    k = torch.randn(8, 4, 1024, 64)        # 8 MiB per tensor
    for i in range(24):                     # 24 anchors: 384 MiB of bases
        pool.add_anchor("s", k + i, k - i)
    del k
    held = pool.memory_bytes() / 2**20
    before = peak_mib()
    path = os.path.join(tempfile.mkdtemp(), "pool.bin")
    pool.save(path)
    after_save = peak_mib()
    del pool
    loaded = AnchorPool(PoolConfig(capacity=64))
    loaded.load(path)
    after_load = peak_mib()
    print(held, before, after_save, after_load, os.path.getsize(path) / 2**20, loaded.size())
""")


def test_save_adds_no_copy_of_the_pool_and_load_holds_one_copy_of_the_file():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    held, before, after_save, after_load, file_mib, anchors = map(float, out.stdout.split())
    assert anchors == 24 and held >= 380 and file_mib >= held
    assert after_save - before < 0.25 * held, (before, after_save, held)   # an in-memory image would add >= held
    # load: the file once (read in place) plus the pool made from it, with the old pool freed first
    assert after_load - before < 1.25 * held, (before, after_load, held)
