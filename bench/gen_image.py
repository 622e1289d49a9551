#!/usr/bin/python3
"""Writes benchmark disk images: a mix of random, compressible and zero 64 KiB
blocks, and deltas of random 64 KiB blocks.

  gen_image.py base OUT SIZE_MIB [SEED]        a new image
  gen_image.py delta IMAGE PERCENT [SEED]      rewrite PERCENT % of its blocks in place
  gen_image.py sparse OUT SIZE_MIB COUNT [SEED]  a sparse image: COUNT random blocks, the rest holes
  gen_image.py scatter IMAGE COUNT [SEED]      rewrite COUNT random blocks in place (any size)

Every block written by delta, sparse and scatter is random (incompressible)
and differs from what was there.
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


def scatter(path, count, seed, pool=None):
    """Rewrites count random blocks, chosen among the block numbers in pool if
    given (to keep the data of a big sparse image bounded), else anywhere."""
    rnd = random.Random(seed)
    candidates = pool if pool is not None else range(os.path.getsize(path) // BLOCK)
    with open(path, "r+b") as f:
        for b in rnd.sample(candidates, min(count, len(candidates))):
            f.seek(b * BLOCK)
            f.write(rnd.randbytes(BLOCK))


def sparse(path, size_mib, count, seed, pool=None):
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
    scatter(path, count, seed, pool)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "base":
        base(args[0], int(args[1]), int(args[2]) if len(args) > 2 else 1)
    elif cmd == "delta":
        delta(args[0], int(args[1]), int(args[2]) if len(args) > 2 else 2)
    elif cmd == "sparse":
        sparse(args[0], int(args[1]), int(args[2]), int(args[3]) if len(args) > 3 else 1)
    elif cmd == "scatter":
        scatter(args[0], int(args[1]), int(args[2]) if len(args) > 2 else 2)
    else:
        sys.exit(__doc__)
