"""Store paths for the cache's end-to-end tests, built in the real store without nixpkgs.

They cover what a NAR encoder and a cache can get wrong: references and a self-reference,
executables, relative, absolute and dangling symlinks, empty files and directories, unicode
names, names whose order differs between byte order and other orders, and a ~200 MB file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .nix import build

_MK = """
  mk = name: script: extra: builtins.derivation ({
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
  } // extra);
"""

FIXTURE_EXPR = (
    "let"
    + _MK
    + """
  dep = mk "hc-dep" "/bin/mkdir -p $out && /bin/echo dependency > $out/file" {};
  tree = mk "hc-tree" ''
    set -e
    /bin/mkdir -p $out/dir/empty-dir $out/bin $out/order $out/deep/a/b/c
    : > $out/empty-file
    /bin/printf '#!/bin/sh\\necho hi\\n' > $out/bin/run
    /bin/chmod 0755 $out/bin/run
    /bin/ln -s ../empty-file $out/dir/rel-link
    /bin/ln -s $dep/file $out/abs-link
    /bin/ln -s /nonexistent/dangling $out/dangling
    /bin/ln -s dir $out/dir-link
    /bin/echo unicode > "$out/dir/ünïcödé-файл-名前"
    for n in B a _ Z 0 aa a.b A ä é - '~' 'a b'; do /bin/echo "$n" > "$out/order/$n"; done
    /bin/echo "$out" > $out/self-reference
    /bin/echo "$dep" > $out/dep-reference
    /usr/bin/seq 1 20000 > $out/deep/a/b/c/numbers
    /usr/bin/head -c 100000 /dev/zero > $out/dir/zeros-100k
    /bin/printf 'x' > $out/dir/one-byte
    /bin/printf '<html>index</html>' > $out/dir/index.html
  '' { inherit dep; };
  single = mk "hc-single-file" "/bin/echo 'just one file' > $out" {};
  link = mk "hc-link" "/bin/ln -s $dep/file $out" { inherit dep; };
  big = mk "hc-big" "/usr/bin/seq 1 23000000 > $out" {};
in { inherit dep tree single link big; }
"""
)


@dataclass(frozen=True)
class Fixtures:
    dep: str
    tree: str
    single: str
    link: str
    big: str

    @property
    def small(self) -> list[str]:
        return [self.dep, self.tree, self.single, self.link]

    @property
    def all(self) -> list[str]:
        return [*self.small, self.big]


def build_fixtures(env: Mapping[str, str]) -> Fixtures:
    names = ["dep", "tree", "single", "link", "big"]
    paths = {}
    for name in names:
        out = build(f"({FIXTURE_EXPR}).{name}", env)
        paths[name] = out[0]
    return Fixtures(**paths)


def unique_path_expr(tag: str, content: str = "x") -> str:
    """A derivation whose output nobody else has: for tests that delete or collect paths."""
    return "let" + _MK + f'in mk "hc-{tag}" "/bin/echo {content} > $out" {{}}'
