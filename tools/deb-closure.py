#!/usr/bin/env python3
"""Print the Debian packages that the named ones need, from apt's own dependency data.

Usage: deb-closure.py [--skip PKG]... PKG...

Follows Depends and Pre-Depends (not Recommends), as `apt-cache depends` reports them. Of
alternatives (`a | b`) the first real package is taken; a virtual package stands for its first
provider. Packages named with --skip are left out, with what only they pull in: the guest image
takes what runs, not what installs (debconf, dpkg, adduser, ...).
"""
import subprocess
import sys


def depends(pkgs):
    """Each package's dependency groups: lists of alternatives, a virtual one as its providers."""
    out = subprocess.run(
        ["apt-cache", "depends", "--no-recommends", "--no-suggests", "--no-conflicts",
         "--no-breaks", "--no-replaces", "--no-enhances", *pkgs],
        check=True, capture_output=True, text=True).stdout
    result, groups, current, last = {}, None, [], None
    for line in out.splitlines():
        stripped = line.strip()
        if not line.startswith(" "):  # the next package's header
            groups = result.setdefault(stripped, [])
            current, last = [], None
            continue
        if line.startswith("    "):  # a provider of the virtual package above
            if last is not None:
                last.append(stripped)
            continue
        alt = stripped.startswith("|")
        kind, _, name = stripped.lstrip("|").partition(": ")
        if kind not in ("Depends", "PreDepends"):
            continue
        last = [] if name.startswith("<") else [name]
        current.append(last)
        if not alt:
            groups.append([p for option in current for p in option])
            current = []
    return result


def main(argv):
    skip, wanted = set(), []
    it = iter(argv)
    for a in it:
        if a == "--skip":
            skip.add(next(it))
        else:
            wanted.append(a)
    # Breadth first, one apt-cache call per level.
    seen, level = set(), [p for p in wanted if p not in skip]
    while level:
        seen.update(level)
        following = []
        for groups in depends(level).values():
            for group in groups:
                if any(p in seen or p in following for p in group):
                    continue
                choice = next((p for p in group if p not in skip), None)
                if choice is not None:
                    following.append(choice)
        level = following
    print("\n".join(sorted(seen)))


if __name__ == "__main__":
    main(sys.argv[1:])
