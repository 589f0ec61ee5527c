"""Offline stand-in for @rules_cc with Bazel 4: forwards to the native C++ rules."""
def cc_binary(**kwargs):
    native.cc_binary(**kwargs)
def cc_import(**kwargs):
    native.cc_import(**kwargs)
def cc_library(**kwargs):
    native.cc_library(**kwargs)
def cc_test(**kwargs):
    native.cc_test(**kwargs)
def cc_toolchain(**kwargs):
    native.cc_toolchain(**kwargs)
def cc_toolchain_suite(**kwargs):
    native.cc_toolchain_suite(**kwargs)
def objc_library(**kwargs):
    native.objc_library(**kwargs)
def objc_import(**kwargs):
    native.objc_import(**kwargs)
