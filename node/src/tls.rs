//! TLS for c2s: the configured certificate, or a self-signed one made on first start.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::Config;

/// Paths of the certificate and key in use, generating a self-signed pair into
/// `data_dir/tls/` when none is configured.
pub fn cert_paths(cfg: &Config) -> Result<(PathBuf, PathBuf), String> {
    if let (Some(c), Some(k)) = (&cfg.tls.cert, &cfg.tls.key) {
        return Ok((c.clone(), k.clone()));
    }
    let dir = cfg.server.data_dir.join("tls");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    // The names a generated certificate was made for: when `server.domains` changes (or the
    // pair came from a version that named no domain), a new one is made.
    let names_file = dir.join("generated-for");
    let names = cert_names(&cfg.server.domains);
    let wanted = names.join("\n");
    let made_for = std::fs::read_to_string(&names_file).ok();
    if cert.exists() && key.exists() && made_for.as_deref() == Some(wanted.as_str()) {
        return Ok((cert, key));
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let (cert_pem, key_pem) = self_signed(&cfg.server.domains)?;
    std::fs::write(&cert, cert_pem).map_err(|e| format!("cannot write {}: {e}", cert.display()))?;
    std::fs::write(&key, key_pem).map_err(|e| format!("cannot write {}: {e}", key.display()))?;
    std::fs::write(&names_file, wanted).map_err(|e| format!("cannot write {}: {e}", names_file.display()))?;
    tracing::warn!(cert = %cert.display(), ?names, "no tls.cert configured: generated a self-signed certificate");
    Ok((cert, key))
}

/// Every name a served domain's certificate covers: the domain, and `*.DOMAIN` for its
/// services (conference., pubsub., upload.).
fn cert_names(domains: &[String]) -> Vec<String> {
    domains.iter().flat_map(|d| [d.clone(), format!("*.{d}")]).collect()
}

/// A self-signed certificate (PEM) and its key, named after the first domain (CN) and
/// valid for every served domain and its subdomains (subjectAltName).
fn self_signed(domains: &[String]) -> Result<(String, String), String> {
    let err = |e: rcgen::Error| format!("cannot generate a self-signed certificate: {e}");
    let mut params = rcgen::CertificateParams::new(cert_names(domains)).map_err(err)?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(
        rcgen::DnType::CommonName,
        domains.first().cloned().unwrap_or_else(|| "localhost".into()),
    );
    dn.push(rcgen::DnType::OrganizationName, "Starling XMPP server (self-signed)");
    params.distinguished_name = dn;
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let cert = params.self_signed(&key).map_err(err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("tls.cert {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("tls.cert {}: no certificate found", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("tls.key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("TLS certificate/key: {e}"))?;
    Ok(Arc::new(cfg))
}
