#!/usr/bin/env python3
"""The longest Rust functions and the deepest brace nesting under src/ (a rough measure
for refactoring: strings, chars and comments are skipped, not parsed).

    python3 scripts/longest-functions.py [N]
"""
import os
import re
import sys

FN = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+\"C\"\s+)?fn\s+(\w+)")


def strip(line, state):
    """The line without comments, strings and chars; state carries block comments."""
    out, i = [], 0
    while i < len(line):
        if state["block"]:
            j = line.find("*/", i)
            if j < 0:
                return "".join(out)
            state["block"], i = False, j + 2
            continue
        c = line[i]
        if line.startswith("//", i):
            break
        if line.startswith("/*", i):
            state["block"], i = True, i + 2
            continue
        if c == '"':
            j = i + 1
            while j < len(line) and line[j] != '"':
                j += 2 if line[j] == "\\" else 1
            i = j + 1
            continue
        if c == "'" and re.match(r"'(\\.|[^\\'])'", line[i:]):
            i += len(re.match(r"'(\\.|[^\\'])'", line[i:]).group(0))
            continue
        out.append(c)
        i += 1
    return "".join(out)


def scan(path):
    fns, stack, depth, deepest = [], [], 0, (0, "", 0)
    state = {"block": False}
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            m = FN.match(raw)
            line = strip(raw, state)
            if m and "{" in line:
                stack.append((m.group(7), n, depth))
            for c in line:
                if c == "{":
                    depth += 1
                    if stack and depth - stack[-1][2] > deepest[0]:
                        deepest = (depth - stack[-1][2], f"{path}:{n}", n)
                elif c == "}":
                    depth -= 1
                    if stack and depth == stack[-1][2]:
                        name, start, _ = stack.pop()
                        fns.append((n - start + 1, name, f"{path}:{start}"))
    return fns, deepest


def main():
    top = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    fns, deepest = [], (0, "", 0)
    for root, _, files in os.walk("src"):
        for name in files:
            if name.endswith(".rs"):
                f, d = scan(os.path.join(root, name))
                fns += f
                deepest = max(deepest, d)
    for lines, name, where in sorted(fns, reverse=True)[:top]:
        print(f"{lines:5}  {name:40} {where}")
    print(f"deepest nesting inside a function: {deepest[0]} levels at {deepest[1]}")


if __name__ == "__main__":
    main()
