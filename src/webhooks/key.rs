//! A webhook key, [`Key`], read from its text form, and what it signs and
//! verifies.
//!
//! The text forms are the specification's: `whsec_` and a shared HMAC secret
//! of 24 to 64 bytes, `whsk_` and an ed25519 signing key (its 32-byte seed),
//! `whpk_` and an ed25519 public key, each in standard base64. Padding is
//! optional, as the reference libraries read it. A secret without its
//! `whsec_` prefix, which the Python library also takes, is refused here: the
//! prefix is what tells the three kinds apart.
//!
//! ```
//! use tower_terminal_retry::webhooks::{Key, KeyError};
//!
//! let key: Key = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".parse()?;
//! assert_eq!(format!("{key:?}"), "Key(whsec_ ..)"); // never the secret
//! assert!(matches!("whsec_c2hvcnQ=".parse::<Key>(), Err(KeyError::Length { .. })));
//! # Ok::<(), KeyError>(())
//! ```

use std::{fmt, str::FromStr};

use base64::{
    alphabet,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
    Engine,
};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Keys as the reference libraries write them: standard base64, padded or
/// not.
const KEY_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The prefix of a shared HMAC secret.
const SECRET: &str = "whsec_";
/// The prefix of an ed25519 signing key.
const SIGNING: &str = "whsk_";
/// The prefix of an ed25519 public key.
const PUBLIC: &str = "whpk_";
/// The shortest and longest HMAC secret the specification allows, in bytes.
const SECRET_LENGTHS: std::ops::RangeInclusive<usize> = 24..=64;

/// The length of an HMAC-SHA256 signature, `v1`.
pub(super) const V1_LENGTH: usize = 32;
/// The length of an ed25519 signature, `v1a`.
pub(super) const V1A_LENGTH: usize = 64;

/// A webhook key: a shared HMAC secret (`whsec_`), an ed25519 signing key
/// (`whsk_`) or an ed25519 public key (`whpk_`), parsed with
/// [`str::parse`]. See the [module docs](super) for what each one signs and
/// verifies.
///
/// `Debug` names its kind only, never its bytes.
#[derive(Clone)]
pub struct Key {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    /// HMAC-SHA256 keyed with the secret, ready to be cloned for each
    /// message: the key schedule is paid once.
    Secret(Hmac<Sha256>),
    Signing(SigningKey),
    Public(VerifyingKey),
}

/// Why a key, or a list of keys, was refused. No variant holds any of the
/// key's text or bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// The text starts with none of `whsec_`, `whsk_` and `whpk_`.
    Prefix,
    /// What follows the prefix is not standard base64.
    Base64 {
        /// The prefix of the key: `whsec_`, `whsk_` or `whpk_`.
        kind: &'static str,
    },
    /// The decoded key has a length its kind does not allow.
    Length {
        /// The prefix of the key: `whsec_`, `whsk_` or `whpk_`.
        kind: &'static str,
        /// Its length, in bytes.
        length: usize,
        /// The lengths allowed, in words.
        expected: &'static str,
    },
    /// A `whpk_` key's 32 bytes are not an ed25519 public key.
    NotAPublicKey,
    /// The list of keys is empty.
    NoKeys,
    /// A `whpk_` public key was given to a signer: only the `whsk_` key it
    /// belongs to signs.
    PublicKeyCannotSign,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Prefix => f.write_str("a webhook key starts with whsec_, whsk_ or whpk_"),
            KeyError::Base64 { kind } => write!(f, "the {kind} key is not valid base64"),
            KeyError::Length {
                kind,
                length,
                expected,
            } => write!(
                f,
                "the {kind} key is {length} bytes long, {expected} expected"
            ),
            KeyError::NotAPublicKey => f.write_str("the whpk_ key is not an ed25519 public key"),
            KeyError::NoKeys => f.write_str("no webhook key given"),
            KeyError::PublicKeyCannotSign => {
                f.write_str("a whpk_ public key cannot sign: give the whsk_ key it belongs to")
            }
        }
    }
}

impl std::error::Error for KeyError {}

