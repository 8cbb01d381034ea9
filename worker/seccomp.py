"""The seccomp filter of an unprivileged node app: system calls an app has no business
making are refused with EPERM, everything else is allowed.

Refused:
* new namespaces: unshare(2) and clone(2) with any CLONE_NEW* flag (above all
  CLONE_NEWUSER, the door to capabilities in a namespace of one's own), and setns(2).
  clone3(2) passes its flags in memory, which a filter cannot read: it is answered
  ENOSYS, so the C library falls back to clone(2) (glibc 2.34+ does, for threads,
  fork and posix_spawn), whose flags are a register;
* bpf, the kernel keyring (keyctl, add_key, request_key), ptrace and
  process_vm_readv/writev, userfaultfd, io_uring (its operations bypass this filter);
* kernel modules (init_module, finit_module, delete_module), kexec_load,
  kexec_file_load, reboot, swapon, swapoff;
* mounts: mount, umount2, pivot_root and the new mount API (open_tree, move_mount,
  fsopen, fsconfig, fsmount, fspick, mount_setattr).
Most of these need a capability the app does not have anyway; the filter keeps the
kernel code behind them out of its reach too (as Docker's default profile does for
containers). A call from another ABI (32-bit int 0x80, x32) is refused whole.

Classic BPF (struct sock_filter) for x86_64 and aarch64, built and installed here
through ctypes with prctl(PR_SET_NO_NEW_PRIVS) and prctl(PR_SET_SECCOMP,
SECCOMP_MODE_FILTER): on another machine `install` says so and installs nothing. The
filter is inherited by every child and survives execve; it cannot be removed.

Standalone like worker/launch.py (which loads it by path): the standard library only.
`python3 worker/seccomp.py` prints the program, one instruction a line.
"""
import ctypes
import os
import platform
import struct
import sys

# Classic BPF (linux/filter.h, linux/bpf_common.h).
BPF_LD_W_ABS = 0x00 | 0x00 | 0x20          # BPF_LD | BPF_W | BPF_ABS
BPF_JEQ_K = 0x05 | 0x10 | 0x00             # BPF_JMP | BPF_JEQ | BPF_K
BPF_JGE_K = 0x05 | 0x30 | 0x00
BPF_JSET_K = 0x05 | 0x40 | 0x00
BPF_RET_K = 0x06 | 0x00
# linux/seccomp.h
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_MODE_FILTER = 2
PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 22, 38
# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]
OFF_NR, OFF_ARCH, OFF_ARG0 = 0, 4, 16      # arg0's low 32 bits (both arches are little-endian)
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
X32_SYSCALL_BIT = 0x40000000
EPERM, ENOSYS = 1, 38
# Namespace flags (linux/sched.h). For clone the low byte is the exit signal, so
# CLONE_NEWTIME (0x80) only counts for unshare.
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x02000000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWTIME = 0x10000000, 0x20000000, 0x40000000, 0x80
CLONE_NS = CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET
UNSHARE_NS = CLONE_NS | CLONE_NEWTIME

REFUSED = ("setns", "bpf", "keyctl", "add_key", "request_key", "ptrace", "process_vm_readv",
           "process_vm_writev", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
           "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot",
           "swapon", "swapoff", "mount", "umount2", "pivot_root", "open_tree", "move_mount", "fsopen",
           "fsconfig", "fsmount", "fspick", "mount_setattr")
