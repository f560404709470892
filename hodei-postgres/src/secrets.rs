//! Secrets ([`SecretStore`]): AES-256-GCM at rest, a fresh random nonce per
//! value, the secret's name as associated data (a ciphertext moved to
//! another name does not decrypt).

use std::path::PathBuf;

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use async_trait::async_trait;
use base64::Engine as _;
use hodei_core::ports::{SecretMeta, SecretStore, StoreError};
use hodei_core::time::Timestamp;
use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::PgStore;
use crate::error::{PgError, corrupt, store_err};

/// Environment variable holding the key (32 bytes, base64 or hex).
pub const SECRET_KEY_ENV: &str = "HODEI_SECRET_KEY";
/// Environment variable naming a file that holds the key, used when
/// [`SECRET_KEY_ENV`] is unset.
pub const SECRET_KEY_FILE_ENV: &str = "HODEI_SECRET_KEY_FILE";

const NO_KEY: &str = "secrets need HODEI_SECRET_KEY (32 bytes, base64 or hex, e.g. from \
     `openssl rand -base64 32`) or a key file (HODEI_SECRET_KEY_FILE); none is configured, \
     so secrets are neither stored nor read";

/// A 256-bit key for the secret store. Its `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey([u8; 32]);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey({})", self.id())
    }
}

impl SecretKey {
    /// Wraps raw key bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Parses 32 bytes given as 64 hex digits or as base64 (standard or
    /// URL-safe, padded or not). Surrounding whitespace is ignored.
    pub fn parse(text: &str) -> Result<Self, PgError> {
        let text = text.trim();
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            decode_hex(text)
        } else {
            use base64::engine::general_purpose::{
                STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD,
            };
            [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
                .iter()
                .find_map(|engine| engine.decode(text).ok())
        };
        let bytes = bytes.ok_or_else(|| {
            PgError::SecretKey(
                "the key is neither 64 hex digits nor base64; accepted: 32 bytes as base64 \
                 (`openssl rand -base64 32`) or hex (`openssl rand -hex 32`)"
                    .into(),
            )
        })?;
        let len = bytes.len();
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| {
            PgError::SecretKey(format!(
                "the key is {len} bytes; accepted: exactly 32 bytes"
            ))
        })?;
        Ok(Self(bytes))
    }

    /// Reads and parses the key in the file at `path`.
    pub fn from_file(path: &std::path::Path) -> Result<Self, PgError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            PgError::SecretKey(format!("cannot read key file {}: {e}", path.display()))
        })?;
        Self::parse(&text)
            .map_err(|e| PgError::SecretKey(format!("key file {}: {e}", path.display())))
    }

    /// A fingerprint naming the key (not revealing it), stored beside
    /// every value so that a wrong key is reported as such.
    pub fn id(&self) -> String {
        let digest = Sha256::new()
            .chain_update(b"hodei-secret-key-id:")
            .chain_update(self.0)
            .finalize();
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&self.0))
    }
}

/// Where a [`PgStore`]'s secret key comes from.
#[derive(Debug, Clone, Default)]
pub enum SecretKeySource {
    /// `HODEI_SECRET_KEY`, else the file named by `HODEI_SECRET_KEY_FILE`,
    /// else no key. A variable that is set but malformed is an error.
    #[default]
    Env,
    /// The file at this path (it must exist and hold a valid key).
    File(PathBuf),
    /// This key.
    Key(SecretKey),
    /// No key: secrets cannot be stored or read.
    None,
}

impl SecretKeySource {
    /// The key, if any.
    pub fn resolve(&self) -> Result<Option<SecretKey>, PgError> {
        match self {
            SecretKeySource::Env => {
                if let Some(text) = std::env::var_os(SECRET_KEY_ENV) {
                    let text = text.into_string().map_err(|_| {
                        PgError::SecretKey(format!("{SECRET_KEY_ENV} is not valid UTF-8"))
                    })?;
                    return SecretKey::parse(&text)
                        .map(Some)
                        .map_err(|e| PgError::SecretKey(format!("{SECRET_KEY_ENV}: {e}")));
                }
                match std::env::var_os(SECRET_KEY_FILE_ENV) {
                    Some(path) => SecretKey::from_file(path.as_ref()).map(Some),
                    None => Ok(None),
                }
            }
            SecretKeySource::File(path) => SecretKey::from_file(path).map(Some),
            SecretKeySource::Key(key) => Ok(Some(key.clone())),
            SecretKeySource::None => Ok(None),
        }
    }
}