impl FromStr for Key {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<Key, KeyError> {
        let (kind, encoded) = [SECRET, SIGNING, PUBLIC]
            .into_iter()
            .find_map(|prefix| Some((prefix, text.strip_prefix(prefix)?)))
            .ok_or(KeyError::Prefix)?;
        let bytes = KEY_BASE64
            .decode(encoded)
            .map_err(|_| KeyError::Base64 { kind })?;
        let length = |expected| KeyError::Length {
            kind,
            length: bytes.len(),
            expected,
        };
        let kind = match kind {
            SECRET => {
                if !SECRET_LENGTHS.contains(&bytes.len()) {
                    return Err(length("24 to 64"));
                }
                let mac = Hmac::<Sha256>::new_from_slice(&bytes).expect("HMAC takes any length");
                Kind::Secret(mac)
            }
            SIGNING => {
                let seed: &[u8; 32] = bytes.as_slice().try_into().map_err(|_| length("32"))?;
                Kind::Signing(SigningKey::from_bytes(seed))
            }
            _ => {
                let point: &[u8; 32] = bytes.as_slice().try_into().map_err(|_| length("32"))?;
                Kind::Public(VerifyingKey::from_bytes(point).map_err(|_| KeyError::NotAPublicKey)?)
            }
        };
        Ok(Key { kind })
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix = match self.kind {
            Kind::Secret(_) => SECRET,
            Kind::Signing(_) => SIGNING,
            Kind::Public(_) => PUBLIC,
        };
        write!(f, "Key({prefix} ..)")
    }
}

/// What one message signs: `{id}.{timestamp}.{body}`, kept in its parts so
/// that the body is not copied for HMAC.
#[derive(Debug, Clone, Copy)]
pub(super) struct Content<'a> {
    pub(super) id: &'a str,
    pub(super) timestamp: &'a str,
    pub(super) body: &'a [u8],
}

impl Content<'_> {
    /// The parts in one buffer, as ed25519 signs and verifies them.
    pub(super) fn joined(&self) -> Vec<u8> {
        let mut joined =
            Vec::with_capacity(self.id.len() + self.timestamp.len() + self.body.len() + 2);
        for part in [self.id.as_bytes(), b".", self.timestamp.as_bytes(), b"."] {
            joined.extend_from_slice(part);
        }
        joined.extend_from_slice(self.body);
        joined
    }
}

/// A signature from the header, decoded: `v1,` and 32 bytes or `v1a,` and
/// 64.
#[derive(Debug, Clone)]
pub(super) enum Candidate {
    V1([u8; V1_LENGTH]),
    V1a(Box<[u8; V1A_LENGTH]>),
}

impl Key {
    /// Whether this key can sign: a public key cannot.
    pub(super) fn can_sign(&self) -> bool {
        !matches!(self.kind, Kind::Public(_))
    }

    /// Whether this key takes part in `v1a`, the signatures that need the
    /// content in one buffer.
    pub(super) fn is_ed25519(&self) -> bool {
        !matches!(self.kind, Kind::Secret(_))
    }

    /// This key's signature of `content`, as the header writes it (`v1,` or
    /// `v1a,` and base64). `joined` is the content in one buffer, needed by
    /// an ed25519 key only.
    ///
    /// # Panics
    ///
    /// On a public key, which signers refuse when they are built.
    pub(super) fn sign(&self, content: Content<'_>, joined: Option<&[u8]>) -> String {
        let engine = base64::engine::general_purpose::STANDARD;
        match &self.kind {
            Kind::Secret(mac) => {
                let tag = keyed(mac, content).finalize().into_bytes();
                format!("v1,{}", engine.encode(tag))
            }
            Kind::Signing(key) => {
                let joined = joined.expect("the content joined for ed25519");
                format!("v1a,{}", engine.encode(key.sign(joined).to_bytes()))
            }
            Kind::Public(_) => unreachable!("signers hold no public key"),
        }
    }
}

/// The keys of a verifier, each ready to check any number of candidates
/// against one message: HMAC keys have taken the content in once, so that
/// each candidate costs a finalization, not a pass over the body.
pub(super) struct Checker {
    macs: Vec<Hmac<Sha256>>,
    public: Vec<VerifyingKey>,
    joined: Option<Vec<u8>>,
}

impl Checker {
    /// Prepares `keys` for `content`; ed25519 keys join the content only if
    /// there is a `v1a` candidate to check.
    pub(super) fn new(keys: &[Key], content: Content<'_>, candidates: &[Candidate]) -> Self {
        let any_v1 = candidates.iter().any(|c| matches!(c, Candidate::V1(_)));
        let any_v1a = candidates.iter().any(|c| matches!(c, Candidate::V1a(_)));
        let mut macs = Vec::new();
        let mut public = Vec::new();
        for key in keys {
            match &key.kind {
                Kind::Secret(mac) if any_v1 => macs.push(keyed(mac, content)),
                Kind::Signing(key) if any_v1a => public.push(key.verifying_key()),
                Kind::Public(key) if any_v1a => public.push(*key),
                _ => {}
            }
        }
        let joined = (!public.is_empty()).then(|| content.joined());
        Checker {
            macs,
            public,
            joined,
        }
    }