# System call numbers: x86_64 (asm/unistd_64.h) and the generic table aarch64 uses
# (asm-generic/unistd.h).
NUMBERS = {
    "x86_64": {"clone": 56, "clone3": 435, "unshare": 272, "setns": 308, "bpf": 321, "keyctl": 250,
               "add_key": 248, "request_key": 249, "ptrace": 101, "process_vm_readv": 310,
               "process_vm_writev": 311, "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426,
               "io_uring_register": 427, "init_module": 175, "finit_module": 313, "delete_module": 176,
               "kexec_load": 246, "kexec_file_load": 320, "reboot": 169, "swapon": 167, "swapoff": 168,
               "mount": 165, "umount2": 166, "pivot_root": 155, "open_tree": 428, "move_mount": 429,
               "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442},
    "aarch64": {"clone": 220, "clone3": 435, "unshare": 97, "setns": 268, "bpf": 280, "keyctl": 219,
                "add_key": 217, "request_key": 218, "ptrace": 117, "process_vm_readv": 270,
                "process_vm_writev": 271, "userfaultfd": 282, "io_uring_setup": 425, "io_uring_enter": 426,
                "io_uring_register": 427, "init_module": 105, "finit_module": 273, "delete_module": 106,
                "kexec_load": 104, "kexec_file_load": 294, "reboot": 142, "swapon": 224, "swapoff": 225,
                "mount": 40, "umount2": 39, "pivot_root": 41, "open_tree": 428, "move_mount": 429,
                "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442},
}


class SeccompError(OSError):
    pass


def machine() -> str:
    """This machine's name in NUMBERS' terms ('arm64' is aarch64)."""
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def _section(arch: str) -> list[tuple]:
    """The instructions for one architecture, with labels local to it."""
    nr = NUMBERS[arch]
    out = [("ld", OFF_NR)]
    if arch == "x86_64":
        out.append(("jge", X32_SYSCALL_BIT, f"{arch}.eperm", None))
    out += [("jeq", nr["clone3"], f"{arch}.enosys", None),
            ("jeq", nr["clone"], f"{arch}.clone", None),
            ("jeq", nr["unshare"], f"{arch}.unshare", None)]
    out += [("jeq", nr[name], f"{arch}.eperm", None) for name in REFUSED]
    out += [("ret", SECCOMP_RET_ALLOW),
            ("label", f"{arch}.clone"), ("ld", OFF_ARG0), ("jset", CLONE_NS, f"{arch}.eperm", None),
            ("ret", SECCOMP_RET_ALLOW),
            ("label", f"{arch}.unshare"), ("ld", OFF_ARG0), ("jset", UNSHARE_NS, f"{arch}.eperm", None),
            ("ret", SECCOMP_RET_ALLOW),
            ("label", f"{arch}.eperm"), ("ret", SECCOMP_RET_ERRNO | EPERM),
            ("label", f"{arch}.enosys"), ("ret", SECCOMP_RET_ERRNO | ENOSYS)]
    return out


def assemble(ops: list[tuple]) -> list[tuple[int, int, int, int]]:
    """Labelled instructions -> (code, jt, jf, k); a jump target None is the next one."""
    where, n = {}, 0
    for op in ops:
        if op[0] == "label":
            where[op[1]] = n
        else:
            n += 1
    out = []
    for op in ops:
        kind = op[0]
        if kind == "label":
            continue
        i = len(out)
        if kind == "ld":
            out.append((BPF_LD_W_ABS, 0, 0, op[1]))
        elif kind == "ret":
            out.append((BPF_RET_K, 0, 0, op[1]))
        else:
            code = {"jeq": BPF_JEQ_K, "jge": BPF_JGE_K, "jset": BPF_JSET_K}[kind]
            jt, jf = ((0 if t is None else where[t] - i - 1) for t in op[2:4])
            if not (0 <= jt <= 255 and 0 <= jf <= 255):
                raise ValueError(f"jump out of reach at instruction {i}")
            out.append((code, jt, jf, op[1]))
    return out


def program() -> list[tuple[int, int, int, int]]:
    """The filter: by the calling ABI's arch, that arch's section; any other arch
    (a 32-bit call of a 64-bit process) EPERM."""
    ops = [("ld", OFF_ARCH)]
    for arch in NUMBERS:
        ops.append(("jeq", AUDIT_ARCH[arch], arch, None))
    ops.append(("ret", SECCOMP_RET_ERRNO | EPERM))
    for arch in NUMBERS:
        ops += [("label", arch), *_section(arch)]
    return assemble(ops)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(log=None) -> bool:
    """no_new_privs, then the filter on this (single-threaded) process: everything it
    execs or forks from now on has it. -> True; False (said through `log`, stderr by
    default) on a machine the filter has no numbers for. SeccompError if the kernel
    refuses it."""
    if machine() not in NUMBERS:
        print(f"seccomp: no filter for {platform.machine()} (only {', '.join(NUMBERS)}): "
              f"this node app runs without one", file=log or sys.stderr, flush=True)
        return False
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        raise SeccompError(f"seccomp: {threads} threads; the filter would hold for one alone")
    insns = program()
    raw = b"".join(struct.pack("=HBBI", *insn) for insn in insns)
    buf = ctypes.create_string_buffer(raw, len(raw))
    prog = _SockFprog(len(insns), ctypes.cast(buf, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise SeccompError(err, f"seccomp: no_new_privs: {os.strerror(err)}")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise SeccompError(err, f"seccomp: installing the filter: {os.strerror(err)}")
    return True


def active() -> bool:
    """Whether this process runs under a seccomp filter (/proc/self/status Seccomp: 2)."""
    with open("/proc/self/status") as f:
        return any(line.split() == ["Seccomp:", "2"] for line in f)


if __name__ == "__main__":
    for i, (code, jt, jf, k) in enumerate(program()):
        print(f"{i:3d}  code=0x{code:02x} jt={jt:3d} jf={jf:3d} k=0x{k:08x}")
