//! The readers' allocation bound, measured with a counting global allocator:
//! reading `n` bytes never raises the heap peak by more than `2 * n + 64 MiB`.
//! (One test in this binary so nothing else allocates concurrently.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use sdti::embedding::{read_embedding_bytes, ALLOC_SLACK_BYTES};

struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call forwards to the system allocator with the caller's layout; the
// counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: forwarded: the caller's layout is valid for alloc.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(l.size(), Ordering::SeqCst) + l.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: forwarded: `p` came from this allocator with layout `l`.
        unsafe { System.dealloc(p, l) };
        CURRENT.fetch_sub(l.size(), Ordering::SeqCst);
    }
}

#[global_allocator]
static A: Counting = Counting;

fn peak_of(bytes: &[u8]) -> usize {
    let base = CURRENT.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let r = read_embedding_bytes(bytes, "bound");
    let peak = PEAK.load(Ordering::SeqCst) - base;
    drop(r);
    peak
}

fn bound(len: usize) -> usize {
    2 * len + ALLOC_SLACK_BYTES as usize
}

#[test]
fn reading_stays_within_two_x_plus_64_mib() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/embeddings");
    let mut worst = 0usize;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let p = e.path();
        if !p.is_file() || p.extension().is_some_and(|x| x == "json") {
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        let peak = peak_of(&bytes);
        assert!(peak <= bound(bytes.len()), "{}: peak {peak}", p.display());
        worst = worst.max(peak);
    }
    // Real embeddings stay far below the slack.
    assert!(worst < 4 << 20, "worst fixture peak {worst}");

    // A PNG header declaring 30000 x 30000 RGBA (3.6 GB of pixels) with no text chunk.
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&30000u32.to_be_bytes());
    ihdr.extend_from_slice(&30000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 6, 0, 0, 0]);
    let mut crc = flate2::Crc::new();
    crc.update(&ihdr);
    png.extend_from_slice(&13u32.to_be_bytes());
    png.extend_from_slice(&ihdr);
    png.extend_from_slice(&crc.sum().to_be_bytes());
    png.extend_from_slice(&[0, 0, 0, 0]);
    png.extend_from_slice(b"IEND");
    png.extend_from_slice(&[0xAE, 0x42, 0x60, 0x82]);
    assert!(read_embedding_bytes(&png, "huge.png").is_err());
    let peak = peak_of(&png);
    assert!(peak <= bound(png.len()), "huge png: peak {peak}");

    // A pickle that builds a million small objects in a 2 MB file.
    let mut pkl = b"\x80\x02]".to_vec();
    for _ in 0..1_000_000 {
        pkl.extend_from_slice(b"}a");
    }
    pkl.push(b'.');
    let z = stored_zip(&[("a/data.pkl", &pkl)]);
    let peak = peak_of(&z);
    assert!(peak <= bound(z.len()), "object-flood pickle: peak {peak}");
    assert!(read_embedding_bytes(&z, "flood.pt").is_err());
}

fn stored_zip(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut cd = Vec::new();
    for (name, data) in members {
        let off = out.len() as u32;
        let mut crc = flate2::Crc::new();
        crc.update(data);
        for central in [false, true] {
            let h = if central { &mut cd } else { &mut out };
            h.extend_from_slice(
                &(if central { 0x0201_4b50u32 } else { 0x0403_4b50 }).to_le_bytes(),
            );
            if central {
                h.extend_from_slice(&20u16.to_le_bytes());
            }
            h.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            h.extend_from_slice(&crc.sum().to_le_bytes());
            h.extend_from_slice(&(data.len() as u32).to_le_bytes());
            h.extend_from_slice(&(data.len() as u32).to_le_bytes());
            h.extend_from_slice(&(name.len() as u16).to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes());
            if central {
                h.extend_from_slice(&[0u8; 10]);
                h.extend_from_slice(&off.to_le_bytes());
            }
            h.extend_from_slice(name.as_bytes());
            if !central {
                h.extend_from_slice(data);
            }
        }
    }
    let cd_off = out.len() as u32;
    out.extend_from_slice(&cd);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&(members.len() as u16).to_le_bytes());
    out.extend_from_slice(&(members.len() as u16).to_le_bytes());
    out.extend_from_slice(&(cd.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_off.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}
