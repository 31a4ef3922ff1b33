#!/usr/bin/env python3
"""Would `az bicep build` accept these files? The offline answer, in two passes per file.

1. Syntax: parse with the tree-sitter Bicep grammar (PyPI `tree-sitter-bicep`) and report every
   ERROR or MISSING node as `file:line:col`. This finds missing braces, bad expressions, broken
   decorators, unterminated strings.
2. The lexer rule the grammar does not apply: the Bicep lexer accepts `#` only as one of three
   pragmas at the start of a line (`#disable-next-line <codes>`, `#disable-diagnostics`,
   `#restore-diagnostics`). Any other `#` outside a string or comment is error BCP001 ("token not
   recognized") and the template does not build, e.g. a `#checkov:skip=...` line. checkov reads
   its suppressions from `//checkov:skip=CKV_...:reason` comments instead.

Usage: check_bicep.py [FILE.bicep | DIR ...]  (default: infra/main.bicep and infra/modules/)
Prints one line per problem and a closing "N passed, M failed" line (files); exits 1 on any
problem, 2 when the grammar is not installed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

INFRA = Path(__file__).resolve().parent.parent

PRAGMA = re.compile(r"#(disable-next-line|disable-diagnostics|restore-diagnostics)(?![\w-])")


def hash_problems(text: str) -> list[tuple[int, int, str]]:
    """(line, column, message) for every `#` the Bicep lexer would refuse (1-based positions).

    A small lexer for what matters here: `//` and `/* */` comments, `'...'` strings with `\\`
    escapes and `${...}` interpolations (whose expressions may hold strings again), and `'''`
    multi-line strings (no escapes, no interpolation).
    """
    problems: list[tuple[int, int, str]] = []
    i, n = 0, len(text)
    line, line_start = 1, 0
    # Stack of contexts: "code" (top level or inside `${ }`), "str" (inside '...').
    # For a `${` context we count braces so `}` of an object literal does not close it.
    stack: list[list] = [["code", 0]]

    def col(at: int) -> int:
        return at - line_start + 1

    while i < n:
        c = text[i]
        ctx = stack[-1]
        if c == "\n":
            line += 1
            line_start = i + 1
            i += 1
            continue
        if ctx[0] == "str":
            if c == "\\":
                i += 2
                continue
            if c == "'":
                stack.pop()
                i += 1
                continue
            if text.startswith("${", i):
                stack.append(["interp", 0])
                i += 2
                continue
            i += 1
            continue
        # code or interpolation
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if text.startswith("/*", i):
            j = text.find("*/", i + 2)
            end = n if j < 0 else j + 2
            line += text.count("\n", i, end)
            k = text.rfind("\n", i, end)
            if k >= 0:
                line_start = k + 1
            i = end
            continue
        if text.startswith("'''", i):
            j = text.find("'''", i + 3)
            end = n if j < 0 else j + 3
            line += text.count("\n", i, end)
            k = text.rfind("\n", i, end)
            if k >= 0:
                line_start = k + 1
            i = end
            continue
        if c == "'":
            stack.append(["str", 0])
            i += 1
            continue
        if ctx[0] == "interp":
            if c == "{":
                ctx[1] += 1
            elif c == "}":
                if ctx[1] == 0:
                    stack.pop()
                    i += 1
                    continue
                ctx[1] -= 1
        if c == "#":
            at_line_start = text[line_start:i].strip() == "" and ctx[0] == "code"
            m = PRAGMA.match(text, i)
            if not (at_line_start and m):
                end = text.find("\n", i)
                snippet = text[i : (n if end < 0 else end)][:60]
                problems.append(
                    (
                        line,
                        col(i),
                        f"BCP001: '#' is only allowed as #disable-next-line, "
                        f"#disable-diagnostics or #restore-diagnostics at a line start "
                        f"(use //checkov:skip=... for checkov): {snippet!r}",
                    )
                )
        i += 1
    return problems


def syntax_problems(parser, source: bytes) -> list[tuple[int, int, str]]:
    tree = parser.parse(source)
    out: list[tuple[int, int, str]] = []
    if not tree.root_node.has_error:
        return out
    stack = [tree.root_node]
    while stack:
        node = stack.pop()
        if node.is_missing:
            r, c = node.start_point
            out.append((r + 1, c + 1, f"syntax: missing {node.type!r}"))
        elif node.is_error:
            r, c = node.start_point
            text = source[node.start_byte : node.end_byte].decode("utf-8", "replace")
            out.append((r + 1, c + 1, f"syntax: unexpected {text.splitlines()[0][:60]!r}"))
            continue  # one report per error subtree
        if node.has_error:
            stack.extend(reversed(node.children))
    return sorted(out)


def files_from(args: list[str]) -> list[Path]:
    if not args:
        return [INFRA / "main.bicep", *sorted((INFRA / "modules").glob("*.bicep"))]
    out: list[Path] = []
    for a in args:
        p = Path(a)
        out.extend(sorted(p.rglob("*.bicep")) if p.is_dir() else [p])
    return out


def main(argv: list[str]) -> int:
    try:
        import tree_sitter
        import tree_sitter_bicep
    except ImportError as e:
        print(f"FAIL the Bicep grammar is not installed ({e}); run infra/tests/check.sh")
        return 2
    parser = tree_sitter.Parser(tree_sitter.Language(tree_sitter_bicep.language()))

    files = files_from(argv)
    if not files:
        print("FAIL no .bicep files to check")
        return 1
    passed = failed = 0
    for path in files:
        source = path.read_bytes()
        problems = syntax_problems(parser, source) + hash_problems(source.decode("utf-8"))
        name = path.relative_to(INFRA.parent) if path.is_relative_to(INFRA.parent) else path
        if problems:
            failed += 1
            for line, column, message in sorted(problems):
                print(f"{name}:{line}:{column}: {message}")
        else:
            passed += 1
    print(f"bicep syntax: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
