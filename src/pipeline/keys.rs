//! Key material: the cluster's master key (KEK) and the data keys (DEKs) it wraps.
//!
//! Envelope encryption: objects are encrypted with a DEK (through a per-object key derived from
//! it, see `crypt`); the master key only ever encrypts DEKs. Rotating the master key therefore
//! rewrites the small keyring object and no data object, and deleting the master key makes every
//! DEK — hence every object — unreadable (crypto-shredding).
//!
//! Contracts:
//! - Key bytes live in `Zeroizing` buffers and are wiped when dropped.
//! - No type here implements `Display`, and `Debug` prints only key *ids*, never key bytes, so a
//!   key cannot reach a log line or an error message by accident.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::hkdf;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::CryptError;

/// Length in bytes of a master key and of a data key.
pub const KEY_LEN: usize = 32;
/// Length in bytes of a data key id (as stored in every object header).
pub const KEY_ID_LEN: usize = 16;

const KEK_INFO: &[u8] = b"tidemark/v1/kek";
const MASTER_ID_INFO: &[u8] = b"tidemark/v1/master-key-id";
const DEK_WRAP_AAD: &[u8] = b"tidemark/v1/dek";
const AUDIT_MAC_INFO: &[u8] = b"tidemark/v1/audit-mac";

/// Fills `buf` from the operating system's CSPRNG ([`crate::rand`], which says why not
/// AWS-LC's), failing as a `CryptError` like the rest of this module.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), CryptError> {
    crate::rand::random_bytes(buf).map_err(|_| CryptError::Random)
}

/// The cluster's master key, as read from its key file.
pub struct MasterKey {
    kek: Zeroizing<[u8; KEY_LEN]>,
    id: String,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey(id={})", self.id)
    }
}

impl MasterKey {
    /// Builds a master key from its 32 raw bytes.
    pub fn from_bytes(raw: &[u8; KEY_LEN]) -> MasterKey {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(raw);
        let mut kek = Zeroizing::new([0u8; KEY_LEN]);
        let mut id = [0u8; 8];
        // Both expansions are within HKDF's output limit, so they cannot fail.
        expand(&prk, KEK_INFO, &mut kek[..]);
        expand(&prk, MASTER_ID_INFO, &mut id);
        MasterKey {
            kek,
            id: hex::encode(id),
        }
    }

    /// Reads a key file: exactly 32 bytes, mode 0600 or stricter (no group/other bits).
    pub fn load(path: &Path) -> Result<MasterKey, CryptError> {
        let meta = std::fs::metadata(path).map_err(|e| CryptError::KeyFile {
            path: path.to_path_buf(),
            detail: io_detail(&e),
        })?;
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(CryptError::KeyFile {
                path: path.to_path_buf(),
                detail: format!("mode is {mode:04o}, must be 0600 (chmod 600 it)"),
            });
        }
        let raw = Zeroizing::new(std::fs::read(path).map_err(|e| CryptError::KeyFile {
            path: path.to_path_buf(),
            detail: io_detail(&e),
        })?);
        let raw: &[u8; KEY_LEN] = raw.as_slice().try_into().map_err(|_| CryptError::KeyFile {
            path: path.to_path_buf(),
            detail: format!(
                "holds {} bytes, a master key is exactly {KEY_LEN} (make one with `tidemark key generate`)",
                raw.len()
            ),
        })?;
        Ok(MasterKey::from_bytes(raw))
    }

    /// A public fingerprint of the key (not secret: derived one-way), used to tell which master
    /// key wrapped a keyring and to give a clear "wrong key" error.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn wrap(&self, repository_id: &str, dek: &DataKey) -> Result<String, CryptError> {
        let key = aead_key(&self.kek)?;
        let mut nonce = [0u8; NONCE_LEN];
        random_bytes(&mut nonce)?;
        let mut buf = Zeroizing::new(dek.bytes.to_vec());
        let aad = wrap_aad(repository_id, &dek.id);
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &mut buf,
            )
            .map_err(|_| CryptError::Random)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        out.extend_from_slice(tag.as_ref());
        Ok(hex::encode(out))
    }

    fn unwrap(
        &self,
        repository_id: &str,
        id: &[u8; KEY_ID_LEN],
        wrapped_hex: &str,
    ) -> Result<DataKey, CryptError> {
        let corrupt = || CryptError::Keyring(format!("data key {} is malformed", hex::encode(id)));
        let mut wrapped = Zeroizing::new(hex::decode(wrapped_hex).map_err(|_| corrupt())?);
        if wrapped.len() != NONCE_LEN + KEY_LEN + 16 {
            return Err(corrupt());
        }
        let nonce: [u8; NONCE_LEN] = wrapped[..NONCE_LEN].try_into().map_err(|_| corrupt())?;
        let key = aead_key(&self.kek)?;
        let aad = wrap_aad(repository_id, id);
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &mut wrapped[NONCE_LEN..],
            )
            .map_err(|_| CryptError::WrongKey {
                detail: format!(
                    "data key {} does not authenticate under master key {}",
                    hex::encode(id),
                    self.id
                ),
            })?;
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        bytes.copy_from_slice(plain);
        Ok(DataKey { id: *id, bytes })
    }
}

