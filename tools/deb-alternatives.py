#!/usr/bin/env python3
"""Make in STAGE the alternatives links that the named packages' postinst scripts would make.

Usage: deb-alternatives.py STAGE DEB...

`dpkg -x` runs no maintainer scripts, so links such as libblas.so.3 -> blas/libblas.so.3 or
/usr/bin/mpirun -> mpirun.openmpi are missing. This reads each package's postinst and, for every
`update-alternatives --install LINK NAME PATH PRIO` (and its `--slave LINK NAME PATH`), links
LINK to PATH when PATH is in STAGE and LINK is not there yet. Prints each link made.
"""
import os
import shlex
import subprocess
import sys


def postinst(deb):
    out = subprocess.run(["dpkg-deb", "--ctrl-tarfile", deb], check=True, capture_output=True).stdout
    tar = subprocess.run(["tar", "-xO", "./postinst"], input=out, capture_output=True)
    return tar.stdout.decode(errors="replace") if tar.returncode == 0 else ""


def alternatives(script):
    """(link, path) pairs of the --install and --slave options in script."""
    text = script.replace("\\\n", " ")
    pairs = []
    for line in text.splitlines():
        if "update-alternatives" not in line or line.lstrip().startswith("#"):
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        for i, w in enumerate(words):
            if w in ("--install", "--slave") and i + 3 < len(words):
                link, path = words[i + 1], words[i + 3]
                if link.startswith("/") and path.startswith("/"):
                    pairs.append((link, path))
    return pairs


def main(stage, debs):
    for deb in debs:
        for link, path in alternatives(postinst(deb)):
            target = os.path.join(stage, path.lstrip("/"))
            where = os.path.join(stage, link.lstrip("/"))
            if not os.path.exists(target) or os.path.lexists(where):
                continue
            os.makedirs(os.path.dirname(where), exist_ok=True)
            os.symlink(path, where)
            print(f"{link} -> {path}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
