"""The sandbox's seccomp filter, compiled to a BPF program for `bwrap --seccomp FD`.

libseccomp (`libseccomp2`, on every Debian/Ubuntu system: apt and systemd link it) builds the
program through its C API, called with ctypes. Why not hand-written BPF: libseccomp adds the
architecture check (syscalls through the i386 `int 0x80` ABI or the x32 bit would otherwise
dodge a table of x86_64 numbers; here they kill the process), resolves names per architecture
and stays current with new kernels. Why not Debian's `python3-seccomp`: it binds the *system*
interpreter only (the pipeline runs in a venv or another Python), and driving it from a
subprocess costs ~13 ms and a second Python per process for the same few C calls, which take
0.6 ms here.

Policy: allow by default, deny what an untrusted program never needs and what widens the kernel's
attack surface or reaches outside the run:
- new namespaces of any kind (`unshare`, `setns`, `clone` with a CLONE_NEW* flag; `clone3`
  returns ENOSYS so libc falls back to `clone`, whose flags can be inspected): no nested user
  namespace with full capabilities inside;
- mounts and the new mount API, `chroot`, `pivot_root`;
- `bpf`, `perf_event_open`, `userfaultfd`, `io_uring_*`, the keyring calls: large, often
  exploited kernel surfaces;
- `ptrace`, `process_vm_*`, `pidfd_getfd`, `kcmp`: reading or steering another process;
- sockets of any family but AF_UNIX (no raw, packet, netlink, AF_ALG, vsock ...; the run's
  network namespace has no route out anyway; multiprocessing and asyncio use AF_UNIX);
- the host-administration calls (modules, kexec, reboot, swap, clock, quota, handles ...), which
  need capabilities the sandbox never has: denied here too so a capability bug is not enough.
"""

from __future__ import annotations

import ctypes
import errno
import os
from functools import cache

_ALLOW = 0x7FFF0000


def _errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


_MASKED_EQ, _NE = 7, 1
_AF_UNIX = 1
_CLONE_NEW = {  # every namespace flag clone(2) accepts
    "CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000, "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}  # fmt: skip

DENIED = (
    "unshare", "setns",
    "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount", "fsopen", "fsconfig",
    "fsmount", "fspick", "mount_setattr",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "keyctl", "add_key", "request_key",
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot",
    "swapon", "swapoff", "acct", "syslog", "quotactl", "quotactl_fd", "name_to_handle_at",
    "open_by_handle_at", "lookup_dcookie", "vhangup", "settimeofday", "clock_settime", "clock_adjtime",
    "adjtimex", "iopl", "ioperm", "uselib", "fanotify_init", "nfsservctl",
)  # fmt: skip
"""Syscalls that fail with EPERM inside the sandbox (names this libseccomp does not know are skipped)."""


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


class SeccompUnavailable(RuntimeError):
    """libseccomp cannot be loaded or refused the filter."""


def _lib() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError as e:
        raise SeccompUnavailable(f"libseccomp.so.2 not found ({e}); install libseccomp2") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmp)]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


@cache
def bpf_program() -> bytes:
    """The compiled filter (struct sock_filter[]), built once per process for the native architecture."""
    lib = _lib()
    ctx = lib.seccomp_init(_ALLOW)
    if not ctx:
        raise SeccompUnavailable("seccomp_init failed")
    try:

        def rule(action: int, name: str, *cmps: tuple[int, int, int, int]) -> None:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr == -1:  # __NR_SCMP_ERROR: unknown to this libseccomp (an older one); nothing to deny
                return
            arr = (_ArgCmp * max(1, len(cmps)))(*[_ArgCmp(*c) for c in cmps])
            rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
            if rc < 0:
                raise SeccompUnavailable(f"seccomp_rule_add({name}) failed: {os.strerror(-rc)}")

        for name in DENIED:
            rule(_errno(errno.EPERM), name)
        rule(_errno(errno.ENOSYS), "clone3")  # its flags live in memory a filter cannot read
        for flag in _CLONE_NEW.values():
            rule(_errno(errno.EPERM), "clone", (0, _MASKED_EQ, flag, flag))
        for call in ("socket", "socketpair"):
            rule(_errno(errno.EAFNOSUPPORT), call, (0, _NE, _AF_UNIX, 0))
        fd = os.memfd_create("seccomp", os.MFD_CLOEXEC)
        try:
            rc = lib.seccomp_export_bpf(ctx, fd)
            if rc < 0:
                raise SeccompUnavailable(f"seccomp_export_bpf failed: {os.strerror(-rc)}")
            return os.pread(fd, os.fstat(fd).st_size, 0)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)
