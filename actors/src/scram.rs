//! Server side of SASL SCRAM (RFC 5802, RFC 7677) and PLAIN (RFC 4616) over stored SCRAM
//! credentials: the server never holds a plaintext password.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use starling_storage::{Account, ScramCreds};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hash {
    Sha1,
    Sha256,
}

fn hmac(h: Hash, key: &[u8], data: &[u8]) -> Vec<u8> {
    match h {
        Hash::Sha1 => {
            let mut m = Hmac::<Sha1>::new_from_slice(key).expect("HMAC takes any key length");
            m.update(data);
            m.finalize().into_bytes().to_vec()
        }
        Hash::Sha256 => {
            let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
            m.update(data);
            m.finalize().into_bytes().to_vec()
        }
    }
}

fn digest(h: Hash, data: &[u8]) -> Vec<u8> {
    match h {
        Hash::Sha1 => Sha1::digest(data).to_vec(),
        Hash::Sha256 => Sha256::digest(data).to_vec(),
    }
}

fn salted_password(h: Hash, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
    match h {
        Hash::Sha1 => {
            let mut out = [0u8; 20];
            pbkdf2::pbkdf2_hmac::<Sha1>(password, salt, iterations, &mut out);
            out.to_vec()
        }
        Hash::Sha256 => {
            let mut out = [0u8; 32];
            pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out);
            out.to_vec()
        }
    }
}

/// Prepares a password with SASLprep (RFC 4013); falls back to the raw bytes for strings that
/// SASLprep refuses, so such a password still works consistently.
fn prep(password: &str) -> String {
    stringprep::saslprep(password)
        .map(|c| c.into_owned())
        .unwrap_or_else(|_| password.to_owned())
}

pub fn derive(h: Hash, password: &str, salt: &[u8], iterations: u32) -> ScramCreds {
    let salted = salted_password(h, prep(password).as_bytes(), salt, iterations);
    let client_key = hmac(h, &salted, b"Client Key");
    ScramCreds {
        salt: salt.to_vec(),
        iterations,
        stored_key: digest(h, &client_key),
        server_key: hmac(h, &salted, b"Server Key"),
    }
}

/// Credentials for a new password: one salt per hash, from the caller's randomness.
pub fn new_account(password: &str, salt1: [u8; 16], salt256: [u8; 16], iterations: u32) -> Account {
    Account {
        sha1: derive(Hash::Sha1, password, &salt1, iterations),
        sha256: derive(Hash::Sha256, password, &salt256, iterations),
    }
}

/// Checks a plaintext password (SASL PLAIN) against stored credentials.
pub fn verify_password(account: &Account, password: &str) -> bool {
    let c = &account.sha256;
    let d = derive(Hash::Sha256, password, &c.salt, c.iterations);
    constant_time_eq(&d.stored_key, &c.stored_key)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Debug, PartialEq, Eq)]
pub enum SaslError {
    /// `malformed-request`
    Malformed(&'static str),
    /// `not-authorized`
    NotAuthorized,
    /// `invalid-authzid`
    InvalidAuthzid,
    /// `encryption-required` / unsupported channel binding
    ChannelBinding,
}

impl SaslError {
    pub fn condition(&self) -> &'static str {
        match self {
            SaslError::Malformed(_) => "malformed-request",
            SaslError::NotAuthorized => "not-authorized",
            SaslError::InvalidAuthzid => "invalid-authzid",
            SaslError::ChannelBinding => "not-authorized",
        }
    }
}

/// Parsed client-first-message.
#[derive(Debug)]
pub struct ClientFirst {
    pub gs2_header: String,
    pub authzid: Option<String>,
    pub username: String,
    pub client_nonce: String,
    pub bare: String,
}

fn unescape_saslname(s: &str) -> Result<String, SaslError> {
    let mut out = String::with_capacity(s.len());
    let mut it = s.split("=");
    out.push_str(it.next().unwrap_or(""));
    for part in it {
        if let Some(r) = part.strip_prefix("2C") {
            out.push(',');
            out.push_str(r);
        } else if let Some(r) = part.strip_prefix("3D") {
            out.push('=');
            out.push_str(r);
        } else {
            return Err(SaslError::Malformed("bad escape in saslname"));
        }
    }
    Ok(out)
}

pub fn parse_client_first(msg: &[u8]) -> Result<ClientFirst, SaslError> {
    let msg = std::str::from_utf8(msg).map_err(|_| SaslError::Malformed("not UTF-8"))?;
    let mut parts = msg.splitn(3, ',');
    let cb = parts.next().ok_or(SaslError::Malformed("missing gs2 flag"))?;
    let authz = parts.next().ok_or(SaslError::Malformed("missing authzid field"))?;
    let bare = parts.next().ok_or(SaslError::Malformed("missing client-first-bare"))?;
    match cb {
        "n" | "y" => {}
        c if c.starts_with("p=") => return Err(SaslError::ChannelBinding),
        _ => return Err(SaslError::Malformed("bad gs2 channel binding flag")),
    }
    let authzid = match authz {
        "" => None,
        a => Some(unescape_saslname(
            a.strip_prefix("a=").ok_or(SaslError::Malformed("bad authzid"))?,
        )?),
    };
    let mut username = None;
    let mut nonce = None;
    for attr in bare.split(',') {
        if let Some(v) = attr.strip_prefix("n=") {
            username = Some(unescape_saslname(v)?);
        } else if let Some(v) = attr.strip_prefix("r=") {
            nonce = Some(v.to_string());
        } else if attr.starts_with("m=") {
            return Err(SaslError::Malformed("mandatory extension not supported"));
        }
    }
    let username = username.ok_or(SaslError::Malformed("missing username"))?;
    let client_nonce = nonce
        .filter(|n| !n.is_empty())
        .ok_or(SaslError::Malformed("missing nonce"))?;
    Ok(ClientFirst {
        gs2_header: format!("{cb},{authz},"),
        authzid,
        username,
        client_nonce,
        bare: bare.to_string(),
    })
}

