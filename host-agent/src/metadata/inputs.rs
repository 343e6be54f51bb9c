//! What a tenant hands the metadata service, checked before it is kept:
//! SSH public keys (parsed: the type, a key blob that names the same type,
//! a printable comment), tags and user data (base64, at most 64 KiB).
//! Each check returns the API error naming the field and the value.

use std::collections::BTreeMap;

use base64::engine::general_purpose::{
    GeneralPurpose, GeneralPurposeConfig, STANDARD, STANDARD_NO_PAD,
};
use base64::{alphabet, Engine as _};
use nubis_api::ssh_key::MAX_PUBLIC_KEY;
use nubis_api::vm::{MAX_TAG_KEY, MAX_TAG_VALUE, MAX_USER_DATA, MAX_VM_TAGS};
use nubis_api::ApiError;
use sha2::{Digest, Sha256};

/// The key types accepted (OpenSSH's current ones; no DSA).
pub const KEY_TYPES: [&str; 7] = [
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// Base64 with padding, as the API's schema has it; bits past the data in
/// the last symbol are ignored (a lenient reader: the schema cannot say
/// they must be zero).
pub const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
);

/// An OpenSSH public key line, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub kind: &'static str,
    blob: Vec<u8>,
    pub comment: String,
}

impl PublicKey {
    /// Parses `type base64 [comment]` (spaces around and between the
    /// parts are dropped). What the API's schema describes is a 400 when
    /// it is not met (the characters, the type, the shape); a key whose
    /// data does not decode to a key of its type is a 422.
    pub fn parse(field: &str, line: &str) -> Result<Self, ApiError> {
        let bad = |why: &str| ApiError::invalid(field, format!("not an OpenSSH public key: {why}"));
        let wrong =
            |why: &str| ApiError::unprocessable(field, format!("not an OpenSSH public key: {why}"));
        if line.chars().count() > MAX_PUBLIC_KEY {
            return Err(bad("longer than 8192 characters"));
        }
        if !line.bytes().all(|byte| (b' '..=b'~').contains(&byte)) {
            return Err(bad("only printable ASCII on one line"));
        }
        let line = line.trim_matches(' ');
        let (kind, rest) = line.split_once(' ').unwrap_or((line, ""));
        let kind = KEY_TYPES
            .into_iter()
            .find(|known| *known == kind)
            .ok_or_else(|| bad(&format!("unknown key type '{kind}'")))?;
        let rest = rest.trim_start_matches(' ');
        let (encoded, comment) = rest.split_once(' ').unwrap_or((rest, ""));
        let base64_shaped = !encoded.is_empty()
            && encoded
                .trim_end_matches('=')
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'+' || byte == b'/')
            && encoded.len() - encoded.trim_end_matches('=').len() <= 2;
        if !base64_shaped {
            return Err(bad("no base64 key after the type"));
        }
        let blob = BASE64
            .decode(encoded)
            .map_err(|_| wrong("the key is not base64"))?;
        if blob_type(&blob) != Some(kind.as_bytes()) {
            return Err(wrong(&format!("the key's data is not of type {kind}")));
        }
        let comment = comment.trim_matches(' ').to_string();
        Ok(Self {
            kind,
            blob,
            comment,
        })
    }

    /// `type base64 [comment]`, as `authorized_keys` takes it.
    pub fn line(&self) -> String {
        let mut line = format!("{} {}", self.kind, STANDARD.encode(&self.blob));
        if !self.comment.is_empty() {
            line.push(' ');
            line.push_str(&self.comment);
        }
        line
    }

    /// `SHA256:` and the unpadded base64 of the blob's SHA-256 (as
    /// `ssh-keygen -l` prints it).
    pub fn fingerprint(&self) -> String {
        format!(
            "SHA256:{}",
            STANDARD_NO_PAD.encode(Sha256::digest(&self.blob))
        )
    }
}

/// The type string at the start of a key blob (a big-endian u32 length,
/// then the bytes).
fn blob_type(blob: &[u8]) -> Option<&[u8]> {
    let length = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
    blob.get(4..4usize.checked_add(length)?)
}

/// Checks a VM's tags.
pub fn tags(tags: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if tags.len() > MAX_VM_TAGS {
        return Err(ApiError::invalid(
            "tags",
            format!("{} tags: at most {MAX_VM_TAGS}", tags.len()),
        ));
    }
    for (key, value) in tags {
        let key_ok = (1..=MAX_TAG_KEY).contains(&key.len())
            && key
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphanumeric())
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b));
        if !key_ok {
            return Err(ApiError::invalid(
                "tags",
                format!("tag key '{key}': 1 to {MAX_TAG_KEY} letters, digits and '_.:-', starting with a letter or digit"),
            ));
        }
        if value.len() > MAX_TAG_VALUE || !value.bytes().all(|b| (b' '..=b'~').contains(&b)) {
            return Err(ApiError::invalid(
                &format!("tags.{key}"),
                format!("at most {MAX_TAG_VALUE} printable ASCII characters"),
            ));
        }
    }
    Ok(())
}

