//! circuit's kernel programs.
//!
//! - `outcomes`: tracepoints that classify every client TCP connection attempt on the node
//!   and send the outcome to the agent over a ring buffer.
//! - `enforce`: the XDP, TC and cgroup enforcement points, which make new connections to an
//!   isolated upstream fail at once; `verdict` is the decision they share, `packet` and
//!   `rst` the parsing and the reply.
//! - `services`: endpoints behind virtual addresses (NAT), found through conntrack, and
//!   connects re-routed around isolated ones.
//!
//! Every program fails open: anything it cannot parse or look up is passed untouched.
#![no_std]
#![no_main]
// The BPF target has no `AtomicU64::fetch_add` (atomic-cas is off); the intrinsic, with its
// result unused, lowers to BPF XADD, which every BPF ISA version has.
#![feature(core_intrinsics)]
#![allow(internal_features)]
// Inline assembly on BPF (one unaligned packet load, see packet.rs).
#![feature(asm_experimental_arch)]

mod enforce;
mod maps;
mod outcomes;
mod packet;
mod rst;
mod services;
mod verdict;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// bpf_probe_read_kernel (tracepoint field reads) is GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
