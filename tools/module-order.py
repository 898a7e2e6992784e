#!/usr/bin/env python3
"""Print the kernel modules needed for the named ones, dependencies first.

Usage: module-order.py MODULES_DIR NAME...

Each module's dependencies are read from its own .modinfo `depends=` field
(never from a fixed list: it changes between kernel builds). Modules built into
the kernel (listed in modules.builtin) are skipped.
"""
import gzip, lzma, os, sys

def find_modules(root):
    found = {}
    for d, _, files in os.walk(root):
        for f in files:
            for ext in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
                if f.endswith(ext):
                    name = f[: -len(ext)].replace("-", "_")
                    found.setdefault(name, os.path.join(d, f))
    return found

def read_module(path):
    data = open(path, "rb").read()
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    if path.endswith(".zst"):
        import subprocess
        return subprocess.run(["zstd", "-qdc", path], check=True, capture_output=True).stdout
    return data

def depends(path):
    data = read_module(path)
    i = data.find(b"depends=")
    if i < 0:
        return []
    end = data.find(b"\0", i)
    val = data[i + len("depends="): end].decode()
    return [x.replace("-", "_") for x in val.split(",") if x]

def main():
    root, names = sys.argv[1], sys.argv[2:]
    mods = find_modules(root)
    builtin = set()
    bpath = os.path.join(root, "modules.builtin")
    if os.path.exists(bpath):
        for line in open(bpath):
            builtin.add(os.path.basename(line.strip()).split(".ko")[0].replace("-", "_"))
    order, seen = [], set()
    def visit(n, stack=()):
        if n in seen or n in builtin:
            return
        if n not in mods:
            sys.exit(f"module-order: {n} is neither a module nor built in under {root}")
        if n in stack:
            sys.exit(f"module-order: dependency cycle at {n}")
        for d in depends(mods[n]):
            visit(d, stack + (n,))
        seen.add(n)
        order.append(n)
    for n in names:
        visit(n.replace("-", "_"))
    print(" ".join(order))

if __name__ == "__main__":
    main()
