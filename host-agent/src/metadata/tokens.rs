//! IMDSv2 session tokens: `PUT /latest/api/token` with a TTL gives a VM a
//! token that every `GET` must carry. A request that a confused process in
//! the guest forwards (an open proxy, an SSRF) cannot first do the `PUT`
//! with its TTL header, so it cannot read anything.
//!
//! A token is good only for the VM it was given to, until its TTL runs
//! out; each VM holds at most [`MAX_TOKENS_PER_VM`] (a new one pushes out
//! its oldest), so a guest cannot grow the table without bound.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The longest TTL a token may ask for (EC2's: six hours).
pub const MAX_TTL: Duration = Duration::from_secs(21_600);
/// Live tokens one VM may hold.
pub const MAX_TOKENS_PER_VM: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the TTL header must be a whole number of seconds from 1 to 21600")]
    BadTtl,
    #[error("no token was given")]
    Missing,
    #[error("the token is unknown, another VM's, or expired")]
    Invalid,
}

/// The TTL a `PUT /latest/api/token` asks for (its
/// `X-aws-ec2-metadata-token-ttl-seconds` header).
pub fn parse_ttl(header: Option<&str>) -> Result<Duration, TokenError> {
    let text = header.ok_or(TokenError::BadTtl)?.trim();
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(TokenError::BadTtl);
    }
    let seconds: u64 = text.parse().map_err(|_| TokenError::BadTtl)?;
    let ttl = Duration::from_secs(seconds);
    if seconds == 0 || ttl > MAX_TTL {
        return Err(TokenError::BadTtl);
    }
    Ok(ttl)
}

#[derive(Debug, Clone)]
struct Issued {
    vm_id: String,
    expires: Instant,
    issued: Instant,
}

/// The live tokens of every VM on this host.
#[derive(Debug, Default)]
pub struct Tokens {
    by_token: HashMap<String, Issued>,
}

impl Tokens {
    /// Records `token` (random, made by the caller) for `vm_id`.
    pub fn issue(&mut self, token: String, vm_id: &str, ttl: Duration, now: Instant) {
        self.sweep(now);
        let held: Vec<(&String, &Issued)> = self
            .by_token
            .iter()
            .filter(|(_, issued)| issued.vm_id == vm_id)
            .collect();
        if held.len() >= MAX_TOKENS_PER_VM {
            if let Some(oldest) = held
                .iter()
                .min_by_key(|(_, issued)| issued.issued)
                .map(|(token, _)| (*token).clone())
            {
                self.by_token.remove(&oldest);
            }
        }
        self.by_token.insert(
            token,
            Issued {
                vm_id: vm_id.to_string(),
                expires: now + ttl,
                issued: now,
            },
        );
    }

    /// Whether `token` lets `vm_id` read its metadata at `now`.
    pub fn check(&self, token: Option<&str>, vm_id: &str, now: Instant) -> Result<(), TokenError> {
        let token = token.ok_or(TokenError::Missing)?;
        match self.by_token.get(token) {
            Some(issued) if issued.vm_id == vm_id && now < issued.expires => Ok(()),
            _ => Err(TokenError::Invalid),
        }
    }

    /// Drops the tokens of a VM that is gone.
    pub fn forget_vm(&mut self, vm_id: &str) {
        self.by_token.retain(|_, issued| issued.vm_id != vm_id);
    }

    /// Drops expired tokens.
    pub fn sweep(&mut self, now: Instant) {
        self.by_token.retain(|_, issued| now < issued.expires);
    }

    pub fn len(&self) -> usize {
        self.by_token.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_token.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_are_whole_seconds_within_six_hours() {
        assert_eq!(parse_ttl(Some("21600")), Ok(MAX_TTL));
        assert_eq!(parse_ttl(Some(" 60 ")), Ok(Duration::from_secs(60)));
        for bad in [
            None,
            Some(""),
            Some("0"),
            Some("21601"),
            Some("-5"),
            Some("1.5"),
            Some("1e3"),
            Some("99999999999999999999999"),
        ] {
            assert_eq!(parse_ttl(bad), Err(TokenError::BadTtl), "{bad:?}");
        }
    }

    #[test]
    fn a_token_is_its_vms_only_and_expires() {
        let now = Instant::now();
        let mut tokens = Tokens::default();
        tokens.issue("t1".into(), "vm-a", Duration::from_secs(10), now);
        assert_eq!(tokens.check(Some("t1"), "vm-a", now), Ok(()));
        assert_eq!(
            tokens.check(Some("t1"), "vm-b", now),
            Err(TokenError::Invalid)
        );
        assert_eq!(tokens.check(None, "vm-a", now), Err(TokenError::Missing));
        assert_eq!(
            tokens.check(Some("t2"), "vm-a", now),
            Err(TokenError::Invalid)
        );
        let later = now + Duration::from_secs(10);
        assert_eq!(
            tokens.check(Some("t1"), "vm-a", later),
            Err(TokenError::Invalid)
        );
        tokens.sweep(later);
        assert!(tokens.is_empty());
    }

    #[test]
    fn a_vm_holds_a_bounded_number_of_tokens() {
        let now = Instant::now();
        let mut tokens = Tokens::default();
        for n in 0..(MAX_TOKENS_PER_VM + 5) {
            let at = now + Duration::from_millis(n as u64);
            tokens.issue(format!("t{n}"), "vm-a", Duration::from_secs(60), at);
        }
        tokens.issue("other".into(), "vm-b", Duration::from_secs(60), now);
        assert_eq!(tokens.len(), MAX_TOKENS_PER_VM + 1);
        let at = now + Duration::from_secs(1);
        assert_eq!(
            tokens.check(Some("t0"), "vm-a", at),
            Err(TokenError::Invalid),
            "the oldest went"
        );
        let newest = format!("t{}", MAX_TOKENS_PER_VM + 4);
        assert_eq!(tokens.check(Some(&newest), "vm-a", at), Ok(()));
        tokens.forget_vm("vm-a");
        assert_eq!(tokens.len(), 1);
    }
}
