use super::*;
use crate::pipeline::keys::MasterKey;
use proptest::prelude::*;

fn ring() -> Keyring {
    Keyring::create(&MasterKey::from_bytes(&[9u8; 32]), "repo-1")
        .unwrap()
        .0
}

fn ctx(name: &str) -> ObjectContext<'_> {
    ObjectContext {
        repository_id: "repo-1",
        name,
    }
}

fn enc(ring: &Keyring, data: &[u8], opts: EncodeOptions, name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let stats = encode(data, ring.current(), &ctx(name), &opts, |b| {
        out.extend_from_slice(&b);
        Ok(())
    })
    .unwrap();
    assert_eq!(stats.original_bytes, data.len() as u64);
    assert_eq!(stats.stored_bytes, out.len() as u64);
    out
}

fn dec(ring: &Keyring, obj: &[u8], name: &str) -> Result<Vec<u8>, PipelineError> {
    let mut out = Vec::new();
    decode(obj, ring, &ctx(name), true, &mut out).map(|_| out)
}

fn small_chunks(zstd: bool) -> EncodeOptions {
    EncodeOptions {
        zstd_level: zstd.then_some(1),
        chunk_shift: MIN_CHUNK_SHIFT,
        sha256: true,
        zstd_workers: 0,
    }
}

fn data(len: usize, seed: u64) -> Vec<u8> {
    // Half-compressible pseudo-random bytes.
    let mut x = seed | 1;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if i % 3 == 0 { 0 } else { x as u8 }
        })
        .collect()
}

fn is_integrity(e: &PipelineError) -> bool {
    matches!(e, PipelineError::Crypt(CryptError::Integrity { .. }))
}

#[test]
fn round_trip_boundaries() {
    let r = ring();
    let cs = 1 << MIN_CHUNK_SHIFT;
    for zstd in [false, true] {
        for len in [0, 1, cs - 1, cs, cs + 1, 2 * cs, 3 * cs + 7, 5 << 20] {
            let d = data(len, len as u64 + 1);
            let obj = enc(&r, &d, small_chunks(zstd), "n");
            assert_eq!(dec(&r, &obj, "n").unwrap(), d, "len {len} zstd {zstd}");
        }
    }
    // Uncompressed: exact size = header + payload + one tag per chunk.
    let obj = enc(&r, &data(2 * cs, 5), small_chunks(false), "n");
    assert_eq!(obj.len(), HEADER_LEN + 2 * cs + 2 * TAG_LEN);
    let obj = enc(&r, &[], small_chunks(false), "n");
    assert_eq!(obj.len(), HEADER_LEN + TAG_LEN);
}

#[test]
fn sha256_matches() {
    let r = ring();
    let d = data(100_000, 3);
    let mut out = Vec::new();
    let opts = EncodeOptions {
        sha256: true,
        ..Default::default()
    };
    let s = encode(&d[..], r.current(), &ctx("x"), &opts, |b| {
        out.extend_from_slice(&b);
        Ok(())
    })
    .unwrap();
    let expect = digest::digest(&digest::SHA256, &d);
    assert_eq!(&s.sha256.unwrap()[..], expect.as_ref());
    let ds = decode(&out[..], &r, &ctx("x"), true, io::sink()).unwrap();
    assert_eq!(&ds.sha256.unwrap()[..], expect.as_ref());
    assert_eq!(ds.original_bytes, 100_000);
    assert_eq!(ds.stored_bytes, out.len() as u64);
}

#[test]
fn every_bit_flip_is_detected() {
    let r = ring();
    let d = data(3 * 4096 + 100, 11);
    let obj = enc(&r, &d, small_chunks(false), "n");
    // Every byte position, one bit each (the object is small enough to be exhaustive).
    for i in 0..obj.len() {
        let mut t = obj.clone();
        t[i] ^= 1 << (i % 8);
        let e = dec(&r, &t, "n").expect_err(&format!("flip at {i} not detected"));
        assert!(
            matches!(e, PipelineError::Crypt(_)),
            "flip at {i} gave {e:?}"
        );
    }
}

#[test]
fn truncation_at_every_length_is_detected() {
    let r = ring();
    let d = data(2 * 4096 + 10, 12);
    let obj = enc(&r, &d, small_chunks(false), "n");
    for len in 0..obj.len() {
        let e = dec(&r, &obj[..len], "n").expect_err(&format!("truncation to {len}"));
        assert!(is_integrity(&e), "len {len}: {e:?}");
    }
    // Truncation exactly at a chunk boundary (the remaining chunks are all valid).
    let sealed = 4096 + TAG_LEN;
    assert!(is_integrity(
        &dec(&r, &obj[..HEADER_LEN + 2 * sealed], "n").unwrap_err()
    ));
}

#[test]
fn trailing_bytes_are_detected() {
    let r = ring();
    for len in [0, 10, 4096] {
        let mut obj = enc(&r, &data(len, 13), small_chunks(false), "n");
        obj.push(0);
        assert!(is_integrity(&dec(&r, &obj, "n").unwrap_err()), "len {len}");
        // A whole extra copy of the last chunk appended.
        let mut obj2 = enc(&r, &data(len, 13), small_chunks(false), "n");
        let tail = obj2[obj2.len() - TAG_LEN..].to_vec();
        obj2.extend_from_slice(&tail);
        assert!(dec(&r, &obj2, "n").is_err(), "len {len}");
    }
}

