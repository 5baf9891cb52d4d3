//! HC1: `"HC1:"` + Base45(zlib(COSE_Sign1)).

use std::cell::RefCell;
use std::io::{Read, Write};

use flate2::read::ZlibDecoder;
use flate2::write::ZlibEncoder;
use flate2::{Compress, Compression, FlushCompress, Status};

use super::CoseError;

/// The context identifier of version 1 health certificates.
pub const PREFIX: &str = "HC1:";

/// Largest inflated size accepted when decoding (a QR code holds < 3 KiB; this bounds a zlib bomb).
const MAX_INFLATED: u64 = 64 * 1024;

/// The deflate level. A COSE_Sign1 of a DCC hardly compresses (the official test vectors: 390
/// bytes on average, 388.7 at level 9 and 389.0 at level 1), and level 1 (zlib-rs' "quick"
/// strategy) costs a third of level 9 per certificate (5 µs against 17 µs, and 14.5 µs with
/// miniz_oxide). Any level is valid zlib; decoders do not care.
const LEVEL: Compression = Compression::new(1);

thread_local! {
    /// One deflate state per thread, reset between certificates: building a fresh one allocates
    /// and zeroes the hash tables, which was the largest CPU cost of encoding.
    static DEFLATE: RefCell<Compress> = RefCell::new(Compress::new(LEVEL, true));
}

/// zlib (level 1: header `78 01`) of `data`, with this thread's reused deflate state.
pub fn zlib(data: &[u8]) -> Vec<u8> {
    DEFLATE.with(|d| {
        let mut d = d.borrow_mut();
        d.reset();
        // Deflate's worst case is a few bytes per 16 KiB block over the input, plus the header.
        let mut out = Vec::with_capacity(data.len() + data.len() / 1000 + 64);
        loop {
            let consumed = d.total_in() as usize;
            match d.compress_vec(&data[consumed..], &mut out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) => return out,
                // Out of room (or no progress possible without it): grow and go on.
                Ok(_) => out.reserve(out.capacity().max(64)),
                Err(_) => {
                    // Only a misuse of the stream could fail here; start from a fresh state.
                    *d = Compress::new(LEVEL, true);
                    let mut z = ZlibEncoder::new(Vec::new(), LEVEL);
                    let _ = z.write_all(data);
                    return z.finish().unwrap_or_default();
                }
            }
        }
    })
}

/// Compresses (zlib level 1, header `78 01`) — always, even if it grows — then
/// Base45-encodes and prefixes.
pub fn encode(cose: &[u8]) -> String {
    let compressed = zlib(cose);
    let mut out = String::with_capacity(PREFIX.len() + base45_len(compressed.len()));
    out.push_str(PREFIX);
    base45_into(&compressed, &mut out);
    out
}

/// The Base45 alphabet (RFC 9285 §4).
const BASE45: &[u8; 45] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:";

/// Length of the Base45 text of `n` bytes: three characters per pair, two for a last single byte.
fn base45_len(n: usize) -> usize {
    n / 2 * 3 + n % 2 * 2
}

/// Appends the Base45 text (RFC 9285) of `data` to `out`, which [`encode`] sized exactly.
///
/// Written here rather than with `base45::encode` (3.2.0), which reserves half the room its
/// output needs, so grows its buffer twice per certificate (with glibc, each growth past 1 KiB
/// consolidates the allocator's free lists), and returns a second string to copy. Tested
/// against that crate; decoding still uses it.
fn base45_into(data: &[u8], out: &mut String) {
    let digit = |i: u32| char::from(BASE45[i as usize]);
    let pairs = data.chunks_exact(2);
    let last = pairs.remainder();
    for pair in pairs {
        let n = u32::from(pair[0]) << 8 | u32::from(pair[1]);
        out.push(digit(n % 45));
        out.push(digit(n / 45 % 45));
        out.push(digit(n / 2025));
    }
    if let [a] = *last {
        let n = u32::from(a);
        out.push(digit(n % 45));
        out.push(digit(n / 45));
    }
}

/// Removes the prefix and the Base45 encoding.
pub fn unprefix_base45(hc1: &str) -> Result<Vec<u8>, CoseError> {
    let b45 = hc1.strip_prefix(PREFIX).ok_or(CoseError::Prefix)?;
    base45::decode(b45).map_err(|e| CoseError::Base45(format!("{e:?}")))
}

/// Inflates a zlib stream (bounded).
pub fn inflate(compressed: &[u8]) -> Result<Vec<u8>, CoseError> {
    let mut out = Vec::with_capacity(compressed.len() * 2);
    ZlibDecoder::new(compressed)
        .take(MAX_INFLATED + 1)
        .read_to_end(&mut out)
        .map_err(|e| CoseError::Zlib(e.to_string()))?;
    if out.len() as u64 > MAX_INFLATED {
        return Err(CoseError::Zlib(format!(
            "inflates to more than {MAX_INFLATED} bytes"
        )));
    }
    Ok(out)
}

