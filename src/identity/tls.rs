//! TLS to Airflow's metastore, with libpq's `sslmode` meanings, so the connection string
//! that works for Airflow (psycopg2, over libpq) works here too.
//!
//! | `sslmode` | here |
//! | --- | --- |
//! | `disable` | plain TCP |
//! | `allow`, `prefer` (libpq's default) | TLS when the server offers it, else plain; the certificate is not checked |
//! | `require` | TLS or no connection; the certificate is not checked, unless `sslrootcert` is given (then as `verify-ca`) |
//! | `verify-ca` | TLS; the chain must lead to `sslrootcert` (or the platform's roots); any host name |
//! | `verify-full` | as `verify-ca`, and the certificate must name the host connected to |
//!
//! `sslrootcert` is a PEM file, or `system` for the platform's roots (the default).
//! tokio-postgres knows neither `sslrootcert` nor the two `verify-*` modes, so they are
//! taken out of the URL here and turned into the rustls configuration.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// How the server's certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verify {
    /// Encrypted, but anyone's certificate is accepted (libpq's `prefer` and `require`).
    Nothing,
    /// The chain must lead to a trusted root; the host name is not compared.
    Chain { roots: Roots },
    /// The chain and the host name.
    ChainAndHost { roots: Roots },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Roots {
    Platform,
    File(String),
}

/// A metastore URL split into what tokio-postgres takes and the TLS policy.
#[derive(Debug)]
pub struct Connection {
    pub config: tokio_postgres::Config,
    pub verify: Verify,
}

impl Connection {
    /// Parses a `postgresql://` URL (SQLAlchemy's driver suffix already removed). Reads
    /// no file: a bad `sslrootcert` shows up in [`Connection::connector`].
    pub fn parse(url: &str) -> Result<Connection, String> {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut mode = None;
        let mut root_cert = None;
        // The other parameters pass on exactly as written (re-encoding could change them).
        let mut kept = Vec::new();
        for raw in query.split('&').filter(|raw| !raw.is_empty()) {
            let Some((name, value)) = form_urlencoded::parse(raw.as_bytes()).next() else {
                continue;
            };
            match name.as_ref() {
                "sslmode" => mode = Some(value.into_owned()),
                "sslrootcert" => root_cert = Some(value.into_owned()),
                "sslcert" | "sslkey" | "sslpassword" | "sslcrl" => {
                    return Err(format!(
                        "{name}: client certificates are not supported for the metastore"
                    ))
                }
                _ => kept.push(raw),
            }
        }
        let kept = kept.join("&");
        let url = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{kept}")
        };
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| format!("cannot parse the metastore URL: {e}"))?;
        let roots = match root_cert.as_deref() {
            None | Some("system") => Roots::Platform,
            Some(path) => Roots::File(path.to_owned()),
        };
        let (ssl_mode, verify) = match mode.as_deref().unwrap_or("prefer") {
            "disable" => (SslMode::Disable, Verify::Nothing),
            "allow" | "prefer" => (SslMode::Prefer, Verify::Nothing),
            "require" if root_cert.is_some() => (SslMode::Require, Verify::Chain { roots }),
            "require" => (SslMode::Require, Verify::Nothing),
            "verify-ca" => (SslMode::Require, Verify::Chain { roots }),
            "verify-full" => (SslMode::Require, Verify::ChainAndHost { roots }),
            other => {
                return Err(format!(
                    "sslmode {other:?}: expected disable, allow, prefer, require, verify-ca or verify-full"
                ))
            }
        };
        config.ssl_mode(ssl_mode);
        Ok(Connection { config, verify })
    }

    /// The TLS connector for this policy (loads the roots it names).
    pub fn connector(&self) -> Result<MakeRustlsConnect, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let libpq = |chain| {
            let algorithms = provider.signature_verification_algorithms;
            Arc::new(LibpqVerifier { chain, algorithms })
        };
        let config = match &self.verify {
            Verify::Nothing => builder
                .dangerous()
                .with_custom_certificate_verifier(libpq(None))
                .with_no_client_auth(),
            Verify::Chain { roots } => {
                let chain = WebPkiServerVerifier::builder_with_provider(
                    Arc::new(load_roots(roots)?),
                    provider.clone(),
                )
                .build()
                .map_err(|e| e.to_string())?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(libpq(Some(chain)))
                    .with_no_client_auth()
            }
            Verify::ChainAndHost { roots } => builder
                .with_root_certificates(load_roots(roots)?)
                .with_no_client_auth(),
        };
        Ok(MakeRustlsConnect::new(config))
    }

    /// How the connection is secured, for the startup log line.
    pub fn describe(&self) -> &'static str {
        match (self.config.get_ssl_mode(), &self.verify) {
            (SslMode::Disable, _) => "no TLS",
            (SslMode::Prefer, _) => "TLS if offered, certificate unchecked",
            (_, Verify::Nothing) => "TLS, certificate unchecked",
            (_, Verify::Chain { .. }) => "TLS, certificate chain checked",
            (_, Verify::ChainAndHost { .. }) => "TLS, certificate and host name checked",
        }
    }
}

