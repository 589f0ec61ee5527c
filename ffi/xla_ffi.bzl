"""Bazel repository rule exposing the XLA FFI headers that ship with the installed jaxlib.

WORKSPACE (at the repository root):

    load("//:ffi/xla_ffi.bzl", "xla_ffi_headers")
    xla_ffi_headers(name = "xla_ffi")

It runs `python3 -c "import jax; print(jax.ffi.include_dir())"` (the interpreter is $PYTHON_BIN_PATH
if set, else python3 / python on PATH) and symlinks xla/ffi/api/{api,c_api,ffi}.h into
@xla_ffi//:xla_ffi, the same headers the CMake build uses. No network access is needed.
"""

_HEADERS = ["api.h", "c_api.h", "ffi.h"]

def _xla_ffi_headers_impl(rctx):
    python = rctx.os.environ.get("PYTHON_BIN_PATH") or rctx.which("python3") or rctx.which("python")
    if not python:
        fail("xla_ffi_headers: no Python interpreter found; set PYTHON_BIN_PATH to one with jax installed")
    res = rctx.execute([python, "-c", "import jax; print(jax.ffi.include_dir())"])
    if res.return_code != 0:
        fail("xla_ffi_headers: `import jax; jax.ffi.include_dir()` failed with %s:\n%s" % (python, res.stderr))
    include = res.stdout.strip()
    for h in _HEADERS:
        rctx.symlink(include + "/xla/ffi/api/" + h, "include/xla/ffi/api/" + h)
    rctx.file("BUILD.bazel", """
exports_files(glob(["include/xla/ffi/api/*.h"]))

cc_library(
    name = "xla_ffi",
    hdrs = glob(["include/xla/ffi/api/*.h"]),
    includes = ["include"],
    visibility = ["//visibility:public"],
)
""")

xla_ffi_headers = repository_rule(
    implementation = _xla_ffi_headers_impl,
    environ = ["PYTHON_BIN_PATH", "PATH"],
    local = True,
)
