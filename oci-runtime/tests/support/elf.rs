//! A small fake Linux executable for tests of agent binaries: a 64-bit little-endian ELF
//! header for a platform other than the host's (aarch64, or x86_64 on an aarch64 host), then
//! `code`. Self-contained (std only), so test crates of other packages can include it with
//! `#[path]`.

pub fn foreign_elf(code: &str) -> Vec<u8> {
    // e_machine: EM_X86_64 on an aarch64 host, EM_AARCH64 elsewhere.
    let machine: u16 = if std::env::consts::ARCH == "aarch64" { 62 } else { 183 };
    let mut elf = vec![0u8; 64];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // 64-bit
    elf[5] = 1; // little-endian
    elf[6] = 1; // version
    elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // an executable
    elf[18..20].copy_from_slice(&machine.to_le_bytes());
    elf.extend_from_slice(code.as_bytes());
    elf
}