fn load_roots(roots: &Roots) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::Platform => {
            // Honours SSL_CERT_FILE / SSL_CERT_DIR, like the Redis connection.
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
        }
        Roots::File(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("sslrootcert {path}: {e}"))?;
            store.add_parsable_certificates(certs);
        }
    }
    if store.is_empty() {
        return Err(match roots {
            Roots::Platform => "no trusted root certificates found on this machine; \
                                set sslrootcert"
                .to_owned(),
            Roots::File(path) => format!("sslrootcert {path}: no certificate in it"),
        });
    }
    Ok(store)
}

/// libpq's weaker checks, over rustls. The handshake signatures are always checked;
/// `prefer` / `require` take any certificate (`chain: None`), and `verify-ca` checks the
/// chain but not the host name.
#[derive(Debug)]
struct LibpqVerifier {
    chain: Option<Arc<WebPkiServerVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for LibpqVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmodes_follow_libpq() {
        let mode = |url: &str| {
            let c = Connection::parse(url).unwrap();
            (c.config.get_ssl_mode(), c.verify)
        };
        let base = "postgresql://u@h:5432/airflow";
        assert_eq!(mode(base), (SslMode::Prefer, Verify::Nothing));
        assert_eq!(
            mode(&format!("{base}?sslmode=disable")),
            (SslMode::Disable, Verify::Nothing)
        );
        assert_eq!(
            mode(&format!("{base}?sslmode=require")),
            (SslMode::Require, Verify::Nothing)
        );
        assert_eq!(
            mode(&format!("{base}?sslmode=require&sslrootcert=/ca.pem")),
            (
                SslMode::Require,
                Verify::Chain {
                    roots: Roots::File("/ca.pem".into())
                }
            )
        );
        assert_eq!(
            mode(&format!(
                "{base}?sslmode=verify-full&sslrootcert=system&connect_timeout=3"
            )),
            (
                SslMode::Require,
                Verify::ChainAndHost {
                    roots: Roots::Platform
                }
            )
        );
        let kept = Connection::parse(&format!("{base}?sslmode=verify-ca&connect_timeout=3"))
            .unwrap()
            .config;
        assert_eq!(
            kept.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(3))
        );
        for bad in ["sslmode=always", "sslcert=/c.pem", "nonsense=1"] {
            assert!(
                Connection::parse(&format!("{base}?{bad}")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_root_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let url = format!(
            "postgresql://u@h/airflow?sslmode=verify-full&sslrootcert={}",
            empty.display()
        );
        let error = Connection::parse(&url).unwrap().connector().err().unwrap();
        assert!(error.contains("no certificate"), "{error}");
        let missing = "postgresql://u@h/airflow?sslmode=verify-ca&sslrootcert=/nowhere.pem";
        let error = Connection::parse(missing)
            .unwrap()
            .connector()
            .err()
            .unwrap();
        assert!(error.contains("/nowhere.pem"), "{error}");
    }
}
