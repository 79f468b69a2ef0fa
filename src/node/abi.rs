//! What the kernel ABI looks like on the targets hostvol builds for. The ioctl numbers, syscall
//! numbers and `repr(C)` structures of the quota backends and of the clone copy are written
//! for the kernel's generic ABI: the `asm-generic/ioctl.h` number encoding and `u64` aligned to 8
//! bytes. That holds on x86_64, aarch64 and 32-bit arm (EABI); each structure's size and offsets are
//! asserted next to it at compile time, per target. Any other target (i386 aligns `u64` to 4; powerpc,
//! mips and sparc encode ioctl numbers differently) would build a binary that hands the kernel wrong
//! numbers, so it does not build.

#[cfg(not(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "arm")
)))]
compile_error!(
    "hostvol's kernel ABI (btrfs ioctls, fsxattr, quotactl_fd, FICLONE) is checked for Linux on x86_64, aarch64 and arm only; check the structures in src/node/quota and src/node/clone.rs for this target, then add it to src/node/abi.rs"
);

// The generic layout: structures of u64 fields are the sizes the assertions next to them say.
const _: () = assert!(align_of::<u64>() == 8);

/// `_IOC(dir, type, nr, size)` of `asm-generic/ioctl.h`.
pub const fn ioc(dir: u32, kind: u8, nr: u8, size: usize) -> u32 {
    assert!(
        size < 1 << 14,
        "the size field of an ioctl number has 14 bits"
    );
    (dir << 30) | ((size as u32) << 16) | ((kind as u32) << 8) | nr as u32
}
pub const IOC_WRITE: u32 = 1;
pub const IOC_READ: u32 = 2;

/// `_IOW(kind, nr, T)`.
pub const fn iow(kind: u8, nr: u8, size: usize) -> u32 {
    ioc(IOC_WRITE, kind, nr, size)
}

/// `_IOR(kind, nr, T)`.
pub const fn ior(kind: u8, nr: u8, size: usize) -> u32 {
    ioc(IOC_READ, kind, nr, size)
}

/// `_IOWR(kind, nr, T)`.
pub const fn iowr(kind: u8, nr: u8, size: usize) -> u32 {
    ioc(IOC_READ | IOC_WRITE, kind, nr, size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_as_the_kernel_headers_do() {
        // Values from <linux/fs.h> and <linux/btrfs.h> as the kernel's own headers expand them.
        assert_eq!(iow(0x94, 9, 4), 0x4004_9409); // FICLONE
        assert_eq!(ior(b'X', 31, 28), 0x801c_581f); // FS_IOC_FSGETXATTR
        assert_eq!(iowr(0x94, 17, 4096), 0xd000_9411); // BTRFS_IOC_TREE_SEARCH
    }
}