/// Decodes user data (canonical base64 of at most 64 KiB).
pub fn user_data(encoded: &str) -> Result<Vec<u8>, ApiError> {
    let bad = |why: String| ApiError::invalid("user_data", why);
    if encoded.len() > MAX_USER_DATA.div_ceil(3) * 4 {
        return Err(bad(format!("more than {MAX_USER_DATA} bytes")));
    }
    let data = BASE64
        .decode(encoded)
        .map_err(|err| bad(format!("not base64: {err}")))?;
    if data.len() > MAX_USER_DATA {
        return Err(bad(format!(
            "{} bytes: at most {MAX_USER_DATA}",
            data.len()
        )));
    }
    Ok(data)
}

/// The bytes that `encoded` (base64 the agent checked) decodes to.
pub fn decoded_len(encoded: &str) -> u64 {
    let padding = encoded
        .bytes()
        .rev()
        .take_while(|byte| *byte == b'=')
        .count();
    ((encoded.len() / 4 * 3).saturating_sub(padding)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ed25519_line(comment: &str) -> String {
        let mut blob = Vec::new();
        blob.extend_from_slice(&11u32.to_be_bytes());
        blob.extend_from_slice(b"ssh-ed25519");
        blob.extend_from_slice(&32u32.to_be_bytes());
        blob.extend_from_slice(&[7; 32]);
        format!("ssh-ed25519 {} {comment}", STANDARD.encode(blob))
    }

    #[test]
    fn a_key_line_parses_and_keeps_its_comment() {
        let line = ed25519_line("alice@laptop");
        let key = PublicKey::parse("public_key", &format!("  {line}  ")).unwrap();
        let spaced = line.replacen(' ', "   ", 1);
        assert_eq!(PublicKey::parse("public_key", &spaced).unwrap(), key);
        assert_eq!(key.kind, "ssh-ed25519");
        assert_eq!(key.comment, "alice@laptop");
        assert_eq!(key.line(), line);
        assert!(key.fingerprint().starts_with("SHA256:"));
        assert!(!key.fingerprint().ends_with('='));
    }

    #[test]
    fn malformed_keys_are_refused_with_the_reason() {
        let good = ed25519_line("c");
        let blob = good.split(' ').nth(1).unwrap();
        for (line, why) in [
            ("ssh-dss AAAA", "unknown key type"),
            ("ssh-ed25519", "no base64 key"),
            ("ssh-ed25519 !!!", "no base64 key"),
            ("ssh-ed25519 AAAAA", "not base64"),
            (&*format!("ssh-rsa {blob}"), "not of type ssh-rsa"),
            (&*format!("{good}\nssh-ed25519 {blob}"), "printable ASCII"),
            ("ssh-ed25519 AAAAAA==", "not of type"),
        ] {
            let err = PublicKey::parse("public_key", line).unwrap_err();
            assert!(
                err.error.message.contains(why),
                "{line}: {}",
                err.error.message
            );
        }
        let long = format!("{good}{}", "x".repeat(MAX_PUBLIC_KEY));
        assert!(PublicKey::parse("public_key", &long).is_err());
    }

    #[test]
    fn tags_are_bounded_in_number_and_characters() {
        let mut ok = BTreeMap::new();
        ok.insert("env".to_string(), "prod".to_string());
        ok.insert("team.a:b_c-d".to_string(), String::new());
        tags(&ok).unwrap();
        for (key, value) in [
            ("", "x"),
            ("-lead", "x"),
            ("spa ce", "x"),
            ("k", "new\nline"),
        ] {
            let one = BTreeMap::from([(key.to_string(), value.to_string())]);
            assert!(tags(&one).is_err(), "{key:?}={value:?}");
        }
        let many: BTreeMap<String, String> = (0..=MAX_VM_TAGS)
            .map(|index| (format!("k{index}"), String::new()))
            .collect();
        assert!(tags(&many).is_err());
    }

    #[test]
    fn user_data_is_base64_of_at_most_64_kib() {
        assert_eq!(user_data("IyEvYmluL3NoCg==").unwrap(), b"#!/bin/sh\n");
        assert!(user_data("not base64!").is_err());
        // Bits past the data in the last symbol are ignored.
        assert_eq!(user_data("M3T3OSb0fr2t5v0T0nFeGrOETE==").unwrap().len(), 19);
        assert!(user_data(&STANDARD.encode(vec![0u8; MAX_USER_DATA])).is_ok());
        assert!(user_data(&STANDARD.encode(vec![0u8; MAX_USER_DATA + 1])).is_err());
        for size in [0, 1, 2, 3, 4, 100] {
            assert_eq!(decoded_len(&STANDARD.encode(vec![1u8; size])), size as u64);
        }
    }
}
