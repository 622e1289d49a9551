#!/usr/bin/python3
"""Writes benchmark disk images: a mix of random, compressible and zero 64 KiB
blocks, and deltas of random 64 KiB blocks.

  gen_image.py base OUT SIZE_MIB [SEED]        a new image
  gen_image.py delta IMAGE PERCENT [SEED]      rewrite PERCENT % of its blocks in place
"""
import os
import random
import sys

BLOCK = 65536


def base(path, size_mib, seed):
    rnd = random.Random(seed)
    text = (b"The quick brown fox jumps over the lazy dog. cbtfs benchmark data %d\n" * 1000)
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
        for b in range((size_mib << 20) // BLOCK):
            kind = rnd.random()
            if kind < 0.4:      # 40 % random (incompressible)
                f.seek(b * BLOCK)
                f.write(rnd.randbytes(BLOCK))
            elif kind < 0.7:    # 30 % compressible
                f.seek(b * BLOCK)
                f.write((text.replace(b"%d", str(b).encode()) * 2)[:BLOCK])
            # 30 % zero: left as a hole


def delta(path, percent, seed):
    rnd = random.Random(seed)
    n = os.path.getsize(path) // BLOCK
    with open(path, "r+b") as f:
        for b in rnd.sample(range(n), n * percent // 100):
            f.seek(b * BLOCK)
            f.write(rnd.randbytes(BLOCK))


if __name__ == "__main__":
    if sys.argv[1] == "base":
        base(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 1)
    else:
        delta(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 2)