#[async_trait]
impl SecretStore for PgStore {
    async fn put(&self, name: &str, value: &str, now: Timestamp) -> Result<(), StoreError> {
        let key = self.secret_key()?;
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let ciphertext = key
            .cipher()
            .encrypt(
                &nonce,
                Payload {
                    msg: value.as_bytes(),
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| StoreError::Other(format!("secret {name:?} could not be encrypted")))?;
        sqlx::query(
            "INSERT INTO secrets (name, nonce, ciphertext, key_id, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $5) \
             ON CONFLICT (name) DO UPDATE SET nonce = EXCLUDED.nonce, \
             ciphertext = EXCLUDED.ciphertext, key_id = EXCLUDED.key_id, \
             updated_at = EXCLUDED.updated_at",
        )
        .bind(name)
        .bind(nonce.as_slice())
        .bind(ciphertext)
        .bind(key.id())
        .bind(now)
        .execute(&self.inner.pool)
        .await
        .map_err(store_err)?;
        Ok(())
    }

    async fn get(&self, name: &str) -> Result<Option<String>, StoreError> {
        let key = self.secret_key()?;
        let Some(row) =
            sqlx::query("SELECT nonce, ciphertext, key_id FROM secrets WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.inner.pool)
                .await
                .map_err(store_err)?
        else {
            return Ok(None);
        };
        let nonce: Vec<u8> = row.try_get("nonce").map_err(|e| corrupt("secret", e))?;
        let ciphertext: Vec<u8> = row
            .try_get("ciphertext")
            .map_err(|e| corrupt("secret", e))?;
        let key_id: String = row.try_get("key_id").map_err(|e| corrupt("secret", e))?;
        if key_id != key.id() {
            return Err(StoreError::Other(format!(
                "secret {name:?} was encrypted with another key (key id {key_id}, configured {}); \
                 set the HODEI_SECRET_KEY it was stored with",
                key.id()
            )));
        }
        if nonce.len() != 12 {
            return Err(corrupt(
                &format!("secret {name:?}"),
                "nonce is not 12 bytes",
            ));
        }
        let plain = key
            .cipher()
            .decrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &ciphertext,
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| {
                StoreError::Other(format!(
                    "secret {name:?} does not decrypt (tampered with, or stored under another name)"
                ))
            })?;
        String::from_utf8(plain)
            .map(Some)
            .map_err(|e| corrupt(&format!("secret {name:?}"), e))
    }

    async fn list(&self) -> Result<Vec<SecretMeta>, StoreError> {
        let rows = sqlx::query("SELECT name, created_at, updated_at FROM secrets ORDER BY name")
            .fetch_all(&self.inner.pool)
            .await
            .map_err(store_err)?;
        rows.iter()
            .map(|row| {
                Ok(SecretMeta {
                    name: row.try_get("name").map_err(|e| corrupt("secret", e))?,
                    created_at: row
                        .try_get("created_at")
                        .map_err(|e| corrupt("secret", e))?,
                    updated_at: row
                        .try_get("updated_at")
                        .map_err(|e| corrupt("secret", e))?,
                })
            })
            .collect()
    }

    async fn delete(&self, name: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM secrets WHERE name = $1")
            .bind(name)
            .execute(&self.inner.pool)
            .await
            .map_err(store_err)?;
        Ok(done.rows_affected() > 0)
    }
}

impl PgStore {
    fn secret_key(&self) -> Result<&SecretKey, StoreError> {
        self.inner
            .secret_key
            .as_ref()
            .ok_or_else(|| StoreError::Invalid(NO_KEY.into()))
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    let digit = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    text.as_bytes()
        .chunks(2)
        .map(|pair| match pair {
            [hi, lo] => Some(digit(*hi)? << 4 | digit(*lo)?),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hex_and_base64() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let k = SecretKey::parse(hex).unwrap();
        assert_eq!(k.0[1], 0x11);
        let b64 = base64::engine::general_purpose::STANDARD.encode(k.0);
        assert_eq!(SecretKey::parse(&format!("{b64}\n")).unwrap(), k);
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(k.0);
        assert_eq!(SecretKey::parse(&url).unwrap(), k);
    }

    #[test]
    fn rejects_wrong_lengths_with_a_clear_message() {
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 16]);
        let e = SecretKey::parse(&short).unwrap_err().to_string();
        assert!(e.contains("16 bytes") && e.contains("32"), "{e}");
        let e = SecretKey::parse("not a key!").unwrap_err().to_string();
        assert!(e.contains("base64") && e.contains("hex"), "{e}");
    }

    #[test]
    fn debug_hides_the_key() {
        let k = SecretKey::from_bytes([7; 32]);
        let shown = format!("{k:?}");
        assert!(!shown.contains("7, 7"), "{shown}");
        assert_eq!(shown, format!("SecretKey({})", k.id()));
    }

    #[test]
    fn nonces_differ_and_aad_binds_the_name() {
        let k = SecretKey::from_bytes([9; 32]);
        let n1 = Aes256Gcm::generate_nonce(&mut OsRng);
        let n2 = Aes256Gcm::generate_nonce(&mut OsRng);
        assert_ne!(n1, n2);
        let ct = k
            .cipher()
            .encrypt(
                &n1,
                Payload {
                    msg: b"v",
                    aad: b"A",
                },
            )
            .unwrap();
        assert!(
            k.cipher()
                .decrypt(
                    &n1,
                    Payload {
                        msg: &ct,
                        aad: b"B"
                    }
                )
                .is_err()
        );
        assert_eq!(
            k.cipher()
                .decrypt(
                    &n1,
                    Payload {
                        msg: &ct,
                        aad: b"A"
                    }
                )
                .unwrap(),
            b"v"
        );
    }
}
