#!/usr/bin/env python3
"""An independent decoder of tidemark objects, written from docs/format.md alone.

It shows the format is specified completely, and it is a recovery tool of last resort:
with the master key file and the repository, it needs nothing from tidemark.

  scripts/decode-object.py --self-test
  scripts/decode-object.py MASTER_KEY_FILE REPO_DIR CLUSTER NAME > out
      e.g. NAME = wal/00000001/000000010000000000000003

Requires the `cryptography` package (and `zstandard` for compressed objects).
"""
import json
import os
import struct
import sys

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from cryptography.hazmat.primitives import hmac


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    h = hmac.HMAC(salt if salt else b"\0" * 32, hashes.SHA256())
    h.update(ikm)
    return h.finalize()


def hkdf_expand(prk: bytes, info: bytes, n: int) -> bytes:
    return HKDFExpand(algorithm=hashes.SHA256(), length=n, info=info).derive(prk)


def field(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def unwrap_deks(master: bytes, repository_id: str, keyring: dict) -> dict:
    prk = hkdf_extract(b"", master)
    kek = hkdf_expand(prk, b"tidemark/v1/kek", 32)
    mid = hkdf_expand(prk, b"tidemark/v1/master-key-id", 8).hex()
    if mid != keyring["master_key_id"]:
        raise SystemExit(f"wrong master key: id {mid}, keyring wants {keyring['master_key_id']}")
    deks = {}
    for k in keyring["keys"]:
        kid = bytes.fromhex(k["id"])
        w = bytes.fromhex(k["wrapped"])
        aad = b"tidemark/v1/dek" + field(repository_id.encode()) + field(kid)
        deks[kid] = AESGCM(kek).decrypt(w[:12], w[12:], aad)
    return deks


def decode(obj: bytes, deks: dict, repository_id: str, name: str) -> bytes:
    header = obj[:60]
    if len(header) < 60 or header[:8] != b"TIDEMARK" or header[8] != 1 or header[11] != 0:
        raise SystemExit("not a version 1 tidemark object")
    compression, shift = header[9], header[10]
    if not 12 <= shift <= 24:
        raise SystemExit("chunk size out of range")
    dek = deks[header[12:28]]
    prk = hkdf_extract(header[28:60], dek)
    info = b"tidemark/v1/object" + field(repository_id.encode()) + field(name.encode()) + field(header)
    key = AESGCM(hkdf_expand(prk, info, 32))
    sealed = (1 << shift) + 16
    body, out, i, pos = obj[60:], [], 0, 0
    while True:
        chunk = body[pos:pos + sealed]
        last = pos + sealed >= len(body)
        nonce = b"\0" * 7 + struct.pack(">I", i) + (b"\x01" if last else b"\x00")
        out.append(key.decrypt(nonce, chunk, None))  # raises InvalidTag on any tampering
        pos += sealed
        i += 1
        if last:
            break
    payload = b"".join(out)
    if compression == 1:
        import zstandard
        return zstandard.ZstdDecompressor().decompressobj().decompress(payload)
    return payload


def self_test() -> None:
    # docs/format.md, "Test vector".
    obj = bytes.fromhex(
        "544944454d41524b01000c0022222222222222222222222222222222"
        "4444444444444444444444444444444444444444444444444444444444444444"
        "1807125ca66353336e137490bf041ecbb430bbc4f7a8f02945")
    got = decode(obj, {b"\x22" * 16: b"\x33" * 32}, "test-repo", "vector")
    assert got == b"tidemark\n", got
    print("test vector decodes: ok")


def main() -> None:
    if sys.argv[1:] == ["--self-test"]:
        return self_test()
    if len(sys.argv) != 5:
        raise SystemExit(__doc__)
    key_file, repo, cluster, name = sys.argv[1:]
    master = open(key_file, "rb").read()
    info = json.load(open(os.path.join(repo, cluster, "cluster.json")))
    keyring = json.load(open(os.path.join(repo, cluster, "keys", "keyring.json")))
    deks = unwrap_deks(master, info["repository_id"], keyring)
    obj = open(os.path.join(repo, cluster, name), "rb").read()
    sys.stdout.buffer.write(decode(obj, deks, info["repository_id"], name))


if __name__ == "__main__":
    main()