/// Writes a new random master key to `path` with mode 0600; refuses to overwrite anything.
pub fn generate_master_key_file(path: &Path) -> Result<MasterKey, CryptError> {
    let mut raw = Zeroizing::new([0u8; KEY_LEN]);
    random_bytes(&mut raw[..])?;
    let err = |e: std::io::Error| CryptError::KeyFile {
        path: path.to_path_buf(),
        detail: io_detail(&e),
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    file.write_all(&raw[..]).map_err(err)?;
    file.sync_all().map_err(err)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
    }
    Ok(MasterKey::from_bytes(&raw))
}

/// A data key: encrypts objects (through per-object derived keys).
pub struct DataKey {
    id: [u8; KEY_ID_LEN],
    bytes: Zeroizing<[u8; KEY_LEN]>,
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DataKey(id={})", hex::encode(self.id))
    }
}

impl DataKey {
    /// A fresh random data key with a fresh random id.
    pub fn generate() -> Result<DataKey, CryptError> {
        let mut id = [0u8; KEY_ID_LEN];
        random_bytes(&mut id)?;
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        random_bytes(&mut bytes[..])?;
        Ok(DataKey { id, bytes })
    }

    pub fn id(&self) -> &[u8; KEY_ID_LEN] {
        &self.id
    }

    pub(crate) fn secret(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }

    #[cfg(test)]
    pub(crate) fn from_parts(id: [u8; KEY_ID_LEN], bytes: [u8; KEY_LEN]) -> DataKey {
        DataKey {
            id,
            bytes: Zeroizing::new(bytes),
        }
    }
}

/// The keyring object as stored (JSON, see docs/format.md). Holds only wrapped keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyringFile {
    pub format: u32,
    /// Id of the master key that wrapped every entry.
    pub master_key_id: String,
    /// Id of the data key new objects are encrypted with.
    pub current: String,
    pub keys: Vec<WrappedKey>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WrappedKey {
    pub id: String,
    pub created: chrono::DateTime<chrono::Utc>,
    /// hex(nonce[12] || AES-256-GCM(KEK, DEK)[32] || tag[16])
    pub wrapped: String,
}

/// The unwrapped data keys of one repository, held in memory for one command.
#[derive(Debug)]
pub struct Keyring {
    keys: Vec<DataKey>,
    current: usize,
}

impl Keyring {
    /// Creates a keyring with one fresh data key, wrapped by `master`.
    pub fn create(
        master: &MasterKey,
        repository_id: &str,
    ) -> Result<(Keyring, KeyringFile), CryptError> {
        let dek = DataKey::generate()?;
        let file = KeyringFile {
            format: 1,
            master_key_id: master.id().to_string(),
            current: hex::encode(dek.id),
            keys: vec![WrappedKey {
                id: hex::encode(dek.id),
                created: chrono::Utc::now(),
                wrapped: master.wrap(repository_id, &dek)?,
            }],
        };
        Ok((
            Keyring {
                keys: vec![dek],
                current: 0,
            },
            file,
        ))
    }

    /// Unwraps every data key of `file` with `master`.
    pub fn open(
        master: &MasterKey,
        repository_id: &str,
        file: &KeyringFile,
    ) -> Result<Keyring, CryptError> {
        if file.format != 1 {
            return Err(CryptError::Keyring(format!(
                "keyring format {} is not supported by this tidemark (knows 1)",
                file.format
            )));
        }
        if file.master_key_id != master.id() {
            return Err(CryptError::WrongKey {
                detail: format!(
                    "the repository's keys are wrapped by master key {}, the key file holds master key {}",
                    file.master_key_id,
                    master.id()
                ),
            });
        }
        let mut keys = Vec::with_capacity(file.keys.len());
        let mut current = None;
        for entry in &file.keys {
            let id = parse_key_id(&entry.id)
                .ok_or_else(|| CryptError::Keyring(format!("bad data key id {:?}", entry.id)))?;
            if entry.id == file.current {
                current = Some(keys.len());
            }
            keys.push(master.unwrap(repository_id, &id, &entry.wrapped)?);
        }
        let current = current.ok_or_else(|| {
            CryptError::Keyring(format!(
                "current data key {} is not in the keyring",
                file.current
            ))
        })?;
        Ok(Keyring { keys, current })
    }

    #[cfg(test)]
    pub(crate) fn from_keys_for_tests(key: DataKey) -> Keyring {
        Keyring {
            keys: vec![key],
            current: 0,
        }
    }

