//! No input makes the decoder allocate past the frame cap, however large the lengths it claims.
//!
//! This file is its own test binary with a counting global allocator, and holds one test, so no
//! other test's allocations are counted.

#![allow(clippy::unwrap_used)]
// tests may panic on what they did not expect

// A global allocator is the one place in the workspace that needs `unsafe`: it only forwards to
// `System` and records sizes.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use keyhole_protocol::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn largest_allocation_while(f: impl FnOnce()) -> usize {
    LARGEST.store(0, Ordering::SeqCst);
    f();
    LARGEST.load(Ordering::SeqCst)
}

fn decode_all(bytes: &[u8]) {
    let _ = peek(bytes, DEFAULT_MAX_FRAME);
    for enc in Encoding::ALL {
        let _ = decode::<Request>(enc, bytes);
        let _ = decode::<ProviderMessage>(enc, bytes);
        let _ = decode::<Hello>(enc, bytes);
        let _ = decode::<HelloReply>(enc, bytes);
    }
}

/// A bincode varint: 0xFD then a u64 little-endian.
fn varint_u64(n: u64) -> Vec<u8> {
    let mut v = vec![0xfd];
    v.extend_from_slice(&n.to_le_bytes());
    v
}

#[test]
fn claimed_lengths_never_allocate_past_the_cap() {
    let cap = DEFAULT_MAX_FRAME as usize;
    // Hand-made payloads whose length prefixes claim far more than they carry.
    let mut crafted: Vec<Vec<u8>> = Vec::new();
    for claim in [u64::MAX, 1 << 40, 1 << 30, (cap as u64) * 4, cap as u64] {
        // Request { id, timeout_ms, op: Resolve { name: <claim>... } }
        let mut p = vec![1, 1, 0];
        p.extend(varint_u64(claim));
        p.extend_from_slice(b"abc");
        crafted.push(p);
        // ProviderMessage::Response { id, outcome: Ok(Listed { entries: <claim> ... }) }
        let mut p = vec![0, 1, 0, 5];
        p.extend(varint_u64(claim));
        crafted.push(p);
        // Store with a claimed value length.
        let mut p = vec![1, 1, 1, 1, b'n'];
        p.extend(varint_u64(claim));
        crafted.push(p);
    }
    for p in &crafted {
        let largest = largest_allocation_while(|| decode_all(p));
        assert!(
            largest <= cap,
            "{largest} bytes allocated for a {}-byte payload",
            p.len()
        );
    }

    // And arbitrary bytes.
    let mut runner = TestRunner::new(Config::with_cases(2000));
    runner
        .run(&proptest::collection::vec(any::<u8>(), 0..4096), |bytes| {
            let largest = largest_allocation_while(|| decode_all(&bytes));
            prop_assert!(largest <= cap, "{largest} bytes allocated");
            Ok(())
        })
        .unwrap();
}