/// Strips the prefix, decodes Base45 and inflates: the COSE bytes.
pub fn decode(hc1: &str) -> Result<Vec<u8>, CoseError> {
    inflate(&unprefix_base45(hc1)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc9285_examples() {
        assert_eq!(base45::encode("AB"), "BB8");
        assert_eq!(base45::encode("Hello!!"), "%69 VD92EX0");
        assert_eq!(base45::encode("base-45"), "UJCLQE7W581");
        assert_eq!(base45::decode("QED8WEX0").unwrap(), b"ietf!");
        // Not Base45: a character outside the alphabet, and a dangling single character.
        assert!(base45::decode("GGW").is_err());
        assert!(base45::decode("a").is_err());
    }

    #[test]
    fn base45_is_the_crates_for_every_length_and_byte() {
        let b45 = |d: &[u8]| {
            let mut s = String::with_capacity(base45_len(d.len()));
            base45_into(d, &mut s);
            assert_eq!(s.len(), base45_len(d.len()));
            assert!(s.capacity() >= s.len());
            s
        };
        assert_eq!(b45(b"AB"), "BB8");
        assert_eq!(b45(b"Hello!!"), "%69 VD92EX0");
        assert_eq!(b45(b"base-45"), "UJCLQE7W581");
        assert_eq!(b45(b"ietf!"), "QED8WEX0");
        assert_eq!(b45(b""), "");
        // Every pair of bytes, then pseudo-random data of every length up to 700 bytes.
        let all: Vec<u8> = (0..=u16::MAX).flat_map(u16::to_be_bytes).collect();
        assert_eq!(b45(&all), base45::encode(&all));
        let mut x: u32 = 7;
        let noise: Vec<u8> = (0..700)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                (x >> 16) as u8
            })
            .collect();
        for n in 0..=noise.len() {
            let text = b45(&noise[..n]);
            assert_eq!(text, base45::encode(&noise[..n]), "{n} bytes");
            assert_eq!(base45::decode(&text).unwrap(), &noise[..n]);
        }
        for byte in 0..=255u8 {
            assert_eq!(b45(&[byte]), base45::encode([byte]));
        }
    }

    #[test]
    fn round_trip_and_level_1_header() {
        let data = b"\xd2\x84some cose bytes that compress some cose bytes".to_vec();
        let hc1 = encode(&data);
        assert!(hc1.starts_with("HC1:"));
        assert_eq!(hc1.capacity(), hc1.len(), "sized exactly, never grown");
        let z = unprefix_base45(&hc1).unwrap();
        assert_eq!(&z[..2], &[0x78, 0x01]);
        assert_eq!(decode(&hc1).unwrap(), data);
        assert_eq!(decode("HC2:ABC"), Err(CoseError::Prefix));
        assert!(matches!(decode("HC1:BB8"), Err(CoseError::Zlib(_))));
    }

    #[test]
    fn reused_deflate_state_gives_the_bytes_of_a_fresh_state() {
        // Compressible, empty, and incompressible data larger than the first output buffer.
        let mut noise = vec![0u8; 100_000];
        let mut x: u32 = 1;
        for b in noise.iter_mut() {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            *b = (x >> 16) as u8;
        }
        let inputs: [&[u8]; 4] = [b"abcabcabcabcabc hello hello", b"", &noise, b"x"];
        // What a thread's first use gives (a new thread has a new state), one thread per input.
        let fresh: Vec<Vec<u8>> = inputs
            .iter()
            .map(|d| {
                let d = d.to_vec();
                std::thread::spawn(move || zlib(&d)).join().unwrap()
            })
            .collect();
        // One state, used in both orders and twice: the same bytes every time (a replay rebuilds
        // the same HC1 on any thread), and they inflate back.
        for round in 0..4 {
            for i in 0..inputs.len() {
                let i = if round % 2 == 0 {
                    i
                } else {
                    inputs.len() - 1 - i
                };
                let z = zlib(inputs[i]);
                assert_eq!(z, fresh[i], "input of {} bytes", inputs[i].len());
                assert_eq!(&z[..2], &[0x78, 0x01]);
                let mut back = Vec::new();
                ZlibDecoder::new(&z[..]).read_to_end(&mut back).unwrap();
                assert_eq!(back, inputs[i]);
            }
        }
        // And they are what the streaming encoder gives, for inputs that fit the first buffer.
        for d in [inputs[0], inputs[1], inputs[3]] {
            let mut z = ZlibEncoder::new(Vec::new(), LEVEL);
            z.write_all(d).unwrap();
            assert_eq!(zlib(d), z.finish().unwrap());
        }
    }
}