    /// Whether `candidate` is a signature of the content by one of the keys:
    /// in constant time for HMAC (the MAC's own check), by ed25519's strict
    /// verification for `v1a`.
    pub(super) fn matches(&self, candidate: &Candidate) -> bool {
        match candidate {
            Candidate::V1(tag) => self
                .macs
                .iter()
                .any(|mac| mac.clone().verify_slice(tag).is_ok()),
            Candidate::V1a(bytes) => {
                let Some(joined) = &self.joined else {
                    return false;
                };
                let signature = Signature::from_bytes(bytes);
                self.public
                    .iter()
                    .any(|key| key.verify_strict(joined, &signature).is_ok())
            }
        }
    }
}

/// The MAC keyed with the secret, having taken in `content`.
fn keyed(mac: &Hmac<Sha256>, content: Content<'_>) -> Hmac<Sha256> {
    let mut mac = mac.clone();
    mac.update(content.id.as_bytes());
    mac.update(b".");
    mac.update(content.timestamp.as_bytes());
    mac.update(b".");
    mac.update(content.body);
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret_of(length: usize) -> String {
        format!("{SECRET}{}", KEY_BASE64.encode(vec![7u8; length]))
    }

    #[test]
    fn a_secret_is_24_to_64_bytes_padded_or_not() {
        for length in [24, 32, 64] {
            let key: Key = secret_of(length).parse().unwrap();
            assert!(key.can_sign() && !key.is_ed25519());
        }
        // 25 bytes: base64 with padding, and the same without it.
        let padded = secret_of(25);
        assert!(padded.ends_with('='));
        assert!(padded.parse::<Key>().is_ok());
        assert!(padded.trim_end_matches('=').parse::<Key>().is_ok());
        for length in [0, 16, 23, 65, 512] {
            assert_eq!(
                secret_of(length).parse::<Key>().unwrap_err(),
                KeyError::Length {
                    kind: SECRET,
                    length,
                    expected: "24 to 64"
                }
            );
        }
    }

    #[test]
    fn a_key_without_a_known_prefix_or_not_base64_is_refused() {
        let bare = KEY_BASE64.encode([7u8; 32]);
        for text in [bare.as_str(), "", "whsec", "WHSEC_abc", "whpk-abc"] {
            assert_eq!(text.parse::<Key>().unwrap_err(), KeyError::Prefix, "{text}");
        }
        for (text, kind) in [
            ("whsec_not base64!", SECRET),
            ("whsk_a-b_", SIGNING),
            ("whpk_====", PUBLIC),
        ] {
            assert_eq!(
                text.parse::<Key>().unwrap_err(),
                KeyError::Base64 { kind },
                "{text}"
            );
        }
    }

    #[test]
    fn ed25519_keys_are_32_bytes_and_a_public_key_a_point() {
        let seed = KEY_BASE64.encode([9u8; 32]);
        let signing: Key = format!("{SIGNING}{seed}").parse().unwrap();
        assert!(signing.can_sign() && signing.is_ed25519());
        let public = SigningKey::from_bytes(&[9u8; 32]).verifying_key();
        let public: Key = format!("{PUBLIC}{}", KEY_BASE64.encode(public.as_bytes()))
            .parse()
            .unwrap();
        assert!(!public.can_sign() && public.is_ed25519());
        for prefix in [SIGNING, PUBLIC] {
            let short = format!("{prefix}{}", KEY_BASE64.encode([9u8; 31]));
            assert!(matches!(
                short.parse::<Key>(),
                Err(KeyError::Length { length: 31, .. })
            ));
        }
        // y = 2 is on no point of the curve.
        let mut off_curve = [0u8; 32];
        off_curve[0] = 2;
        let text = format!("{PUBLIC}{}", KEY_BASE64.encode(off_curve));
        assert_eq!(text.parse::<Key>().unwrap_err(), KeyError::NotAPublicKey);
    }

    #[test]
    fn debug_and_errors_show_no_key_material() {
        let text = secret_of(32);
        let encoded = text.strip_prefix(SECRET).unwrap();
        let key: Key = text.parse().unwrap();
        let shown = format!("{key:?} {:?}", std::slice::from_ref(&key));
        assert!(
            !shown.contains(encoded) && !shown.contains("7, 7"),
            "{shown}"
        );
        assert_eq!(format!("{key:?}"), "Key(whsec_ ..)");
        let wrong = format!("{}x", &text[..text.len() - 4]);
        let error = wrong.parse::<Key>().unwrap_err();
        assert!(!format!("{error} {error:?}").contains(&encoded[..16]));
    }
}