/// A SCRAM exchange after the client-first-message and the credential lookup.
pub struct ScramExchange {
    hash: Hash,
    first: ClientFirst,
    nonce: String,
    server_first: String,
    creds: ScramCreds,
    /// False when the account does not exist: we run the exchange on dummy credentials and
    /// fail at the end, so that a probe cannot tell unknown users from bad passwords.
    real: bool,
}

impl ScramExchange {
    pub fn new(
        hash: Hash,
        first: ClientFirst,
        account: Option<&Account>,
        server_nonce: &str,
        dummy_salt: [u8; 16],
    ) -> Self {
        let (creds, real) = match account {
            Some(a) => (
                if hash == Hash::Sha1 {
                    a.sha1.clone()
                } else {
                    a.sha256.clone()
                },
                true,
            ),
            None => (
                ScramCreds {
                    salt: dummy_salt.to_vec(),
                    iterations: 4096,
                    stored_key: vec![],
                    server_key: vec![],
                },
                false,
            ),
        };
        let nonce = format!("{}{}", first.client_nonce, server_nonce);
        let server_first = format!("r={},s={},i={}", nonce, B64.encode(&creds.salt), creds.iterations);
        ScramExchange {
            hash,
            first,
            nonce,
            server_first,
            creds,
            real,
        }
    }

    pub fn server_first(&self) -> &str {
        &self.server_first
    }

    pub fn username(&self) -> &str {
        &self.first.username
    }

    pub fn authzid(&self) -> Option<&str> {
        self.first.authzid.as_deref()
    }

    /// Verifies the client-final-message; returns the server-final-message on success.
    pub fn finish(&self, msg: &[u8]) -> Result<String, SaslError> {
        let msg = std::str::from_utf8(msg).map_err(|_| SaslError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = msg.rsplit_once(",p=").ok_or(SaslError::Malformed("missing proof"))?;
        let mut cbind = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(v) = attr.strip_prefix("c=") {
                cbind = Some(v);
            } else if let Some(v) = attr.strip_prefix("r=") {
                nonce = Some(v);
            }
        }
        let expected_cb = B64.encode(self.first.gs2_header.as_bytes());
        if cbind != Some(expected_cb.as_str()) {
            return Err(SaslError::ChannelBinding);
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(SaslError::NotAuthorized);
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| SaslError::Malformed("proof is not base64"))?;
        if !self.real {
            return Err(SaslError::NotAuthorized);
        }
        let auth_message = format!("{},{},{}", self.first.bare, self.server_first, without_proof);
        let client_sig = hmac(self.hash, &self.creds.stored_key, auth_message.as_bytes());
        if proof.len() != client_sig.len() {
            return Err(SaslError::NotAuthorized);
        }
        let client_key: Vec<u8> = proof.iter().zip(&client_sig).map(|(a, b)| a ^ b).collect();
        if !constant_time_eq(&digest(self.hash, &client_key), &self.creds.stored_key) {
            return Err(SaslError::NotAuthorized);
        }
        let server_sig = hmac(self.hash, &self.creds.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_sig)))
    }
}

/// Parses a PLAIN message: `[authzid] NUL authcid NUL password`.
pub fn parse_plain(msg: &[u8]) -> Result<(Option<String>, String, String), SaslError> {
    let s = std::str::from_utf8(msg).map_err(|_| SaslError::Malformed("not UTF-8"))?;
    let mut it = s.split('\0');
    let (Some(z), Some(u), Some(p), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return Err(SaslError::Malformed("PLAIN needs authzid NUL authcid NUL password"));
    };
    if u.is_empty() {
        return Err(SaslError::Malformed("empty username"));
    }
    Ok(((!z.is_empty()).then(|| z.to_string()), u.to_string(), p.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of RFC 7677 §3 (user "user", password "pencil").
    #[test]
    fn rfc7677_example_verifies() {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let creds = derive(Hash::Sha256, "pencil", &salt, 4096);
        let account = Account {
            sha1: creds.clone(),
            sha256: creds,
        };
        let first = parse_client_first(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO").unwrap();
        let mut ex = ScramExchange::new(
            Hash::Sha256,
            first,
            Some(&account),
            "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
            [0; 16],
        );
        assert_eq!(
            ex.server_first(),
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let fin = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        assert_eq!(
            ex.finish(fin.as_bytes()).unwrap(),
            "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
        let bad = fin.replace("p=dHzb", "p=dHzc");
        assert_eq!(ex.finish(bad.as_bytes()), Err(SaslError::NotAuthorized));
        // Unknown users fail at the end, like wrong passwords.
        let first = parse_client_first(b"n,,n=nobody,r=abc").unwrap();
        ex = ScramExchange::new(Hash::Sha256, first, None, "def", [1; 16]);
        let f = format!("c=biws,r=abcdef,p={}", B64.encode([0u8; 32]));
        assert_eq!(ex.finish(f.as_bytes()), Err(SaslError::NotAuthorized));
    }

    #[test]
    fn plain_checks_stored_credentials() {
        let a = new_account("s3cret", [1; 16], [2; 16], 64);
        assert!(verify_password(&a, "s3cret"));
        assert!(!verify_password(&a, "s3cret "));
        assert_eq!(parse_plain(b"\0u\0p").unwrap(), (None, "u".into(), "p".into()));
        assert!(parse_plain(b"u\0p").is_err());
    }
}
