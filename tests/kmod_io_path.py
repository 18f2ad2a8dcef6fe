#!/usr/bin/env python3
"""Static checks of the geom_hast kernel module that need no FreeBSD tree.

1. Nothing on the I/O path sleeps.  The roots are the GEOM start method,
   every bio done routine (`bio_done = fn`), the core's callbacks
   (`.hco_* = fn`) and the shim the core runs on (`hast_shim_*`); every
   static function of the file they reach (by direct calls) is on the path.
   None of them may call a function that sleeps or may sleep (msleep,
   biowait, g_read_data, copyin, sx locks, the topology lock, ...), use
   M_WAITOK, or call malloc/uma_zalloc without M_NOWAIT.
2. The portable core (hast_core.c) uses no kernel or libc call at all.
3. GEOM access counts are balanced: the literal deltas of every g_access()
   call in the file sum to zero for each of r, w and e.

Usage: kmod_io_path.py KMOD_DIR   (exit 0 clean, 1 with the findings)
"""

import re
import sys
from pathlib import Path

SLEEPS = {
    "msleep", "msleep_sbt", "tsleep", "tsleep_sbt", "_sleep", "pause",
    "pause_sbt", "biowait", "bwait", "g_waitfor_event", "g_read_data",
    "g_write_data", "g_io_flush", "sx_xlock", "sx_slock", "sx_xlock_sig",
    "sx_slock_sig", "cv_wait", "cv_wait_sig", "cv_timedwait",
    "cv_timedwait_sig", "copyin", "copyout", "uiomove", "g_topology_lock",
    "g_access", "kthread_add", "kproc_create", "vm_wait", "lockmgr",
}
ALLOCS = {"malloc", "uma_zalloc", "g_alloc_bio", "g_new_bio", "g_clone_bio"}
# Allocators that never sleep (g_new_bio, g_clone_bio use M_NOWAIT).
NOWAIT_ALLOCS = {"g_new_bio", "g_clone_bio"}
KEYWORDS = {"if", "while", "for", "switch", "return", "sizeof", "do",
            "__predict_false", "__predict_true", "__DECONST", "KASSERT",
            "MPASS", "nitems", "offsetof"}

DEF = re.compile(r"^([A-Za-z_]\w*)\(([^;{}]*?)\)\n\{\n(.*?)^\}", re.M | re.S)
CALL = re.compile(r"\b([A-Za-z_]\w*)\s*\(")


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"),
                  text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def functions(text):
    """name -> (body, line of the definition)."""
    out = {}
    for m in DEF.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        out[m.group(1)] = (m.group(3), line)
    return out


def call_args(body, start):
    """The argument text of the call whose '(' is at body[start]."""
    depth = 0
    for i in range(start, len(body)):
        c = body[i]
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return body[start + 1:i]
    return body[start + 1:]


def io_path_findings(glue):
    text = strip_comments(glue)
    funcs = functions(text)
    roots = set(re.findall(r"bio_done\s*=\s*([A-Za-z_]\w*)\s*;", text))
    roots |= set(re.findall(r"\.hco_\w+\s*=\s*([A-Za-z_]\w*)", text))
    roots |= set(re.findall(r"\.start\s*=\s*([A-Za-z_]\w*)", text))
    roots |= {f for f in funcs if f.startswith("hast_shim_")}
    missing = sorted(r for r in roots if r not in funcs)
    findings = [f"root {r} has no definition in the file" for r in missing]
    if not any(r in funcs for r in roots):
        findings.append("no I/O path roots found (start, bio_done, hco_*)")
    seen, stack, via = set(), sorted(r for r in roots if r in funcs), {}
    while stack:
        f = stack.pop()
        if f in seen:
            continue
        seen.add(f)
        body, _ = funcs[f]
        for m in CALL.finditer(body):
            callee = m.group(1)
            if callee in funcs and callee not in seen:
                via.setdefault(callee, f)
                stack.append(callee)
    for f in sorted(seen):
        body, line = funcs[f]
        chain = [f]
        while chain[-1] in via:
            chain.append(via[chain[-1]])
        where = f"{f} (line {line}, reached from {' <- '.join(chain)})"
        if "M_WAITOK" in body:
            findings.append(f"{where}: uses M_WAITOK")
        for m in CALL.finditer(body):
            callee = m.group(1)
            if callee in SLEEPS:
                findings.append(f"{where}: calls {callee}(), which may sleep")
            elif callee in ALLOCS and callee not in NOWAIT_ALLOCS:
                args = call_args(body, m.end() - 1)
                if callee == "g_alloc_bio" or "M_NOWAIT" not in args:
                    findings.append(
                        f"{where}: {callee}({args.strip()}) may sleep")
    return findings, seen


def core_findings(core):
    text = strip_comments(core)
    findings = []
    for inc in re.findall(r'^#\s*include\s*[<"]([^>"]+)[>"]', text, re.M):
        if inc not in ("hast_core.h", "hast_shim.h", "hast_abi.h"):
            findings.append(f"hast_core.c includes {inc}")
    calls = {m.group(1) for m in CALL.finditer(text)}
    for bad in sorted(calls & (SLEEPS | ALLOCS | {"printf", "memcpy",
                                                  "memset", "free"})):
        findings.append(f"hast_core.c calls {bad}()")
    return findings


def access_findings(glue):
    text = strip_comments(glue)
    sums = [0, 0, 0]
    calls = 0
    for m in re.finditer(r"\bg_access\s*\(\s*\w+\s*,\s*(-?\d+)\s*,\s*(-?\d+)"
                         r"\s*,\s*(-?\d+)\s*\)", text):
        calls += 1
        for i in range(3):
            sums[i] += int(m.group(i + 1))
    every = len(re.findall(r"\bg_access\s*\(", text))
    findings = []
    if every != calls:
        findings.append(f"{every - calls} g_access() call(s) with "
                        "non-literal counts: cannot check the balance")
    if calls == 0:
        findings.append("no g_access() call found")
    if sums != [0, 0, 0]:
        findings.append(f"g_access() deltas do not balance: r{sums[0]:+d} "
                        f"w{sums[1]:+d} e{sums[2]:+d}")
    return findings


def main(argv):
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    kmod = Path(argv[1])
    glue = (kmod / "g_hast.c").read_text()
    core = (kmod / "hast_core.c").read_text()
    io, reached = io_path_findings(glue)
    findings = io + core_findings(core) + access_findings(glue)
    for f in findings:
        print(f"kmod-io-path: {f}")
    if findings:
        return 1
    print(f"kmod-io-path: {len(reached)} functions on the I/O path, none "
          "sleeps; hast_core.c uses no OS call; g_access() balanced")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
