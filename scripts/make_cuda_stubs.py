#!/usr/bin/env python3
"""Make a PyPI (CUDA) torch wheel importable on a CPU-only host without the
multi-GB nvidia-* wheels, by writing tiny stub shared libraries for every CUDA
library that torch/lib/*.so needs but the dynamic loader cannot find.

Each stub has the right SONAME, the symbol-version nodes the torch libraries
ask for (e.g. "libcublas.so.13", "NVSHMEM"), and every symbol torch imports
from it, defined as a function returning 100 (an error code, like
cudaErrorNoDevice). Nothing in them is meant to be called: torch then reports
torch.cuda.is_available() == False and runs on the CPU.

Usage: python make_cuda_stubs.py <site-packages>/torch/lib
Needs: gcc, binutils (nm, readelf), ldd. Writes lib*.so.N into that dir
(torch's RPATH contains $ORIGIN, so they are found there).
"""
import collections
import os
import re
import subprocess
import sys
import tempfile

libdir = os.path.abspath(sys.argv[1])
libs = [os.path.join(libdir, f) for f in sorted(os.listdir(libdir))
        if ".so" in f and os.path.isfile(os.path.join(libdir, f))]


def run(*cmd):
    return subprocess.run(cmd, check=False, capture_output=True, text=True).stdout


missing, resolved = set(), set()
for lib in libs:
    for m in re.finditer(r"^\s*(\S+) => (\S+)", run("ldd", lib), re.MULTILINE):
        if m.group(2) == "not":
            missing.add(m.group(1))
        else:
            resolved.add(m.group(2))
if not missing:
    print("nothing missing")
    sys.exit(0)
print("missing:", " ".join(sorted(missing)))

# version nodes each torch lib requires from each missing file
file_versions = collections.defaultdict(set)
for lib in libs:
    cur = None
    for line in run("readelf", "-V", lib).splitlines():
        m = re.search(r"File: (\S+)", line)
        if m:
            cur = m.group(1)
            continue
        m = re.search(r"Name: (\S+)", line)
        if m and cur in missing:
            file_versions[cur].add(m.group(1))
ver_to_file = {v: f for f, vs in file_versions.items() for v in vs}

# symbols defined by everything that does resolve (torch libs + resolved deps)
defined = set()
for lib in libs + sorted(resolved):
    for line in run("nm", "-D", "--defined-only", lib).splitlines():
        defined.add(line.split()[-1].split("@")[0])

# undefined symbols of torch libs -> (stub file, version node)
by_file = collections.defaultdict(lambda: collections.defaultdict(set))
prefix_to_file = [  # unversioned imports: attach by name prefix
    ("cusparseLt", "libcusparseLt.so.0"), ("nccl", "libnccl.so.2"),
    ("cuFile", "libcufile.so.0"), ("curand", "libcurand.so.10"),
    ("nvshmem", "libnvshmem_host.so.3"), ("cudnn", "libcudnn.so.9"),
    ("cublasLt", "libcublasLt.so.13"), ("cublas", "libcublas.so.13"),
    ("cusolver", "libcusolver.so.12"), ("cusparse", "libcusparse.so.12"),
    ("cufft", "libcufft.so.12"), ("nvrtc", "libnvrtc.so.13"), ("cu", "libcuda.so.1"),
]
for lib in libs:
    for line in run("nm", "-D", "--undefined-only", lib).splitlines():
        tok = line.split()[-1]
        name, _, ver = tok.partition("@")
        ver = ver.lstrip("@")
        if ver:
            if ver in ver_to_file:
                by_file[ver_to_file[ver]][ver].add(name)
        elif name not in defined:
            for p, f in prefix_to_file:
                if name.startswith(p) and f in missing:
                    node = min(file_versions.get(f, {f}))
                    by_file[f][node].add(name)
                    break

tmp = tempfile.mkdtemp()
for so in sorted(missing):
    base = re.sub(r"[^A-Za-z0-9]", "_", so)
    c, v = os.path.join(tmp, base + ".c"), os.path.join(tmp, base + ".map")
    nodes = by_file.get(so, {})
    allv = sorted(set(nodes) | file_versions.get(so, set())) or [so]
    allsyms = sorted({n for s in nodes.values() for n in s})
    with open(c, "w") as f:
        f.writelines(f"int {n}(void) {{ return 100; }}\n" for n in allsyms)
        f.write(f"int __stub_{base}(void) {{ return 0; }}\n")
    with open(v, "w") as f:
        for i, ver in enumerate(allv):
            body = "".join(f"  {n};\n" for n in sorted(nodes.get(ver, ())))
            if i == 0:
                body += f"  __stub_{base};\n"
            f.write(f"{ver} {{\n global:\n{body}}};\n")
    out = os.path.join(libdir, so)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", out, c, f"-Wl,-soname,{so}",
                    f"-Wl,--version-script={v}"], check=True)
    print(f"wrote {out}: {len(allsyms)} symbols, version nodes {allv}")