    /// The key new objects are encrypted with.
    pub fn current(&self) -> &DataKey {
        &self.keys[self.current]
    }

    /// The key with this id, if the keyring holds it.
    pub fn get(&self, id: &[u8; KEY_ID_LEN]) -> Option<&DataKey> {
        self.keys.iter().find(|k| &k.id == id)
    }

    /// HMAC-SHA256 of `data` under the audit key derived from data key `key_id`: HKDF-SHA256
    /// with an empty salt over the data key, info = "tidemark/v1/audit-mac" ||
    /// len32(repository_id) || repository_id (docs/format.md, audit). None if the keyring
    /// does not hold that key.
    pub fn audit_mac(
        &self,
        key_id: &[u8; KEY_ID_LEN],
        repository_id: &str,
        data: &[u8],
    ) -> Option<[u8; 32]> {
        let dek = self.get(key_id)?;
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(dek.secret());
        let mut info = AUDIT_MAC_INFO.to_vec();
        push_field(&mut info, repository_id.as_bytes());
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        expand(&prk, &info, &mut k[..]);
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &k[..]);
        let tag = aws_lc_rs::hmac::sign(&key, data);
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        Some(out)
    }
}

pub(crate) fn parse_key_id(s: &str) -> Option<[u8; KEY_ID_LEN]> {
    hex::decode(s).ok()?.try_into().ok()
}

fn wrap_aad(repository_id: &str, dek_id: &[u8; KEY_ID_LEN]) -> Vec<u8> {
    let mut aad = DEK_WRAP_AAD.to_vec();
    push_field(&mut aad, repository_id.as_bytes());
    push_field(&mut aad, dek_id);
    aad
}

/// Appends a length-prefixed field, so concatenations cannot be ambiguous.
pub(crate) fn push_field(buf: &mut Vec<u8>, field: &[u8]) {
    buf.extend_from_slice(&(field.len() as u32).to_be_bytes());
    buf.extend_from_slice(field);
}

pub(crate) fn expand(prk: &hkdf::Prk, info: &[u8], out: &mut [u8]) {
    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let infos = [info];
    // HKDF-SHA256 can produce up to 255*32 bytes; callers ask for at most 32.
    prk.expand(&infos, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .expect("HKDF output length within limits");
}

pub(crate) fn aead_key(bytes: &[u8; KEY_LEN]) -> Result<LessSafeKey, CryptError> {
    UnboundKey::new(&AES_256_GCM, bytes)
        .map(LessSafeKey::new)
        .map_err(|_| CryptError::Random)
}

fn io_detail(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_string(),
        std::io::ErrorKind::AlreadyExists => "already exists, refusing to overwrite".to_string(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyring_round_trip_and_wrong_master() {
        let m1 = MasterKey::from_bytes(&[1u8; 32]);
        let m2 = MasterKey::from_bytes(&[2u8; 32]);
        let (ring, file) = Keyring::create(&m1, "repo").unwrap();
        let reopened = Keyring::open(&m1, "repo", &file).unwrap();
        assert_eq!(reopened.current().id(), ring.current().id());
        assert_eq!(reopened.current().secret(), ring.current().secret());
        let err = Keyring::open(&m2, "repo", &file).unwrap_err();
        assert!(matches!(err, CryptError::WrongKey { .. }), "{err}");
        // A keyring claiming the right master id but wrapped by another key still fails.
        let mut forged = file.clone();
        forged.master_key_id = m2.id().to_string();
        assert!(matches!(
            Keyring::open(&m2, "repo", &forged).unwrap_err(),
            CryptError::WrongKey { .. }
        ));
        // Bound to the repository id.
        assert!(Keyring::open(&m1, "other-repo", &file).is_err());
    }

    #[test]
    fn debug_never_prints_key_bytes() {
        let m = MasterKey::from_bytes(&[0xAB; 32]);
        let dek = DataKey::from_parts([7; 16], [0xCD; 32]);
        let s = format!("{m:?} {dek:?}");
        assert!(!s.to_lowercase().contains("abab"), "{s}");
        assert!(!s.to_lowercase().contains("cdcd"), "{s}");
    }

    #[test]
    fn key_file_checks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let m = generate_master_key_file(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(&p).unwrap().len(), 32);
        assert_eq!(MasterKey::load(&p).unwrap().id(), m.id());
        assert!(
            generate_master_key_file(&p).is_err(),
            "must refuse to overwrite"
        );
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = MasterKey::load(&p).unwrap_err().to_string();
        assert!(e.contains("0644"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&p, [0u8; 31]).unwrap();
        assert!(
            MasterKey::load(&p)
                .unwrap_err()
                .to_string()
                .contains("31 bytes")
        );
        assert!(
            MasterKey::load(&dir.path().join("missing"))
                .unwrap_err()
                .to_string()
                .contains("no such file")
        );
    }
}