#[test]
fn reordered_and_spliced_chunks_are_detected() {
    let r = ring();
    let d = data(3 * 4096, 14);
    let obj = enc(&r, &d, small_chunks(false), "n");
    let sealed = 4096 + TAG_LEN;
    let chunk =
        |o: &[u8], i: usize| o[HEADER_LEN + i * sealed..HEADER_LEN + (i + 1) * sealed].to_vec();
    // Swap chunks 0 and 1.
    let mut swapped = obj[..HEADER_LEN].to_vec();
    swapped.extend(chunk(&obj, 1));
    swapped.extend(chunk(&obj, 0));
    swapped.extend(chunk(&obj, 2));
    assert!(is_integrity(&dec(&r, &swapped, "n").unwrap_err()));
    // Drop a middle chunk.
    let mut dropped = obj[..HEADER_LEN].to_vec();
    dropped.extend(chunk(&obj, 0));
    dropped.extend(chunk(&obj, 2));
    assert!(is_integrity(&dec(&r, &dropped, "n").unwrap_err()));
    // Splice a chunk from another object under the same key and name.
    let other = enc(&r, &data(3 * 4096, 15), small_chunks(false), "n");
    let mut spliced = obj[..HEADER_LEN].to_vec();
    spliced.extend(chunk(&obj, 0));
    spliced.extend(chunk(&other, 1));
    spliced.extend(chunk(&obj, 2));
    assert!(is_integrity(&dec(&r, &spliced, "n").unwrap_err()));
}

#[test]
fn object_is_bound_to_name_and_repository() {
    let r = ring();
    let obj = enc(&r, b"hello", small_chunks(true), "wal/00000001/A");
    assert!(is_integrity(&dec(&r, &obj, "wal/00000001/B").unwrap_err()));
    let mut out = Vec::new();
    let other_repo = ObjectContext {
        repository_id: "repo-2",
        name: "wal/00000001/A",
    };
    assert!(is_integrity(
        &decode(&obj[..], &r, &other_repo, false, &mut out).unwrap_err()
    ));
}

#[test]
fn unknown_data_key_is_named() {
    let r = ring();
    let other = Keyring::create(&MasterKey::from_bytes(&[9u8; 32]), "repo-1")
        .unwrap()
        .0;
    let obj = enc(&other, b"x", small_chunks(true), "n");
    match dec(&r, &obj, "n").unwrap_err() {
        PipelineError::Crypt(CryptError::UnknownKey { key_id, .. }) => {
            assert_eq!(key_id, hex::encode(other.current().id()))
        }
        e => panic!("unexpected {e:?}"),
    }
}

#[test]
fn header_fields_are_validated() {
    let r = ring();
    let obj = enc(&r, b"abc", small_chunks(true), "n");
    let mut bad_magic = obj.clone();
    bad_magic[0] = b'X';
    assert!(
        dec(&r, &bad_magic, "n")
            .unwrap_err()
            .to_string()
            .contains("magic")
    );
    let mut bad_version = obj.clone();
    bad_version[8] = 2;
    assert!(
        dec(&r, &bad_version, "n")
            .unwrap_err()
            .to_string()
            .contains("version 2")
    );
    let mut huge_chunks = obj.clone();
    huge_chunks[10] = 40;
    assert!(dec(&r, &huge_chunks, "n").is_err());
}

#[test]
fn fixed_test_vector_decodes() {
    // docs/format.md, "Test vector": master key 32×0x01, repository id "test-repo",
    // object name "vector", payload "tidemark\n" uncompressed, 4 KiB chunks. Its data key is
    // fixed here instead of unwrapped (the keyring path is tested separately).
    let dek = DataKey::from_parts([0x22; 16], [0x33; 32]);
    let ring = Keyring::from_keys_for_tests(dek);
    let header = ObjectHeader {
        compression: Compression::None,
        chunk_shift: 12,
        key_id: [0x22; 16],
        salt: [0x44; 32],
    };
    let hb = header.to_bytes();
    let c = ObjectContext {
        repository_id: "test-repo",
        name: "vector",
    };
    let key = object_key(ring.current(), &hb, &c).unwrap();
    let mut payload = b"tidemark\n".to_vec();
    let tag = key
        .seal_in_place_separate_tag(chunk_nonce(0, true), Aad::empty(), &mut payload)
        .unwrap();
    let mut obj = hb.to_vec();
    obj.extend_from_slice(&payload);
    obj.extend_from_slice(tag.as_ref());
    assert_eq!(
        hex::encode(&obj),
        VECTOR_HEX,
        "format changed: update docs/format.md"
    );
    let mut out = Vec::new();
    decode(&obj[..], &ring, &c, false, &mut out).unwrap();
    assert_eq!(out, b"tidemark\n");
}

pub(crate) const VECTOR_HEX: &str = "544944454d41524b01000c0022222222222222222222222222222222444444444444444444444444444444444444444444444444444444444444444418071\
     25ca66353336e137490bf041ecbb430bbc4f7a8f02945";

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn prop_round_trip(len in 0usize..40_000, seed in any::<u64>(), zstd in any::<bool>(), shift in 12u8..15) {
        let r = ring();
        let d = data(len, seed);
        let opts = EncodeOptions { zstd_level: zstd.then_some(3), chunk_shift: shift, ..Default::default() };
        let obj = enc(&r, &d, opts, "p");
        prop_assert_eq!(dec(&r, &obj, "p").unwrap(), d);
    }

    #[test]
    fn prop_any_single_byte_change_fails(len in 0usize..20_000, seed in any::<u64>(), pos in any::<prop::sample::Index>(), delta in 1u8..=255) {
        let r = ring();
        let mut obj = enc(&r, &data(len, seed), small_chunks(true), "p");
        let i = pos.index(obj.len());
        obj[i] = obj[i].wrapping_add(delta);
        prop_assert!(dec(&r, &obj, "p").is_err());
    }
}
